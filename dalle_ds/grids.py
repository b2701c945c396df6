"""Captioned image grids: what decode-check, generate, the demo and TensorBoard's sample
pictures draw."""

from __future__ import annotations

import textwrap

import torch
from PIL import Image, ImageDraw


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
