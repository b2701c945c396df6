"""generate: captions -> images, from an exported DALL-E or a run folder, optionally ranked by CLIP.

For each prompt, ``num_images`` samples in batches (batch k seeded ``seed + k``, so any image can
be made again), ranked by CLIP when one is given, the best ``keep`` kept. Written per prompt:
``{slug}/{rank:03d}.png`` with a JSON sidecar (prompt, seed, settings, CLIP score: 100 x cosine, rank), and
``{slug}.png``, a captioned grid of the kept images, best first.

An image prompt (``init_image``) fixes the top ``init_rows`` rows of every sample's codes: the
image is resized and centre-cropped as training data is, and encoded by the model's own dVAE.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.errors import Rejected
from .data.images import decode_image, images_to_float
from .data.tokenizer import CaptionTokenizer
from .files import atomic_write, atomic_write_bytes
from .grids import caption_grid
from .inference_memory import MemoryEstimate, batch_size_for, estimate_memory
from .models.clip import CLIP
from .models.dalle import DALLE

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CPU_BATCH_SIZE = 8  # --batch-size when not given, except on CUDA, where free memory chooses it


@dataclass
class GenerateSettings:
    num_images: int = 8  # samples per prompt
    batch_size: int | None = None  # samples per forward pass; None: from free memory on CUDA, else CPU_BATCH_SIZE
    seed: int = 0  # batch k of a prompt is seeded seed + k
    temperature: float = 1.0  # 0: greedy
    filter_thres: float = 0.5  # top-k: keep the top (1 - filter_thres) of the image vocabulary
    top_p: float | None = None  # nucleus sampling after top-k
    cond_scale: float = 1.0  # classifier-free guidance (the model must be trained with null_cond_prob > 0)
    keep: int | None = None  # with CLIP: keep the best N (None: all, ranked)
    dtype: str = "fp32"  # DALL-E's transformer, weights and KV cache: bf16, fp16 or fp32 (dVAE and CLIP stay fp32)
    init_image: str | None = None  # an image file whose top init_rows rows of codes every sample keeps
    init_rows: int | None = None  # 1 .. grid rows - 1
    cuda_graph: bool = False  # CUDA: replay each token's decoding step as one recorded CUDA graph

    def check(self) -> None:
        if any(n is not None and n < 1 for n in (self.num_images, self.batch_size, self.keep)):
            raise ValueError("--num-images, --batch-size and --keep must be >= 1")
        if not 0 <= self.filter_thres < 1 or (self.top_p is not None and not 0 < self.top_p <= 1):
            raise ValueError("--filter-thres must be in [0, 1) and --top-p in (0, 1]")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if (self.init_image is None) != (self.init_rows is None):
            raise ValueError("--init-image and --init-rows go together: the image, and how many of its top code "
                             "rows to keep")


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


def plan(dalle: DALLE, settings: GenerateSettings) -> tuple[GenerateSettings, MemoryEstimate]:
    """Casts ``dalle`` for ``settings.dtype`` (in place, see ``cast_for_inference``); returns the
    settings with the batch size resolved, and the memory estimate for that batch size."""
    settings.check()
    device = next(dalle.parameters()).device
    if settings.cuda_graph and device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device; the model is on {device}")
    cast_for_inference(dalle, settings.dtype, device)
    guided, primed = settings.cond_scale != 1.0, (settings.init_rows or 0) * dalle.layout.grid_w
    batch_size = settings.batch_size
    if batch_size is None:
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            batch_size = batch_size_for(dalle, free, settings.num_images, guided=guided, primed_codes=primed)
        else:
            batch_size = CPU_BATCH_SIZE
    settings = replace(settings, batch_size=batch_size)
    return settings, estimate_memory(dalle, batch_size, guided=guided, primed_codes=primed)


def cast_for_inference(dalle: DALLE, dtype: str, device: torch.device) -> None:
    """DALL-E's own layers (embeddings, transformer, heads) in ``dtype``, in place; its KV cache
    follows them. A cast rather than autocast: decoding steps are memory-bound, and autocast
    would read every fp32 weight and write a low-precision copy at each of the N steps (measured
    on CPU: a bf16 cast runs as fast as fp32, bf16 autocast slower), and it would not halve the
    weights. The dVAE stays fp32: it runs once per batch (encode an image prompt, decode the
    samples) against the transformer's N steps, so lower precision would save little there and
    could change its pixels. CLIP is left as given (the CLI keeps it fp32): its scores are compared with eval's."""
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16: use --dtype fp16 or fp32")
    if dtype == "fp16" and device.type == "cpu":
        logger.warning("--dtype fp16 on CPU: few CPU kernels are native fp16, so it may run slower than fp32; "
                       "bf16 halves the memory as well")
    for child in dalle.children():
        if child is not dalle.vae:
            child.to(DTYPES[dtype])


