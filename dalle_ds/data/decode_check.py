"""decode-check: decode a few token-shard samples back to images through the dVAE and write a
captioned PNG grid, to see with one's own eyes that the codes are right."""

from __future__ import annotations

import textwrap

import torch
from PIL import Image, ImageDraw

from ..models.pretrained import model_fingerprint
from ..models.vae import DiscreteVAE
from .stream import StreamConfig, TokenStream


def caption_grid(images: torch.Tensor, captions: list[str], columns: int = 4, min_cell: int = 128) -> Image.Image:
    """(b, 3, H, W) images in [0, 1] with a caption under each -> one PIL image. Small images are
    enlarged (nearest neighbour, so codes stay visible as blocks) to leave room for the text."""
    b, _, h, w = images.shape
    scale = max(1, -(-min_cell // w))  # ceil
    cell_w, cell_h, text_h = w * scale, h * scale, 40
    rows = (b + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i, (pix, caption) in enumerate(zip(pixels, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * (cell_h + text_h)
        grid.paste(Image.fromarray(pix).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        lines = textwrap.wrap(caption, width=max(8, cell_w // 7))[:3]
        draw.multiline_text((x + 3, y + cell_h + 2), "\n".join(lines), fill="black", spacing=1)
    return grid


@torch.inference_mode()
def decode_check(folder, vae: DiscreteVAE, out_png, num_samples: int = 16) -> int:
    # the stream refuses shards of another dVAE, and reads them as training will
    stream = TokenStream(folder, None, 0, StreamConfig(num_workers=0), vae_fingerprint=model_fingerprint(vae))
    samples = stream.first_samples(num_samples)
    if not samples:
        raise ValueError(f"{folder} holds no samples to decode")
    codes = stream.as_tensor(samples)
    images = vae.eval().decode(codes)
    caption_grid(images, [c for _, c in samples]).save(out_png)
    return len(samples)
