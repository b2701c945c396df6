"""Untrusted image bytes -> fixed-size RGB tensors, for pretokenization and training.

Every way a sample can fail is a Rejected with a stable reason: empty_image, corrupt_image,
too_many_pixels, too_small, unsupported_mode. Pretokenization decodes millions of images, so the
pipeline keeps full-resolution work to the minimum: JPEGs decode at a reduced scale (draft) and
one resample goes straight from the centred square to size x size.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import Rejected

DEFAULT_MAX_PIXELS = 64_000_000  # above most camera photos, below PIL's own 89M-pixel warning
DEFAULT_MIN_SIDE = 16  # icons and tracking pixels; set it near size to drop heavy upscales

# Formats worth training on. Restricting Image.open to them also keeps plugins that parse exotic
# containers or shell out (EPS runs Ghostscript) away from untrusted bytes. Image.open needs every
# listed format registered, and AVIF depends on how Pillow was built.
Image.init()
_FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.OPEN)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_CONVERSIONS = {"1": "L", "P": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "RGBX": "RGB"}
_WHITE = (255, 255, 255)


def decode_image(
    data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> torch.Tensor:
    """Image file bytes -> (3, size, size) uint8 RGB.

    EXIF orientation is applied, transparency is composited over white, 16-bit grayscale is scaled
    to 8 bits, then the shorter side is resized to ``size`` (bicubic) and the centre kept.
    Images with more than ``max_pixels`` pixels are rejected from their header, before any pixel
    is decoded. PIL's own Image.MAX_IMAGE_PIXELS guard also rejects, so a max_pixels above it
    has no effect.
    """
    if min(size, max_pixels, min_side) < 1:
        raise ValueError(f"size, max_pixels and min_side must be >= 1, got {size}, {max_pixels}, {min_side}")
    if not data:
        raise Rejected("empty_image")
    with _pil_errors():
        img = Image.open(io.BytesIO(data), formats=_FORMATS)
    _check_dimensions(img.size, max_pixels, min_side)
    with _pil_errors():
        img.draft("RGB", (size, size))  # JPEG only: decode at 1/2..1/8 scale while both sides stay >= size
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    img = _resize_centre_crop(_resizable(img), size)
    rgb = _over_white(img) if img.mode == "RGBA" else img.convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()  # (s, s, 3) -> (3, s, s)


def images_to_float(batch_uint8: torch.Tensor) -> torch.Tensor:
    """(b, 3, s, s) uint8 -> float32 in [0, 1], the range DiscreteVAE takes. Call it after moving
    the batch to its device: uint8 is a quarter of the bytes to copy."""
    if batch_uint8.dtype != torch.uint8 or batch_uint8.ndim != 4:
        raise ValueError(
            f"expected a (batch, channels, height, width) uint8 tensor, got {batch_uint8.dtype} "
            f"of shape {tuple(batch_uint8.shape)}"
        )
    return batch_uint8.float().div_(255)


@contextmanager
def _pil_errors():
    """Turn whatever Pillow raises on hostile bytes into a Rejected. Its decoders raise a grab bag
    of types on malformed input (OSError for truncation, SyntaxError, ValueError, struct.error,
    IndexError, ...), so any exception inside counts as a corrupt image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected("too_many_pixels", str(e)) from None
    except Exception as e:
        raise Rejected("corrupt_image", f"{type(e).__name__}: {e}") from None


def _check_dimensions(wh: tuple[int, int], max_pixels: int, min_side: int) -> None:
    width, height = wh
    if width * height > max_pixels:
        raise Rejected("too_many_pixels", f"{width}x{height} is over {max_pixels} pixels")
    if min(width, height) < min_side:
        raise Rejected("too_small", f"{width}x{height} has a side under {min_side}")


def _resizable(img: Image.Image) -> Image.Image:
    """-> mode L, RGB or RGBA: the modes Pillow resamples with bicubic filtering (RGBA with
    premultiplied alpha, so transparent pixels do not bleed their colour)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:  # tRNS chunks and GIF/palette transparency
        return img.convert("RGBA")
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in _CONVERSIONS:
        return img.convert(_CONVERSIONS[img.mode])
    raise Rejected("unsupported_mode", f"image mode {img.mode}")


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Scale 0..65535 onto 0..255 (rounded); Pillow's convert("L") clips at 255 instead, which turns
    a 16-bit image white. 16-bit PNGs open as I;16 or I; values outside 16 bits (32-bit TIFF) clip."""
    values = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def _resize_centre_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size``, centre kept, as one resample of the centred square. reducing_gap
    lets Pillow shrink by an integer factor first (much faster, visually the same)."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def _over_white(img: Image.Image) -> Image.Image:
    background = Image.new("RGB", img.size, _WHITE)
    background.paste(img, mask=img)  # an RGBA mask means its alpha band
    return background
