"""The host's time per training step: the 441M spec's layers (depth 24, 16 heads, 275 trained
parameter tensors, attention cycled full/axial_row/axial_col/conv_like) at toy widths and
lengths, so that the arithmetic is next to nothing and what is left is Python, dispatch and
per-tensor work.

Rows: the bare step (forward, backward, fused AdamW; fp32, bf16 autocast, and bf16 autocast with
``train.compile_blocks``), then `train-dalle` itself under each DeepSpeed config, and under ZeRO-2
bf16 with DeepSpeed's own per-tensor gradient checks and, separately, with compiled blocks (one
process; the median of its logging intervals). Then a second table: the operations
that compute in one step and in its optimizer step (``profiling.ComputeCounter``). On a GPU,
a step whose host time exceeds its kernels' time leaves the device idle, and every host-device
sync in a step (the loss check, DeepSpeed's overflow and norm checks) exposes the host work after
it; on the H200, train-dalle ran at 59k tokens/s where the bare step ran at 83k (README, "On a
GPU").

Run: .venv/bin/python benchmarks/bench_host_overhead.py   (no target: it says where host time goes)
"""

import statistics
import tempfile
from pathlib import Path

import torch

import common
from bench_train_dalle import overrides, prepare, train
from dalle_ds.training.compile import compile_blocks
from dalle_ds.training.optim import OptimConfig, build_optimizer

SPEC = dict(dim=64, depth=24, heads=16, dim_head=4, num_text_tokens=1000, text_seq_len=8, image_size=32,
            vae_layers=3, num_image_tokens=64, batch=1, attn_types=["full", "axial_row", "axial_col", "conv_like"])
STEPS, LOG_EVERY, SKIPPED = 100, 10, 2  # the median interval after the first SKIPPED (start-up)
# train-dalle rows: a ds_config, and config overrides
RUNS = {"zero0": ("zero0", []), "zero1": ("zero1", []), "zero2": ("zero2", []), "zero2_bf16": ("zero2_bf16", []),
        "zero2_bf16, DeepSpeed's own gradient checks": ("zero2_bf16", ["train.fused_grad_checks=false"]),
        "zero2_bf16, compiled blocks": ("zero2_bf16", ["train.compile_blocks=true"])}
ROUNDS = 2


def main():
    common.set_threads()
    start = common.header("host time per training step, at next to no arithmetic")
    model = common.build_ours(SPEC)
    trained = sum(p.requires_grad for p in model.parameters())  # what DeepSpeed handles (the VAE is frozen)
    print(f"spec {SPEC}: {trained} trained parameter tensors; {ROUNDS} rounds, each row's fastest (noise only "
          f"adds time)")
    compiled = common.build_ours(SPEC)
    compile_blocks(compiled.transformer)
    text, codes = common.make_batch(SPEC)
    # label -> (model, its optimizer, autocast dtype)
    bare = {label: (m, build_optimizer(m, OptimConfig(lr=1e-4)), dtype) for label, m, dtype in (
        ("bare step, fp32", model, None), ("bare step, bf16 autocast", model, torch.bfloat16),
        ("bare step, bf16 autocast, compiled blocks", compiled, torch.bfloat16))}
    ms: dict[str, float] = {}
    tokens = common.seq_len(SPEC) * SPEC["batch"]  # per step, as train-dalle counts them
    # peak_flops given: no matmul benchmark at start (MFU means nothing here)
    args = [*overrides(SPEC, STEPS, LOG_EVERY), "data.num_workers=1", "logging.peak_flops=1e12"]

    def record(label: str, value: float) -> None:
        ms[label] = min(value, ms.get(label, value))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, image_size=SPEC["image_size"], num_layers=SPEC["vae_layers"], num_tokens=SPEC["num_image_tokens"])
        for _ in range(ROUNDS):
            for label, (m, optimizer, dtype) in bare.items():
                step = common.train_step_fn(m, text, codes, optimizer, autocast_dtype=dtype)
                record(label, common.timeit(step, warmup=3, repeats=20)["median"] * 1e3)
            for label, (ds_config, extra) in RUNS.items():
                metrics = train(root, 1, ds_config, [*args, *extra])[SKIPPED:]
                record(f"train-dalle, {label}", statistics.median(tokens / m["perf/tokens_per_s"] * 1e3 for m in metrics))
    reference = ms["bare step, fp32"]
    common.table(["run", "ms/step", "over the bare fp32 step"], [[label, t, t - reference] for label, t in ms.items()])
    print("\noperations that compute (kernel launches on a GPU), one step:")
    common.table(["run", "per step", "in its optimizer step"], operations(text, codes))
    common.footer(start)


def operations(text, codes) -> list[list]:
    """Operations that compute in a step, and in its optimizer step: the bare bf16-autocast step
    (fused AdamW, no clipping) and DeepSpeed's ZeRO-2 bf16 engine, with the fused gradient checks
    and with its own. Run last: it starts a process group in this process, whose address the
    train-dalle runs would inherit."""
    from dalle_ds.config import BatchLayout
    from dalle_ds.distributed import DistEnv
    from dalle_ds.training.engine import build_engine, init_distributed, load_ds_config
    from dalle_ds.training.profiling import ComputeCounter

    def count(forward_backward, step) -> list[int]:
        forward_backward()
        step()  # the first step builds state
        with ComputeCounter() as whole:
            forward_backward()
            with ComputeCounter() as stepping:
                step()
        return [whole.count, stepping.count]

    init_distributed(DistEnv())
    optim = OptimConfig(lr=1e-4, total_steps=STEPS)
    model = common.build_ours(SPEC)
    optimizer = build_optimizer(model, optim)

    def bare():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(text, codes, return_loss=True)
        loss.backward()

    rows = [["bare step, bf16 autocast", *count(bare, lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))]]
    for label, fused in (("fused gradient checks", True), ("DeepSpeed's own gradient checks", False)):
        engine, _ = build_engine(common.build_ours(SPEC), load_ds_config("ds_configs/zero2_bf16.json"),
                                 BatchLayout(SPEC["batch"], 1, 1), optim, fused_grad_checks=fused)
        rows.append([f"DeepSpeed ZeRO-2 bf16, {label}",
                     *count(lambda: engine.backward(engine(text, codes, return_loss=True)), engine.step)])
    return rows


if __name__ == "__main__":
    main()
