"""Writes the demo dataset as img2dataset-layout shards, so the quickstart reads exactly what real
data gives: ``{key}.png``, ``{key}.txt``, ``{key}.json`` per sample and ``{shard}_stats.json``
beside each tar.

    out/train/00000.tar ...   every (colour, shape) pair but the held-out ones
    out/heldout/00000.tar ... only the held-out pairs (for evaluation)
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from ..data.token_shards import ShardWriter
from ..files import atomic_write_bytes
from .shapes import PHRASINGS, Scene, render, scenes

def _png(scene: Scene) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(render(scene)).save(buffer, format="PNG")
    return buffer.getvalue()

def write_split(out, split: str, count: int, seed: int = 0, per_shard: int = 500) -> list[Path]:
    """``count`` samples of ``split`` in shards of ``per_shard``; returns the shard paths."""
    if count < 1 or per_shard < 1:
        raise ValueError(f"count and per_shard must be >= 1, got {count} and {per_shard}")
    out = Path(out) / split
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}/{split}/captions")
    shards, writer = [], None
    for i, scene in enumerate(scenes(split, count, seed)):
        if i % per_shard == 0:
            _finish(writer, shards)
            writer = ShardWriter(out / f"{len(shards):05d}.tar")
        key = f"{i:09d}"
        writer.add(f"{key}.png", _png(scene))
        writer.add(f"{key}.txt", scene.caption(rng.randrange(len(PHRASINGS))).encode())
        writer.add(f"{key}.json", json.dumps({"key": key, **asdict(scene)}).encode())
        writer.count += 1
    _finish(writer, shards)
    return shards

def _finish(writer: ShardWriter | None, shards: list[Path]) -> None:
    if writer is None:
        return
    count = writer.count
    writer.commit()
    # img2dataset's stats file: readers count samples from it without opening the tar
    stats = writer.path.with_name(writer.path.stem + "_stats.json")
    atomic_write_bytes(stats, json.dumps({"count": count, "successes": count, "failed_to_download": 0}).encode())
    shards.append(writer.path)

def write_demo_dataset(out, train: int = 4000, heldout: int = 400, seed: int = 0,
                       per_shard: int = 500) -> dict[str, list[Path]]:
    return {split: write_split(out, split, count, seed, per_shard)
            for split, count in (("train", train), ("heldout", heldout))}
