"""DALL-E's image head and its loss: the chunked LinearCrossEntropy against nn.Linear followed by
F.cross_entropy on fp32 logits (what the model did before), fwd+bwd, in the same run.

The head alone, at the shape of the 441M spec (dim 1024, 1024 image positions, 8192 codes), batch
4 (the whole model's batch 8 halved for this machine's memory), fp32 and bf16 autocast. Peak
memory is measured in a fresh process per row with every buffer mmapped (see
common.measure_fresh), so it is the peak of live tensors: the logits, their fp32 copy, the
softmax and the gradients, for the plain head.

Run: .venv/bin/python benchmarks/bench_image_head.py
"""

import json
import sys

import torch
import torch.nn.functional as F

import common

SHAPE = dict(batch=4, positions=1024, dim=1024, vocab=8192)
ROWS = [("plain", "fp32"), ("chunked", "fp32"), ("plain", "bf16"), ("chunked", "bf16")]


def step_fn(kind: str, dtype: str):
    from dalle_ds.models.linear_cross_entropy import LinearCrossEntropy

    torch.manual_seed(0)
    b, n, d, v = (SHAPE[k] for k in ("batch", "positions", "dim", "vocab"))
    head = LinearCrossEntropy(d, v)
    h = torch.randn(b, n, d, requires_grad=True)
    targets = torch.randint(0, v, (b, n))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            if kind == "chunked":
                loss = head(h, targets)
            else:
                loss = F.cross_entropy(head(h).flatten(0, 1).float(), targets.flatten())
        loss.backward()

    return step


def measure(kind: str, dtype: str, timed: bool) -> dict:
    common.set_threads()
    step = step_fn(kind, dtype)
    peak = common.peak_rss_growth(step)
    return {"peak_bytes": peak, **(common.timeit(step, warmup=1, repeats=5) if timed else {})}


def main():
    start = common.header("image head: chunked linear + cross-entropy vs linear then cross-entropy")
    print(f"shape {SHAPE}; one fresh process per row and measure")
    mem = {row: common.measure_fresh(__file__, [*row, "untimed"], tensor_peak=True)["peak_bytes"] for row in ROWS}
    sec = {row: common.measure_fresh(__file__, [*row, "timed"], tensor_peak=False)["median"] for row in ROWS}
    rows = []
    for kind, dtype in ROWS:
        plain = ("plain", dtype)
        rows.append([kind, dtype, mem[(kind, dtype)] / 2**20, mem[(kind, dtype)] / mem[plain],
                     sec[(kind, dtype)] * 1e3, sec[(kind, dtype)] / sec[plain]])
    common.table(["head", "dtype", "tensor peak MiB", "vs plain", "ms fwd+bwd", "time vs plain"], rows)
    common.footer(start)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[2], sys.argv[3], sys.argv[4] == "timed")))
    else:
        main()
