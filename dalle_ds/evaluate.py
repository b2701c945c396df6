"""eval: numbers for each trained part, as one JSON file and a printed table.

- dVAE on held-out image shards: reconstruction MSE and PSNR (through the hard codes DALL-E
  sees, images in [0, 1]) and codebook usage (perplexity, dead codes).
- DALL-E on held-out token shards: validation loss, text and image, and per-token perplexity.
- Generations (what ``generate`` wrote): mean CLIP score (100 x cosine) with our CLIP, and,
  given an attribute reader (the demo's reads colour and shape), how often the pixels show what
  the caption asks for, over all images and over each prompt's best by CLIP (rank 0).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .data.images import images_to_float
from .data.stream import ImageTextStream, StreamConfig, TokenStream
from .data.tokenizer import CaptionTokenizer
from .models.clip import CLIP
from .models.dalle import DALLE
from .models.image_tokenizer import ImageTokenizer
from .models.pretrained import model_fingerprint
from .training.export import load_trained, load_with_tokenizer
from .training.metrics import codebook_usage

# (what a caption asks for, what an image shows): caption -> {attribute: value or None}, and
# (H, W, 3) uint8 pixels -> the same keys; the demo's are demo/shapes.py's parse_caption and analyse
Attributes = tuple[Callable[[str], dict], Callable[[np.ndarray], dict]]


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.inference_mode()
def eval_vae(vae: ImageTokenizer, shards: str, max_samples: int, batch_size: int = 32) -> dict:
    stream = ImageTextStream(shards, vae.image_size, StreamConfig(num_workers=0))
    samples = stream.first_samples(max_samples)
    if not samples:
        raise ValueError(f"{shards} holds no images to evaluate the dVAE on")
    squared, counts = 0.0, torch.zeros(vae.num_tokens, dtype=torch.long)
    for batch in _batches(samples, batch_size):
        images = images_to_float(stream.as_tensor(batch))
        codes = vae.get_codebook_indices(images)
        squared += float(((vae.decode(codes).clamp(0, 1) - images) ** 2).mean(dim=(1, 2, 3)).sum())
        counts += torch.bincount(codes.flatten(), minlength=vae.num_tokens)
    mse = squared / len(samples)
    usage = codebook_usage(counts)
    return {"samples": len(samples), "recon_mse": mse, "recon_psnr_db": 10 * math.log10(1 / max(mse, 1e-12)),
            "codebook_perplexity": usage["vae/codebook_perplexity"], "dead_codes": usage["vae/dead_codes"],
            "codebook_size": vae.num_tokens}


@torch.inference_mode()
def eval_dalle(dalle: DALLE, tokenizer: CaptionTokenizer, tokens: str, max_samples: int,
               batch_size: int = 32) -> dict:
    stream = TokenStream(tokens, None, dalle.text_seq_len, StreamConfig(num_workers=0),
                         vae_fingerprint=model_fingerprint(dalle.vae))
    samples = stream.first_samples(max_samples)
    if not samples:
        raise ValueError(f"{tokens} holds no token samples to evaluate DALL-E on")
    sums, n = torch.zeros(3, dtype=torch.float64), 0
    for batch in _batches(samples, batch_size):
        text = tokenizer.encode([caption for _, caption in batch], dalle.text_seq_len)
        codes = stream.as_tensor(batch)
        losses = dalle(text.ids, codes, mask=text.mask, return_loss=True, return_loss_breakdown=True)
        sums += torch.stack(losses).double() * len(batch)
        n += len(batch)
    loss, text_loss, image_loss = (sums / n).tolist()
    return {"samples": n, "loss": loss, "text_loss": text_loss, "image_loss": image_loss,
            "text_perplexity": math.exp(text_loss), "image_perplexity": math.exp(image_loss)}


def _generated(folder: Path) -> list[tuple[Path, dict]]:
    found = []
    for sidecar in sorted(folder.rglob("*.json")):
        meta = json.loads(sidecar.read_text())
        if "prompt" in meta and sidecar.with_suffix(".png").is_file():
            found.append((sidecar.with_suffix(".png"), meta))
    if not found:
        raise ValueError(f"{folder} holds no generated images with JSON sidecars: give the --out of dalle-ds generate")
    return found


def evaluate(out, *, vae=None, images=None, dalle=None, tokens=None, generations=None, clip=None,
             max_samples: int = 1_000, attributes: Attributes | None = None) -> dict:
    """Each part given, from its export or run folder: the dVAE on held-out image shards, DALL-E
    on held-out token shards, generate's output (CLIP-scored with ``clip``); written to ``out``
    as JSON and returned."""
    results = {}
    if vae:
        results["vae"] = eval_vae(load_trained(vae, ImageTokenizer)[0], images, max_samples)
    if dalle:
        results["dalle"] = eval_dalle(*load_with_tokenizer(dalle, DALLE, "--dalle"), tokens, max_samples)
    if generations:
        scorer = load_with_tokenizer(clip, CLIP, "--clip") if clip else None
        results["generations"] = eval_generations(generations, scorer, attributes)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    return results


@torch.inference_mode()
def eval_generations(folder, clip: tuple[CLIP, CaptionTokenizer] | None = None,
                     attributes: Attributes | None = None) -> dict:
    generated = _generated(Path(folder))
    result: dict = {"images": len(generated), "prompts": len({meta["prompt"] for _, meta in generated})}
    if clip is not None:
        model, tokenizer = clip
        by_prompt = defaultdict(list)
        for path, meta in generated:
            by_prompt[meta["prompt"]].append(path)
        scores = []
        for prompt, paths in by_prompt.items():  # each caption embedded once, its images in one batch
            text = tokenizer.encode([prompt], model.text_seq_len)
            images = torch.cat([_load(path, model.image_size) for path in paths])
            scores += model.clip_score(text.ids, images, text.mask).tolist()
        result["clip_score"] = float(np.mean(scores))
    if attributes is not None:
        result.update(_attribute_accuracy(generated, *attributes))
    return result


def _load(path: Path, size: int) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return images_to_float(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None])


def _attribute_accuracy(generated, wanted_in, seen_in) -> dict:
    """Each attribute read from the pixels against the caption's, and all of them at once
    ("both", as the demo's are colour and shape); images whose caption names not every
    attribute are skipped."""
    hits = defaultdict(list)
    for path, meta in generated:
        wanted = wanted_in(meta["prompt"])
        if any(value is None for value in wanted.values()):
            continue
        seen = seen_in(np.asarray(Image.open(path).convert("RGB")))
        ranked_first = meta.get("rank") == 0 and meta.get("clip_score") is not None
        for scope in ("all", "best") if ranked_first else ("all",):
            for key in wanted:
                hits[f"{scope}/{key}"].append(seen[key] == wanted[key])
            hits[f"{scope}/both"].append(seen == wanted)
    if not hits:
        return {}
    accuracy = {f"attribute_accuracy/{key}": float(np.mean(values)) for key, values in sorted(hits.items())}
    return {**accuracy, "attribute_images": len(hits["all/both"])}


def table(results: dict) -> str:
    rows = [(f"{part}.{key}", value) for part, values in results.items() for key, value in values.items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:.4g}" if isinstance(value, float) else f"{name:<{width}}  {value}"
                     for name, value in rows)
