"""The host's time per training step: the 441M spec's layers (depth 24, 16 heads, 275 parameter
tensors, attention cycled full/axial_row/axial_col/conv_like) at toy widths and lengths, so that
the arithmetic is next to nothing and what is left is Python, dispatch and per-tensor work.

Rows: the bare step (forward, backward, fused AdamW; fp32 and bf16 autocast), then `train-dalle`
itself under each DeepSpeed config (one process; the median of its logging intervals). On a GPU a step
whose host time exceeds its kernels' time leaves the device idle, and every host-device sync in
a step (the loss check, DeepSpeed's overflow and norm checks) exposes the host work after it; on
the H200, train-dalle ran at 59k tokens/s where the bare step ran at 83k (README, "On a GPU").

Run: .venv/bin/python benchmarks/bench_host_overhead.py   (no target: it says where host time goes)
"""

import json
import statistics
import tempfile
from pathlib import Path

import torch

import common
from bench_train_dalle import prepare, train
from dalle_ds.training.optim import OptimConfig, build_optimizer

ATTN_TYPES = ["full", "axial_row", "axial_col", "conv_like"]
SPEC = dict(dim=64, depth=24, heads=16, dim_head=4, num_text_tokens=1000, text_seq_len=8, image_size=32,
            vae_layers=3, num_image_tokens=64, batch=1, attn_types=ATTN_TYPES)
STEPS, LOG_EVERY, SKIPPED = 100, 10, 2  # the median interval after the first SKIPPED (start-up)
DS_CONFIGS = ("zero0", "zero1", "zero2", "zero2_bf16")
ROUNDS = 2


def train_dalle_args() -> list[str]:
    model = {key: SPEC[key] for key in ("dim", "depth", "heads", "dim_head", "text_seq_len")}
    return [*(f"model.{key}={value}" for key, value in model.items()), f"model.attn_types={json.dumps(ATTN_TYPES)}",
            f"train.micro_batch={SPEC['batch']}", "data.num_workers=1", f"train.steps={STEPS}",
            f"logging.every_steps={LOG_EVERY}", "logging.peak_flops=1e12", f"checkpoint.every_steps={10 * STEPS}",
            "logging.sample_every_steps=0"]


def main():
    common.set_threads()
    start = common.header("host time per training step, at next to no arithmetic")
    print(f"spec {SPEC}; {ROUNDS} rounds, each row's fastest (noise only adds time)")
    model = common.build_ours(SPEC)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    text, codes = common.make_batch(SPEC)
    bare = {"bare step, fp32": None, "bare step, bf16 autocast": torch.bfloat16}
    ms: dict[str, float] = {}

    def record(label: str, value: float) -> None:
        ms[label] = min(value, ms.get(label, value))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, image_size=SPEC["image_size"], num_layers=SPEC["vae_layers"], num_tokens=SPEC["num_image_tokens"])
        for _ in range(ROUNDS):
            for label, dtype in bare.items():
                step = common.train_step_fn(model, text, codes, optimizer, autocast_dtype=dtype)
                record(label, common.timeit(step, warmup=3, repeats=20)["median"] * 1e3)
            for ds_config in DS_CONFIGS:
                rates = [m["perf/tokens_per_s"] for m in train(root, 1, ds_config, train_dalle_args())[SKIPPED:]]
                record(f"train-dalle, {ds_config}", common.seq_len(SPEC) * SPEC["batch"] / statistics.median(rates) * 1e3)
    reference = ms["bare step, fp32"]
    common.table(["run", "ms/step", "over the bare fp32 step"], [[label, t, t - reference] for label, t in ms.items()])
    common.footer(start)


if __name__ == "__main__":
    main()
