"""Token-shard stream throughput: one reader, batch 64, 32x32 codes + caption tokenization.

Run: .venv/bin/python benchmarks/bench_stream.py
Target: >= 20,000 samples/s from one reader; prints how many workers feed 1,000 samples/s.
"""

import tempfile
import time
from pathlib import Path

import numpy as np

import common
from dalle_ds.data.manifest import ShardRecord, merge_manifest, write_shard_record
from dalle_ds.data.stream import StreamConfig, TokenStream
from dalle_ds.data.token_shards import TokenSample, TokenShardWriter, codes_dtype
from dalle_ds.data.tokenizer import train_tokenizer

NUM_SHARDS, PER_SHARD, GRID, NUM_CODES, TEXT_LEN, BATCH = 8, 2_500, 32, 8192, 64, 64
WORDS = ("a photo of the red green blue small large round square dog cat tree house car on in under "
         "near with by at sunset night beach city old young happy bright dark").split()


def caption(rng) -> str:
    return " ".join(rng.choice(WORDS, size=rng.integers(5, 25)))


def write_folder(folder: Path) -> None:
    rng, dtype = np.random.default_rng(0), codes_dtype(NUM_CODES)
    for s in range(NUM_SHARDS):
        writer = TokenShardWriter(folder / f"{s:05d}.tar", dtype)
        for i in range(PER_SHARD):
            writer.write(TokenSample(f"{s:05d}{i:05d}", rng.integers(0, NUM_CODES, GRID * GRID), caption(rng),
                                     {"source_key": f"{i}", "source_shard": f"{s}.tar"}))
        write_shard_record(folder, ShardRecord(f"{s:05d}.tar", "bench", writer.commit()))
    merge_manifest(folder, dict(vae_fingerprint="0" * 64, image_size=256, grid_size=GRID, num_codes=NUM_CODES,
                                codes_dtype=dtype.str))


def measure(folder, model, workers: int, batches: int) -> float:
    stream = iter(TokenStream(folder, model, TEXT_LEN, StreamConfig(batch_size=BATCH, num_workers=workers)))
    next(stream)  # start-up (worker processes, first shard) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * BATCH / (time.perf_counter() - start)


def main():
    common.set_threads()
    start = common.header("token-shard stream throughput")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tokens"
        folder.mkdir()
        write_folder(folder)
        rng = np.random.default_rng(1)
        model = train_tokenizer((caption(rng) for _ in range(5_000)), Path(tmp) / "tok.model", 1_000)
        batches = NUM_SHARDS * PER_SHARD // BATCH - 20
        rows = [[f"{w} ({'in the training process' if w == 0 else 'worker process'})", measure(folder, model, w, batches)]
                for w in (0, 1)]
    common.table(["readers", "samples/s"], [[name, f"{rate:,.0f}"] for name, rate in rows])
    rate = rows[1][1]
    print(f"{BATCH} per batch, {GRID}x{GRID} codes (uint16), captions of 5-24 words tokenized to {TEXT_LEN}")
    print(f"workers needed for 1,000 samples/s: {max(1, int(np.ceil(1000 / rate)))}")
    print(f"one worker process: {rate:,.0f} samples/s (target >= 20,000) {'MET' if rate >= 20_000 else 'MISSED'}")
    common.footer(start)


if __name__ == "__main__":
    main()
