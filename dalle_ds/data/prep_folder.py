"""prep-folder: a folder of images with same-named .txt captions -> img2dataset-layout shards.

Sample ``{key}`` (a zero-padded running number, as img2dataset names them) holds the image bytes
unchanged (``.jpg``/``.png``/``.webp``/...), the caption (``.txt``) and ``.json`` metadata with
the source file, so the rest of the pipeline reads these shards exactly as it reads
img2dataset's.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .tar_reader import IMAGE_EXTENSIONS
from .token_shards import ShardWriter

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
    images = sorted(p for p in src.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file())
    for image in images:
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            summary.skipped["missing_caption"] += 1
            continue
        yield image, caption_file.read_bytes()


def prep_folder(src, out, samples_per_shard: int = 10_000) -> PrepSummary:
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"--src {src} is not a folder")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty: shards left from an earlier run would be read twice; "
                         f"give an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    summary, writer = PrepSummary(), None
    for image, caption in _pairs(src, summary):
        if summary.samples % samples_per_shard == 0:
            if writer is not None:
                writer.commit()
            writer = ShardWriter(out / f"{summary.shards:05d}.tar")
            summary.shards += 1
        key = f"{summary.samples:09d}"
        writer.add(f"{key}{image.suffix.lower()}", image.read_bytes())
        writer.add(f"{key}.txt", caption)
        writer.add(f"{key}.json", json.dumps({"key": key, "source": str(image.relative_to(src))}).encode())
        summary.samples += 1
    if writer is None:
        raise ValueError(f"{src} has no images with a same-named .txt caption beside them")
    writer.commit()
    return summary
