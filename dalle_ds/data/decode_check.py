"""decode-check: decode a few token-shard samples back to images through the dVAE and write a
captioned PNG grid, to see with one's own eyes that the codes are right."""

from __future__ import annotations

import torch

from ..grids import caption_grid
from ..models.image_tokenizer import ImageTokenizer
from ..models.pretrained import model_fingerprint
from .stream import StreamConfig, TokenStream


@torch.inference_mode()
def decode_check(folder, vae: ImageTokenizer, out_png, num_samples: int = 16) -> int:
    # the stream refuses shards of another dVAE, and reads them as training will
    stream = TokenStream(folder, None, 0, StreamConfig(num_workers=0), vae_fingerprint=model_fingerprint(vae))
    samples = stream.first_samples(num_samples)
    if not samples:
        raise ValueError(f"{folder} holds no samples to decode")
    codes = stream.as_tensor(samples)
    images = vae.eval().decode(codes)
    caption_grid(images, [c for _, c in samples]).save(out_png)
    return len(samples)
