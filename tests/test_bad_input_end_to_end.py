"""A corpus holding every kind of bad input the issue names, through pretokenize and one epoch
of the training stream: bad samples are skipped and counted by reason, nothing crashes, and
every good sample arrives exactly once."""

import io
import struct
import zlib

import numpy as np
from PIL import Image

from conftest import tiny_vae
from data_fixtures import png_bytes, write_shard
from dalle_ds.data.manifest import Manifest
from dalle_ds.data.pretokenize import pretokenize
from dalle_ds.data.stream import StreamConfig, TokenStream
from dalle_ds.data.tokenizer import CaptionTokenizer, train_tokenizer

WORDS = ["red", "green", "blue", "round", "square", "small", "large", "dog", "cat", "tree", "sky", "sea"]


def good(i: int) -> dict:
    rgb = (i * 37 % 256, i * 91 % 256, i * 53 % 256)
    return {"key": f"good{i:03d}", "png": png_bytes(rgb, size=24),
            "txt": " ".join(WORDS[(i + j * 5) % len(WORDS)] for j in range(3)).encode() + f" {i}".encode()}


def image(mode: str, fmt: str = "PNG", size=(24, 24), **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, **kwargs).save(buf, format=fmt)
    return buf.getvalue()


def bomb_png() -> bytes:  # a header claiming 40000 x 40000 pixels
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_bad_inputs_are_skipped_counted_and_good_ones_arrive_once(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    truncated_jpeg = image("RGB", "JPEG", color=(9, 9, 9))[:120]
    hard_but_good = [  # unusual yet valid images: converted, not rejected
        {"png": image("I;16", color=40000)}, {"png": image("RGBA", color=(10, 200, 30, 100))},
        {"jpg": image("CMYK", "JPEG", color=(0, 255, 255, 0))}, {"png": image("P", color=3)},
    ]
    bad = [
        ({"jpg": truncated_jpeg, "txt": b"cut"}, "corrupt_image"),
        ({"png": bomb_png(), "txt": b"bomb"}, "too_many_pixels"),
        ({"png": png_bytes((1, 2, 3), size=4), "txt": b"tiny"}, "too_small"),
        ({"txt": b"no image"}, "missing_image"),
        ({"png": png_bytes((1, 2, 3))}, "missing_caption"),
        ({"png": png_bytes((1, 2, 3)), "txt": b"\xff\xfe bad"}, "caption_not_utf8"),
        ({"png": png_bytes((1, 2, 3)), "txt": b"  "}, "empty_caption"),
    ]
    goods, n = [], 0
    for shard in range(3):
        samples = []
        for j in range(6):
            sample = good(n)
            if shard == 1 and j < len(hard_but_good):  # its image replaced by an unusual one
                del sample["png"]
                sample.update(hard_but_good[j])
            samples.append(sample)
            goods.append(sample["txt"].decode())
            n += 1
            if shard * 6 + j < len(bad):
                samples.append({"key": f"bad{shard}{j}", **bad[shard * 6 + j][0]})
        write_shard(raw / f"{shard:05d}.tar", samples)
    (raw / "00003.tar").write_bytes(b"")  # zero bytes
    (raw / "00004.tar").write_bytes(np.random.default_rng(0).bytes(4096))  # noise
    whole = (raw / "00000.tar").read_bytes()
    (raw / "00005.tar").write_bytes(whole[: len(whole) // 3])  # a copy cut short

    vae, tokens = tiny_vae(image_size=16), tmp_path / "tokens"
    summary = pretokenize(sorted(str(p) for p in raw.glob("*.tar")), vae, tokens, batch_size=4, progress=False)
    expected = {reason: 1 for _, reason in bad}
    expected.update(unreadable_shard=2, truncated_shard=1)
    rejects = dict(summary.rejects)
    from_cut_copy = {k: v - expected.get(k, 0) for k, v in rejects.items() if v != expected.get(k, 0)}
    assert set(expected) <= set(rejects) and all(v > 0 for v in from_cut_copy.values())

    model = train_tokenizer(goods * 3, tmp_path / "tok.model", 300)
    manifest = Manifest.load(tokens)
    stream = TokenStream(tokens, model, 32, StreamConfig(batch_size=1, shuffle_buffer=5, num_workers=2))
    batches = [b for _, b in zip(range(stream.batches_per_epoch()), stream)]
    tokenizer = CaptionTokenizer(model)
    seen = [tokenizer.decode(b["text"][0]) for b in batches]
    copies = manifest.total_samples - len(goods)  # good samples of the cut copy of shard 0
    assert len(seen) == manifest.total_samples
    assert sorted(set(seen)) == sorted(goods)
    assert all(seen.count(c) == 1 for c in goods[6:]), "samples outside the cut copy arrive once"
    assert sum(seen.count(c) for c in goods[:6]) == 6 + copies
