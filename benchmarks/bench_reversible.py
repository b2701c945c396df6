"""Reversible vs plain transformer: peak memory and time of a fwd+bwd step (ours only).

64 text + 32x32 image tokens, batch 4, dim 128, 4 heads x 32. Each measurement runs in a fresh
process (this script re-invoked with --measure), so that peaks don't pollute each other: peak
memory = rise of the process's peak RSS (ru_maxrss) over its RSS just before the first step,
which covers activations, autograd buffers and the parameters' gradients.

Two processes per row. "tensor peak": glibc malloc with a fixed 64 KiB mmap threshold
(MALLOC_MMAP_THRESHOLD_), so every tensor buffer is mmapped and unmapped when freed and the RSS
peak is the peak of live tensor memory; the targets are judged on it. "RSS peak": the default
allocator, which keeps freed buffers in its heap (what a user's process shows); the step time
is measured in this process, since the fixed threshold slows allocation.

Run: .venv/bin/python benchmarks/bench_reversible.py
Targets at depth 16: reversible peak memory <= 0.3x plain; reversible time <= 1.3x plain.
Reversible memory should stay about flat from depth 4 to depth 16.
"""

import json
import sys

import common

SPEC = dict(dim=128, depth=16, heads=4, dim_head=32, num_text_tokens=1000, text_seq_len=64,
            image_size=256, vae_layers=3, num_image_tokens=1024, batch=4)
CONFIGS = [("plain", 16), ("reversible", 16), ("plain", 4), ("reversible", 4)]
TIMING = dict(warmup=1, repeats=3)


def measure(kind: str, depth: int, timed: bool) -> dict:
    """In a fresh process: peak memory of the first step, then (``timed``) the step time."""
    common.set_threads()
    spec = {**SPEC, "depth": depth}
    model = common.build_ours(spec, reversible=kind == "reversible")
    text, codes = common.make_batch(spec)
    step = common.train_step_fn(model, text, codes)
    peak = common.peak_rss_growth(step)
    return {"peak_bytes": peak, **(common.timeit(step, **TIMING) if timed else {})}


def run_fresh(kind: str, depth: int, tensor_peak: bool) -> dict:
    return common.measure_fresh(__file__, [kind, str(depth), "untimed" if tensor_peak else "timed"], tensor_peak)


def main():
    start = common.header("reversible vs plain: fwd+bwd step, peak memory and time")
    print(f"spec {SPEC} (depth varies); n = {common.seq_len(SPEC)} positions; one fresh process per row")
    mem = {cfg: run_fresh(*cfg, tensor_peak=True)["peak_bytes"] for cfg in CONFIGS}
    rss = {cfg: run_fresh(*cfg, tensor_peak=False) for cfg in CONFIGS}
    sec = {cfg: r["median"] for cfg, r in rss.items()}
    rows = []
    for kind, depth in CONFIGS:
        cfg, plain = (kind, depth), ("plain", depth)
        rows.append([kind, depth, mem[cfg] / 2**20, mem[cfg] / mem[plain], rss[cfg]["peak_bytes"] / 2**20,
                     rss[cfg]["peak_bytes"] / rss[plain]["peak_bytes"], sec[cfg] * 1e3, sec[cfg] / sec[plain]])
    common.table(["stack", "depth", "tensor peak MiB", "vs plain", "RSS peak MiB", "vs plain", "ms/step",
                  "time vs plain"], rows)
    rev, plain = ("reversible", 16), ("plain", 16)
    print(common.verdict("reversible/plain tensor peak at depth 16", mem[rev] / mem[plain], 0.3, False))
    print(common.verdict("reversible/plain step time at depth 16", sec[rev] / sec[plain], 1.3, False))
    print(f"depth 16 / depth 4 tensor peak: reversible {mem[rev] / mem[('reversible', 4)]:.2f}x, "
          f"plain {mem[plain] / mem[('plain', 4)]:.2f}x")
    common.footer(start)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "timed")))
    else:
        main()
