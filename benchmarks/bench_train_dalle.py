"""train-dalle end to end on CPU: tokens/s, MFU and the share of time spent waiting for data, at
ZeRO 0, 2 and 3, with 1 and 2 ranks (each a real DeepSpeed run reading token shards).

Run: .venv/bin/python benchmarks/bench_train_dalle.py
Model: the train-step benchmark's (dim 256, depth 4, 8 x 32 heads, 64 text + 16x16 image
tokens), micro batch 8. Goal: data wait < 2% of step time. Two ranks on this 2-core machine
share the same cores (one thread each), so 2-rank figures show overhead, not scaling.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import common
from dalle_ds import DiscreteVAE
from dalle_ds.data.manifest import ShardRecord, merge_manifest, write_shard_record
from dalle_ds.data.token_shards import TokenSample, TokenShardWriter, codes_dtype
from dalle_ds.data.tokenizer import train_tokenizer
from dalle_ds.models.pretrained import model_fingerprint

ROOT = Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY = 24, 12
SPEC = dict(dim=256, depth=4, heads=8, dim_head=32, text_seq_len=64, batch=8)  # bench_train_step's model
WORDS = "a photo of the red green blue small large round square dog cat tree house car on in".split()


def prepare(root: Path, image_size: int = 128, num_layers: int = 3, num_tokens: int = 1024) -> None:
    """A random dVAE, 4 token shards of 600 samples from it, and a tokenizer of their captions."""
    vae = DiscreteVAE(image_size=image_size, num_layers=num_layers, num_tokens=num_tokens, codebook_dim=64, hidden_dim=16)
    vae.save_pretrained(root / "vae")
    rng, dtype, folder = np.random.default_rng(0), codes_dtype(num_tokens), root / "tokens"
    grid = image_size // 2**num_layers
    folder.mkdir()
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(5, 20))) for _ in range(2_000)]
    for s in range(4):
        writer = TokenShardWriter(folder / f"{s:05d}.tar", dtype)
        for i in range(600):
            writer.write(TokenSample(f"{s}{i:05d}", rng.integers(0, num_tokens, grid**2), captions[(s * 600 + i) % 2000], {}))
        writer.commit()
        write_shard_record(folder, ShardRecord(f"{s:05d}.tar", "bench", 600, bytes=(folder / f"{s:05d}.tar").stat().st_size))
    merge_manifest(folder, dict(vae_fingerprint=model_fingerprint(vae), image_size=image_size, grid_size=grid,
                                num_codes=num_tokens, codes_dtype=dtype.str))
    train_tokenizer(captions, root / "tok.model", 1_000)


def overrides(spec: dict, steps: int, log_every: int) -> list[str]:
    """train-dalle's config overrides for a benchmark spec's model and micro batch: ``steps``
    steps, logged every ``log_every``, no checkpoint but the last, no sample pictures."""
    model = [f"model.{key}={spec[key]}" for key in ("dim", "depth", "heads", "dim_head", "text_seq_len")]
    if "attn_types" in spec:
        model.append(f"model.attn_types={json.dumps(spec['attn_types'])}")
    return [*model, f"train.micro_batch={spec['batch']}", f"train.steps={steps}", f"logging.every_steps={log_every}",
            f"checkpoint.every_steps={10 * steps}", "logging.sample_every_steps=0"]


def train(root: Path, ranks: int, ds_config: str, args: list[str]) -> list[dict]:
    """A fresh run (its folder emptied first) on ``prepare``'s data with
    ``ds_configs/<ds_config>.json`` and the config overrides ``args``; its metrics, a row per
    logging interval."""
    out = root / f"run_{ds_config}_r{ranks}"
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to: a rerun would read the last one's rows
    args = ["--data", str(root / "tokens"), "--tokenizer", str(root / "tok.model"), "--vae", str(root / "vae"),
            "--out", str(out), f"train.deepspeed_config=ds_configs/{ds_config}.json", *args]
    launcher = ([sys.executable, "-m", "dalle_ds.training.train_dalle"] if ranks == 1
                else ["bash", str(ROOT / "launch" / "torchrun.sh"), str(ranks), "train-dalle"])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if ranks == 1:
        env["OMP_NUM_THREADS"] = str(common.THREADS)
    subprocess.run(launcher + args, check=True, env=env, capture_output=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main():
    start = common.header("train-dalle under DeepSpeed: tokens/s, MFU, data wait")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root)
        rows = []
        for ranks in (1, 2):
            for stage in (0, 2, 3):
                run_args = [*overrides(SPEC, STEPS, LOG_EVERY), "data.num_workers=1"]
                m = train(root, ranks, f"zero{stage}", run_args)[-1]  # the second interval: start-up excluded
                rows.append([f"ZeRO-{stage}", ranks, f"{m['perf/tokens_per_s']:,.0f}",
                             f"{m['perf/tokens_per_s_per_device']:,.0f}", f"{100 * m['perf/mfu']:.1f}%",
                             f"{100 * m['perf/data_wait_share']:.2f}%"])
    common.table(["engine", "ranks", "tokens/s", "per rank", "MFU", "data wait"], rows)
    worst = max(float(r[-1].rstrip("%")) for r in rows)
    print(f"data wait: at most {worst:.2f}% of step time (goal < 2%) {'MET' if worst < 2 else 'MISSED'}")
    print("MFU: model FLOPs / the peak each run measured at start (fp32 matmul on its threads)")
    common.footer(start)


if __name__ == "__main__":
    main()
