"""eval: numbers for each trained part, as one JSON file and a printed table.

- dVAE on held-out image shards: reconstruction MSE and PSNR (through the hard codes DALL-E
  sees, images in [0, 1]) and codebook usage (perplexity, dead codes).
- DALL-E on held-out token shards: validation loss, text and image, and per-token perplexity.
- Generations (what ``generate`` wrote): mean CLIP score (100 x cosine) with our CLIP, and for
  captions of the demo dataset the colour and shape accuracy the analyser reads from the
  pixels, over all images and over each prompt's best by CLIP (rank 0).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.images import images_to_float
from .data.stream import ImageTextStream, StreamConfig, TokenStream
from .data.tokenizer import CaptionTokenizer
from .demo.shapes import analyse, parse_caption
from .models.clip import CLIP
from .models.dalle import DALLE
from .models.pretrained import model_fingerprint
from .models.vae import DiscreteVAE
from .training.metrics import codebook_usage


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.inference_mode()
def eval_vae(vae: DiscreteVAE, shards: str, max_samples: int, batch_size: int = 32) -> dict:
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


@torch.inference_mode()
def eval_generations(folder, clip: tuple[CLIP, CaptionTokenizer] | None = None) -> dict:
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
    result.update(_attribute_accuracy(generated))
    return result


def _load(path: Path, size: int) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return images_to_float(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None])


def _attribute_accuracy(generated) -> dict:
    """Colour and shape read from the pixels against those the caption asks for (demo captions)."""
    hits = defaultdict(list)
    for path, meta in generated:
        wanted = parse_caption(meta["prompt"])
        if wanted["colour"] is None or wanted["shape"] is None:
            continue
        seen = analyse(np.asarray(Image.open(path).convert("RGB")))
        ranked_first = meta.get("rank") == 0 and meta.get("clip_score") is not None
        for scope in ("all", "best") if ranked_first else ("all",):
            hits[f"{scope}/colour"].append(seen["colour"] == wanted["colour"])
            hits[f"{scope}/shape"].append(seen["shape"] == wanted["shape"])
            hits[f"{scope}/both"].append(seen == wanted)
    if not hits:
        return {}
    accuracy = {f"attribute_accuracy/{key}": float(np.mean(values)) for key, values in sorted(hits.items())}
    return {**accuracy, "attribute_images": len(hits["all/colour"])}


def table(results: dict) -> str:
    rows = [(f"{part}.{key}", value) for part, values in results.items() for key, value in values.items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:.4g}" if isinstance(value, float) else f"{name:<{width}}  {value}"
                     for name, value in rows)
