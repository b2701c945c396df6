"""generate: captions -> images, from an exported DALL-E or a run folder, optionally ranked by CLIP.

For each prompt, ``num_images`` samples in batches (batch k seeded ``seed + k``, so any image can
be made again), ranked by CLIP when one is given, the best ``keep`` kept. Written per prompt:
``{slug}/{rank:03d}.png`` with a JSON sidecar (prompt, seed, settings, CLIP score: 100 x cosine, rank), and
``{slug}.png``, a captioned grid of the kept images, best first.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.tokenizer import CaptionTokenizer
from .files import atomic_write, atomic_write_bytes
from .grids import caption_grid
from .models.clip import CLIP
from .models.dalle import DALLE


@dataclass
class GenerateSettings:
    num_images: int = 8  # samples per prompt
    batch_size: int = 8  # samples per forward pass
    seed: int = 0  # batch k of a prompt is seeded seed + k
    temperature: float = 1.0  # 0: greedy
    filter_thres: float = 0.5  # top-k: keep the top (1 - filter_thres) of the image vocabulary
    top_p: float | None = None  # nucleus sampling after top-k
    cond_scale: float = 1.0  # classifier-free guidance (the model must be trained with null_cond_prob > 0)
    keep: int | None = None  # with CLIP: keep the best N (None: all, ranked)

    def check(self) -> None:
        if min(self.num_images, self.batch_size) < 1 or (self.keep is not None and self.keep < 1):
            raise ValueError("--num-images, --batch-size and --keep must be >= 1")
        if not 0 <= self.filter_thres < 1 or (self.top_p is not None and not 0 < self.top_p <= 1):
            raise ValueError("--filter-thres must be in [0, 1) and --top-p in (0, 1]")


@dataclass
class Generated:
    prompt: str
    grid: Path
    images: list[Path]
    scores: list[float | None]


def slug(prompt: str, index: int) -> str:
    """A file-name-safe folder name, unique by its index."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
    return f"{index:03d}-{words}"


def generate(dalle: DALLE, tokenizer: CaptionTokenizer, prompts: list[str], out, settings: GenerateSettings,
             clip: tuple[CLIP, CaptionTokenizer] | None = None, progress=None) -> list[Generated]:
    settings.check()
    if not prompts:
        raise ValueError("no prompts: give captions as arguments or --prompts-file")
    out = Path(out)
    results = []
    for index, prompt in enumerate(prompts):
        images, seeds = _sample(dalle, tokenizer, prompt, settings)
        scores = _clip_scores(clip, prompt, images) if clip else [None] * len(images)
        order = sorted(range(len(images)), key=lambda i: -scores[i]) if clip else list(range(len(images)))
        order = order[: settings.keep] if clip and settings.keep else order
        results.append(_write(out, index, prompt, [(images[i], seeds[i], scores[i]) for i in order], settings))
        if progress is not None:
            progress.update(1)
    return results


def _sample(dalle: DALLE, tokenizer: CaptionTokenizer, prompt: str, settings: GenerateSettings):
    """(num_images, 3, H, W) images in [0, 1], and (seed, index in its batch) of each."""
    device = next(dalle.parameters()).device
    images, seeds = [], []
    for k, start in enumerate(range(0, settings.num_images, settings.batch_size)):
        n = min(settings.batch_size, settings.num_images - start)
        text = tokenizer.encode([prompt] * n, dalle.text_seq_len)
        batch = dalle.generate_images(text.ids.to(device), mask=text.mask.to(device),
                                      filter_thres=settings.filter_thres, temperature=settings.temperature,
                                      top_p=settings.top_p,
                                      cond_scale=settings.cond_scale, seed=settings.seed + k)
        images.append(batch.float().clamp(0, 1).cpu())
        seeds += [(settings.seed + k, i) for i in range(n)]
    return torch.cat(images), seeds


@torch.inference_mode()
def _clip_scores(clip: tuple[CLIP, CaptionTokenizer], prompt: str, images: torch.Tensor) -> list[float]:
    model, tokenizer = clip
    text = tokenizer.encode([prompt], model.text_seq_len)
    return model.clip_score(text.ids, images, text.mask).tolist()


def _write(out: Path, index: int, prompt: str, ranked, settings: GenerateSettings) -> Generated:
    folder = out / slug(prompt, index)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("[0-9][0-9][0-9].png"), *folder.glob("[0-9][0-9][0-9].json")]:
        stale.unlink()  # an earlier run's images: eval must not count them with these
    paths = []
    for rank, (image, (seed, position), score) in enumerate(ranked):
        path = folder / f"{rank:03d}.png"
        pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
        atomic_write(path, lambda p: Image.fromarray(np.ascontiguousarray(pixels)).save(p, format="PNG"))
        sidecar = {"prompt": prompt, "seed": seed, "index_in_batch": position, "rank": rank, "clip_score": score,
                   "settings": asdict(settings)}
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(sidecar, indent=2).encode())
        paths.append(path)
    labels = [f"{rank + 1}" + (f" clip {score:.2f}" if score is not None else "") for rank, (_, _, score)
              in enumerate(ranked)]
    grid = out / f"{folder.name}.png"
    picture = caption_grid(torch.stack([image for image, _, _ in ranked]), labels, columns=min(len(ranked), 8))
    atomic_write(grid, lambda p: picture.save(p, format="PNG"))
    return Generated(prompt, grid, paths, [score for _, _, score in ranked])