def generate(dalle: DALLE, tokenizer: CaptionTokenizer, prompts: list[str], out, settings: GenerateSettings,
             clip: tuple[CLIP, CaptionTokenizer] | None = None, progress=None) -> list[Generated]:
    """Writes the images of every prompt; casts ``dalle`` to ``settings.dtype`` (see ``plan``)."""
    settings, _ = plan(dalle, settings)
    if not prompts:
        raise ValueError("no prompts: give captions as arguments or --prompts-file")
    out = Path(out)
    primer = init_codes(dalle, settings.init_image, settings.init_rows) if settings.init_image else None
    results = []
    for index, prompt in enumerate(prompts):
        images, seeds = _sample(dalle, tokenizer, prompt, settings, primer)
        scores = _clip_scores(clip, prompt, images) if clip else [None] * len(images)
        order = sorted(range(len(images)), key=lambda i: -scores[i]) if clip else list(range(len(images)))
        order = order[: settings.keep] if clip and settings.keep else order
        results.append(_write(out, index, prompt, [(images[i], seeds[i], scores[i]) for i in order], settings))
        if progress is not None:
            progress.update(1)
    return results


@torch.inference_mode()
def init_codes(dalle: DALLE, path, rows: int) -> torch.Tensor:
    """(1, rows * grid width) codes: the top ``rows`` rows of the image at ``path``, prepared as
    training data is and encoded by ``dalle``'s dVAE."""
    grid = dalle.layout.grid_h
    if not 1 <= rows < grid:
        raise ValueError(f"--init-rows must be in [1, {grid - 1}] (the code grid has {grid} rows), got {rows}")
    try:
        pixels = decode_image(Path(path).read_bytes(), dalle.vae.image_size)
    except Rejected as rejected:
        raise ValueError(f"--init-image {path} is not a usable image ({rejected}): give a JPEG, PNG or WEBP "
                         f"file") from None
    device = next(dalle.vae.parameters()).device
    codes = dalle.vae.get_codebook_indices(images_to_float(pixels[None].to(device)))
    return codes[:, : rows * dalle.layout.grid_w]


def _sample(dalle: DALLE, tokenizer: CaptionTokenizer, prompt: str, settings: GenerateSettings,
            primer: torch.Tensor | None):
    """(num_images, 3, H, W) images in [0, 1], and (seed, index in its batch) of each."""
    device = next(dalle.parameters()).device
    images, seeds = [], []
    for k, start in enumerate(range(0, settings.num_images, settings.batch_size)):
        n = min(settings.batch_size, settings.num_images - start)
        text = tokenizer.encode([prompt] * n, dalle.text_seq_len)
        prime = {} if primer is None else dict(img=primer.expand(n, -1), num_init_img_tokens=primer.shape[1])
        batch = dalle.generate_images(text.ids.to(device), mask=text.mask.to(device),
                                      filter_thres=settings.filter_thres, temperature=settings.temperature,
                                      top_p=settings.top_p,
                                      cond_scale=settings.cond_scale, seed=settings.seed + k,
                                      cuda_graph=settings.cuda_graph, **prime)
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
