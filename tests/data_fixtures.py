"""Tiny image-text corpora written on the fly, in img2dataset's layout."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def png_bytes(colour, size=20, mode="RGB", fmt="PNG") -> bytes:
    image = Image.new("RGB", (size, size), colour)
    buf = io.BytesIO()
    image.convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[dict]) -> Path:
    """samples: dicts of suffix -> bytes, plus "key"."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for suffix, data in sample.items():
                if suffix != "key":
                    add_member(tar, f"{sample['key']}.{suffix}", data)
    return path


def good_sample(i: int, colour_name: str | None = None) -> dict:
    name = colour_name or list(COLOURS)[i % len(COLOURS)]
    return {"key": f"{i:09d}", "jpg" if i % 2 else "png": png_bytes(COLOURS[name], fmt="JPEG" if i % 2 else "PNG"),
            "txt": f"a {name} square".encode(), "json": json.dumps({"key": f"{i:09d}"}).encode()}


def write_corpus(folder: Path, num_shards: int = 3, per_shard: int = 5) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_shard(folder / f"{s:05d}.tar", [good_sample(s * per_shard + i) for i in range(per_shard)])
            for s in range(num_shards)]


def shard_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def mean_colour(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)
