"""Rank and world size from the launcher's environment, read in this one module and passed as
arguments to whatever needs them (open_clip's distributed.py).

Launchers: torchrun and the deepspeed launcher set RANK, WORLD_SIZE and LOCAL_RANK; srun alone
sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID; nothing set means one process. A SLURM job
array (independent jobs, e.g. pretokenization) is told apart by SLURM_ARRAY_TASK_ID.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # this process's index on its node: picks its GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env(env: Mapping[str, str] = os.environ) -> DistEnv:
    """This process's place among the processes its launcher started."""
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in env or world in env:
            found = DistEnv(env_int(env, rank), env_int(env, world), env_int(env, local, default=0))
            check_index(found.rank, found.world_size, f"{rank}/{world}")
            return found
    return DistEnv()


def slurm_array_task(env: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """(index, count) of this task in a SLURM job array, or None outside one. Arrays may start
    anywhere and step (--array=1-99:2): the index is the position in the array."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task_id, count = env_int(env, "SLURM_ARRAY_TASK_ID"), env_int(env, "SLURM_ARRAY_TASK_COUNT")
    first = env_int(env, "SLURM_ARRAY_TASK_MIN", default=0)
    step = env_int(env, "SLURM_ARRAY_TASK_STEP", default=1)
    index, off_step = divmod(task_id - first, max(step, 1))
    if off_step or not 0 <= index < count:
        raise ValueError(f"SLURM array task {task_id} is not in a regular range starting at {first} with step "
                         f"{step} and {count} tasks; submit the array as --array=A-B or --array=A-B:STEP")
    return index, count


def check_index(index: int, count: int, what: str) -> None:
    for name, value in (("index", index), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{what} {name} must be an integer, got {value!r}")
    if count < 1:
        raise ValueError(f"{what}: the number of jobs must be >= 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"{what}: index {index} is outside [0, {count}) for {count} jobs")


def env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    if name not in env:
        if default is None:
            raise ValueError(f"environment variable {name} is not set (it comes with the others of its launcher)")
        return default
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None
