"""DeepSpeed engine checkpoints with everything needed to resume exactly.

Client state: the training position (step, samples), every rank's data-stream position and RNG
states (gathered: DeepSpeed stores client state from one rank only), and the resolved config.
The ``latest`` pointer moves only after every rank has written its part, atomically, so a
checkpoint cut short by a crash is never the one resumed from. The last ``keep_last`` are kept.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..files import atomic_write_bytes

CHECKPOINTS = "checkpoints"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(obj) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def save(engine, run_dir: Path, step: int, client: dict, stream_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. ``client`` is rank-independent state (step, samples, config)."""
    folder = Path(run_dir) / CHECKPOINTS
    per_rank = _gather({"stream": stream_state, "rng": rng_state()})
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(folder), tag=tag, client_state={**client, "ranks": per_rank}, save_latest=False)
    dist.barrier()  # every rank's files are on disk
    if dist.get_rank() == 0:
        atomic_write_bytes(folder / "latest", tag.encode())
        _prune(folder, keep_last)
    dist.barrier()
    return folder / tag


def _prune(folder: Path, keep_last: int) -> None:
    tags = sorted(p for p in folder.glob("step*") if p.is_dir())
    for old in tags[:-max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)


def latest_tag(run_dir: Path) -> str | None:
    pointer = Path(run_dir) / CHECKPOINTS / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def load(engine, run_dir: Path) -> tuple[dict, dict] | None:
    """Loads the latest checkpoint into the engine; returns (client state, this rank's
    stream state), having restored this rank's RNG; None when there is none."""
    found = [latest_tag(run_dir) is not None]
    dist.broadcast_object_list(found, src=0)  # rank 0 decides: ranks must never disagree here
    if not found[0]:
        return None
    path, client = engine.load_checkpoint(str(Path(run_dir) / CHECKPOINTS))
    if path is None:
        raise ValueError(f"could not load the latest checkpoint of {run_dir}; its files are incomplete")
    ranks = client.pop("ranks")
    if len(ranks) != dist.get_world_size():
        raise ValueError(f"{run_dir} was saved by {len(ranks)} ranks, this run has {dist.get_world_size()}; resume "
                         f"with the same number, or export the model and start a new run from it")
    mine = ranks[dist.get_rank()]
    set_rng_state(mine["rng"])
    return client, mine["stream"]
