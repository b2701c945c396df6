"""pretokenize throughput on CPU against the bare DiscreteVAE encoder on the same images.

Run: .venv/bin/python benchmarks/bench_pretokenize.py
Target: the whole job (tar reading, JPEG decoding, resizing, encoding, writing token shards)
keeps >= 85% of the encoder's own batched throughput, so that IO and decoding cost little.
Scaling: two jobs on disjoint halves of the input write byte-identical shards to one job's.
"""

import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
from dalle_ds import DiscreteVAE
from dalle_ds.data.images import decode_image, images_to_float
from dalle_ds.data.pretokenize import pretokenize

NUM_SHARDS, PER_SHARD, BATCH = 4, 96, 32
VAE = dict(image_size=256, num_layers=3, num_tokens=8192, codebook_dim=512, hidden_dim=64)


def jpeg(rng) -> bytes:
    """A 320x256 photo-like JPEG: smooth colour fields plus noise (so it compresses like a photo)."""
    y, x = np.mgrid[0:256, 0:320]
    base = np.stack([np.sin(x / rng.uniform(10, 60)), np.cos(y / rng.uniform(10, 60)), np.sin((x + y) / 40)], -1)
    pixels = ((base + 1) * 100 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: Path) -> list[Path]:
    import tarfile

    rng = np.random.default_rng(0)
    paths = []
    for s in range(NUM_SHARDS):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(PER_SHARD):
                for suffix, data in (("jpg", jpeg(rng)), ("txt", f"photo {s} {i}".encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:04d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def bare_encoder_rate(vae: DiscreteVAE, shards: list[Path]) -> float:
    """Images/s of vae.get_codebook_indices alone, on the same images already decoded."""
    from dalle_ds.data.tar_reader import RejectCounts, image_and_captions, iter_shard

    images = [decode_image(image_and_captions(s)[1], vae.image_size)
              for shard in shards for s in iter_shard(str(shard), RejectCounts())]
    batches = [images_to_float(torch.stack(images[i:i + BATCH])) for i in range(0, len(images), BATCH)]
    with torch.inference_mode():
        vae.get_codebook_indices(batches[0])  # warm-up
        start = time.perf_counter()
        for batch in batches:
            vae.get_codebook_indices(batch)
    return len(images) / (time.perf_counter() - start)


def main():
    common.set_threads()
    start = common.header("pretokenize vs bare encoder (CPU)")
    vae = DiscreteVAE(**VAE).eval()
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp))
        encoder = bare_encoder_rate(vae, shards)
        began = time.perf_counter()
        summary = pretokenize([str(s) for s in shards], vae, Path(tmp) / "tokens", batch_size=BATCH, progress=False)
        job = summary.samples / (time.perf_counter() - began)
        for index in range(2):  # scaling: two jobs on disjoint halves, one after the other here
            pretokenize([str(s) for s in shards], vae, Path(tmp) / "two", job_index=index, num_jobs=2,
                        batch_size=BATCH, progress=False)
        same = all((Path(tmp) / "tokens" / s.name).read_bytes() == (Path(tmp) / "two" / s.name).read_bytes()
                   for s in shards)
        encoder = max(encoder, bare_encoder_rate(vae, shards))  # best of a run before and after the job
    common.table(["run", "images/s"], [["bare encoder (decoded images, batch 32; best of 2)", f"{encoder:.1f}"],
                                      ["pretokenize job (tar -> JPEG decode -> encode -> token shards)", f"{job:.1f}"]])
    print(f"VAE {VAE}; {NUM_SHARDS * PER_SHARD} JPEGs of 320x256 resized and cropped to 256")
    print(f"two jobs on disjoint halves wrote {'exactly' if same else 'NOT'} the shards one job wrote")
    ratio = job / encoder
    print(f"pretokenize / bare encoder: {ratio:.0%} (target >= 85%) {'MET' if ratio >= 0.85 else 'MISSED'}")
    common.footer(start)


if __name__ == "__main__":
    main()
