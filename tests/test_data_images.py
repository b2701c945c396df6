import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_ds.data.errors import Rejected
from dalle_ds.data.images import decode_image, images_to_float


def encode(img, fmt="PNG", **kwargs):
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def decode(data, size=8, **kwargs):
    return decode_image(data, size, min_side=1, **kwargs)


def colour(decoded):  # the colour of a uniform decoded image
    assert decoded.shape == (3, 8, 8) and decoded.dtype == torch.uint8
    return decoded[:, 4, 4].tolist()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width, height, *, bit_depth=8, colour_type=2, rows=None):
    """A PNG written by hand, for what Pillow cannot save (16-bit RGB) or must not allocate (a
    header claiming a huge image, followed by one byte of pixel data)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(rows) if rows is not None else b"\x00"
    body = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def reject_reason(data, **kwargs):
    with pytest.raises(Rejected) as info:
        decode_image(data, 32, **kwargs)
    return info.value.reason


@pytest.mark.parametrize(
    "img, fmt, expected",
    [
        (Image.new("RGB", (16, 12), (255, 0, 0)), "PNG", [255, 0, 0]),
        (Image.new("RGB", (16, 12), (255, 0, 0)), "JPEG", [254, 0, 0]),
        (Image.new("L", (16, 12), 77), "PNG", [77, 77, 77]),
        (Image.new("1", (16, 12), 1), "PNG", [255, 255, 255]),
        (Image.new("LA", (16, 12), (77, 255)), "PNG", [77, 77, 77]),
        (Image.new("LA", (16, 12), (0, 0)), "PNG", [255, 255, 255]),
        (Image.new("RGBA", (16, 12), (255, 0, 0, 255)), "PNG", [255, 0, 0]),
        (Image.new("RGBA", (16, 12), (0, 0, 0, 0)), "PNG", [255, 255, 255]),
        (Image.new("RGBA", (16, 12), (255, 0, 0, 128)), "PNG", [255, 127, 127]),
        (Image.new("RGBA", (16, 12), (0, 0, 0, 0)), "WEBP", [255, 255, 255]),
        (Image.new("CMYK", (16, 12), (255, 0, 0, 0)), "JPEG", [0, 255, 255]),
        (Image.new("CMYK", (16, 12), (255, 0, 0, 0)), "TIFF", [0, 255, 255]),
    ],
    ids=["rgb", "jpeg", "l", "1bit", "la", "la_clear", "rgba", "rgba_clear", "rgba_half", "webp_clear", "cmyk_jpeg",
         "cmyk_tiff"],
)
def test_modes_decode_to_rgb(img, fmt, expected):
    got = colour(decode(encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {}))))
    assert np.allclose(got, expected, atol=2), got


def test_palette_colours_and_transparency():
    img = Image.new("P", (16, 12), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert colour(decode(encode(img))) == [10, 200, 30]
    assert colour(decode(encode(img, transparency=1))) == [255, 255, 255]
    assert colour(decode(encode(img, "GIF", transparency=1))) == [255, 255, 255]
    img.paste(0, (0, 0, 8, 12))  # index 0 stays opaque beside the transparent index 1
    assert decode(encode(img, transparency=1), size=16)[:, 8, 1].tolist() == [0, 0, 0]


def test_trns_chunk_makes_a_colour_transparent():
    assert colour(decode(encode(Image.new("RGB", (16, 12), (10, 20, 30)), transparency=(10, 20, 30)))) == [255] * 3
    assert colour(decode(encode(Image.new("L", (16, 12), 100), transparency=100))) == [255] * 3


@pytest.mark.parametrize("value, expected", [(65535, 255), (32768, 128), (257, 1), (0, 0)])
def test_sixteen_bit_grayscale_is_scaled_not_clipped(value, expected):
    data = encode(Image.fromarray(np.full((12, 16), value, dtype=np.uint16)))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert colour(decode(data)) == [expected] * 3


def test_thirty_two_bit_grayscale_is_scaled():
    data = encode(Image.fromarray(np.full((12, 16), 32768, dtype=np.int32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert colour(decode(data)) == [128] * 3


def test_sixteen_bit_rgb_png():
    pixel = struct.pack(">HHH", 65535, 32768, 0)  # 16 bits per channel, big-endian
    rows = b"".join(b"\x00" + pixel * 16 for _ in range(12))  # filter byte 0 per row
    assert colour(decode(png(16, 12, bit_depth=16, colour_type=2, rows=rows))) == [255, 128, 0]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise, so red goes on top
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95), 10, min_side=1)
    assert out.shape == (3, 10, 10)
    assert out[:, 1, 5].tolist()[0] > 200 and out[:, 1, 5].tolist()[2] < 50  # top: red
    assert out[:, 8, 5].tolist()[2] > 200 and out[:, 8, 5].tolist()[0] < 50  # bottom: blue


def test_wide_image_keeps_its_centre():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))
    img.paste((0, 0, 255), (200, 0, 300, 100))
    out = decode_image(encode(img), 32, min_side=1)
    assert out.shape == (3, 32, 32)
    green = torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1)
    assert (out[:, :, 1:-1] == green).all()  # the border column blends a little with its neighbours,
    assert (out[1, :, [0, -1]] > 200).all()  # as resizing the whole image and then cropping would


def test_tall_image_resizes_its_shorter_side():
    img = Image.new("RGB", (64, 256), (0, 0, 0))
    img.paste((255, 255, 255), (0, 96, 64, 160))  # the central 64x64 square is white
    out = decode_image(encode(img), 16, min_side=1)
    assert out.shape == (3, 16, 16)
    assert (out[:, 1:-1] == 255).all() and (out[:, [0, -1]] > 200).all()


def test_large_jpeg_draft_keeps_content():
    img = Image.new("RGB", (1024, 768), (255, 0, 0))
    img.paste((0, 0, 255), (512, 0, 1024, 768))
    out = decode_image(encode(img, "JPEG"), 64, min_side=1)
    assert out.shape == (3, 64, 64)
    assert out[0, 32, 4] > 240 and out[2, 32, 60] > 240  # left red, right blue survive the 1/8 decode


@pytest.mark.parametrize(
    "data",
    [encode(Image.new("RGB", (64, 64)), "JPEG")[:200], os.urandom(2000), b"GIF89a" + bytes(40),
     png(64, 64), b"\x89PNG\r\n\x1a\n"],
    ids=["truncated_jpeg", "random", "bad_gif", "png_without_pixels", "png_signature_only"],
)
def test_corrupt_images(data):
    assert reject_reason(data) == "corrupt_image"


def test_truncated_jpeg_after_a_valid_header():
    pixels = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG")
    assert reject_reason(data[: len(data) // 2]) == "corrupt_image"


def test_formats_outside_the_allow_list_are_rejected():
    assert reject_reason(encode(Image.new("RGB", (64, 64)), "PPM")) == "corrupt_image"


@pytest.mark.parametrize("side", [5000, 9500, 30000])  # ours, PIL's warning, PIL's error
def test_decompression_bombs_are_rejected_from_the_header(side):
    # The header claims side x side pixels but only one byte of pixel data follows: decoding it
    # would fail as corrupt, so too_many_pixels proves the check ran before decoding.
    assert reject_reason(png(side, side), max_pixels=1_000_000) == "too_many_pixels"


def test_real_compressible_bomb():
    data = encode(Image.new("L", (2000, 2000)))  # a few kilobytes
    assert len(data) < 20_000
    assert reject_reason(data, max_pixels=1_000_000) == "too_many_pixels"
    assert decode_image(data, 32, max_pixels=4_000_000).shape == (3, 32, 32)


def test_too_small_and_empty():
    assert reject_reason(encode(Image.new("RGB", (100, 20))), min_side=32) == "too_small"
    assert reject_reason(b"") == "empty_image"
    assert decode_image(encode(Image.new("RGB", (100, 40))), 64, min_side=32).shape == (3, 64, 64)  # upscales


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        decode_image(encode(Image.new("RGB", (8, 8))), 0)


def test_rejected_message():
    assert str(Rejected("too_small", "3x3")) == "too_small: 3x3"
    assert str(Rejected("empty_image")) == "empty_image"


def test_images_to_float():
    batch = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    out = images_to_float(batch)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    assert out.min() == 0 and out.max() == 1 and torch.allclose(out[0, 1, 0, 0], torch.tensor(128 / 255))
    with pytest.raises(ValueError, match="uint8"):
        images_to_float(batch.float())
