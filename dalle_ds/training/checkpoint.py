"""DeepSpeed engine checkpoints with everything needed to resume exactly.

Client state: the training position (step, samples), every rank's data-stream position and RNG
states (gathered: DeepSpeed stores client state from one rank only), and the resolved config.
The ``latest`` pointer moves only after every rank has written its part, atomically, so a
checkpoint cut short by a crash is never the one resumed from. The last ``keep_last`` are kept.

A run resumed on another number of ranks (elastic) loads the checkpoint through DeepSpeed's
universal checkpoint format, which it converts to once (``ds_to_universal``): DeepSpeed, not
this module, re-partitions the ZeRO state.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..files import atomic_write_bytes

CHECKPOINTS = "checkpoints"
UNIVERSAL = "universal"  # checkpoints/universal/<tag>: a checkpoint converted for another number of ranks


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
    client = {**client, "ranks": per_rank, **_universal_info()}
    engine.save_checkpoint(str(folder), tag=tag, client_state=client, save_latest=False)
    dist.barrier()  # every rank's files are on disk
    if dist.get_rank() == 0:
        atomic_write_bytes(folder / "latest", tag.encode())
        _prune(folder, keep_last)
    dist.barrier()
    return folder / tag


def _universal_info() -> dict:
    """What ds_to_universal looks for in a checkpoint's client state."""
    from deepspeed.checkpoint import constants

    return {constants.UNIVERSAL_CHECKPOINT_INFO:
            {constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def _prune(folder: Path, keep_last: int) -> None:
    tags = sorted(p for p in folder.glob("step*") if p.is_dir())
    for old in tags[:-max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(folder / UNIVERSAL / old.name, ignore_errors=True)


def latest_tag(run_dir: Path) -> str | None:
    pointer = Path(run_dir) / CHECKPOINTS / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


@dataclass
class Source:
    """The checkpoint a run resumes from: its folder and tag as the engine loads them."""

    folder: Path
    tag: str
    universal: bool  # saved by another number of ranks: load with DeepSpeed's load_universal


def resume_source(run_dir: Path) -> Source | None:
    """Collective, before the engine exists (``universal`` changes how it is configured). The
    latest checkpoint, converted to the universal format first when its ZeRO partitions come
    from another number of ranks; None when there is none. Rank 0 decides and converts (a
    folder converted beforehand, offline, is used as it is)."""
    folder = Path(run_dir) / CHECKPOINTS
    tag = latest_tag(run_dir)
    saved = len(list((folder / tag).glob("*zero_pp_rank_*_optim_states.pt"))) if tag else 0  # 0: no ZeRO partitions
    found = [(tag, saved)]
    dist.broadcast_object_list(found, src=0)  # ranks must never disagree here (a lagging shared file system)
    tag, saved = found[0]
    if tag is None:
        return None
    if saved in (0, dist.get_world_size()):
        return Source(folder, tag, universal=False)
    if dist.get_rank() == 0 and not (folder / UNIVERSAL / tag).is_dir():
        print(f"resuming {tag}, saved by {saved} ranks, on {dist.get_world_size()}: converting it to DeepSpeed's "
              f"universal checkpoint format (once, into {folder / UNIVERSAL / tag})", flush=True)
        _to_universal(folder / tag, folder / UNIVERSAL / tag)
    dist.barrier()
    return Source(folder / UNIVERSAL, tag, universal=True)


def _to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process (one worker: no forks beside a process
    group), into a temporary folder renamed when complete."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(checkpoint), output_folder=str(partial), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # checkpoints saved before we added the info
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints would mix into our commands' output
        ds_to_universal(args)
    partial.rename(out)
    (out.parent / "latest_universal").unlink(missing_ok=True)  # its pointer names the partial folder; we pass tags


def load(engine, source: Source) -> tuple[dict, list[dict]]:
    """Loads a checkpoint into the engine; returns (client state, every saved rank's stream
    state). Restores this rank's RNG when the number of ranks is the same."""
    path, client = engine.load_checkpoint(str(source.folder), tag=source.tag)
    if path is None:
        raise ValueError(f"could not load checkpoint {source.folder / source.tag}; its files are incomplete")
    ranks = client.pop("ranks")
    if len(ranks) == dist.get_world_size():
        set_rng_state(ranks[dist.get_rank()]["rng"])
    return client, [rank["stream"] for rank in ranks]
