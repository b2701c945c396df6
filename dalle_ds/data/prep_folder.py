"""prep-folder: a folder of images with same-named .txt captions -> img2dataset-layout shards.

Sample ``{key}`` (a zero-padded running number, as img2dataset names them) holds the image bytes
unchanged (``.jpg``/``.png``/``.webp``/...), the caption (``.txt``) and ``.json`` metadata with
the source file, so the rest of the pipeline reads these shards exactly as it reads
img2dataset's.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class PrepSummary:
    shards: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)

    def line(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"prep-folder: {self.samples} samples in {self.shards} shards; skipped: {skipped}"


def _pairs(src: Path, summary: PrepSummary):
    """(image path, caption) for every image with a caption file beside it, sorted by path."""
    for image in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            summary.skipped["missing_caption"] += 1
            continue
        yield image, caption_file.read_bytes()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def prep_folder(src, out, samples_per_shard: int = 10_000) -> PrepSummary:
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"--src {src} is not a folder")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out.mkdir(parents=True, exist_ok=True)
    summary = PrepSummary()
    tar, tmp = None, None

    def close():
        tar.close()
        os.replace(tmp, tmp.with_suffix(""))  # "00000.tar.tmp" -> "00000.tar"
        summary.shards += 1

    for image, caption in _pairs(src, summary):
        if summary.samples % samples_per_shard == 0:
            if tar is not None:
                close()
            tmp = out / f"{summary.shards:05d}.tar.tmp"
            tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)
        key = f"{summary.samples:09d}"
        _add(tar, f"{key}{image.suffix.lower()}", image.read_bytes())
        _add(tar, f"{key}.txt", caption)
        _add(tar, f"{key}.json", json.dumps({"key": key, "source": str(image.relative_to(src))}).encode())
        summary.samples += 1
    if tar is not None:
        close()
    if summary.samples == 0:
        raise ValueError(f"{src} has no images with a same-named .txt caption beside them")
    return summary
