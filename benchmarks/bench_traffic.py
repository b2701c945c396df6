"""Memory traffic of the 441M train step, counted on any machine: how much of a GPU step its
non-matmul work must take, eagerly and with compiled blocks.

On an H200, the all-full step at the 441M spec ran at 30% MFU, and the cycled step's profile put
half the kernel time outside matmuls and attention: elementwise kernels, norms, casts and
copies, each bound by memory bandwidth rather than arithmetic. Their bytes do not depend on the
device, so this script counts them here: the bytes each operation of one training step (forward
and backward, no optimizer) reads and writes, one pass over each tensor it touches (inputs and
outputs; an in-place one's output counts again as its write), sorted into matmuls, the attention
kernel and the rest. Two precisions: bf16 autocast over fp32 weights (the bare step bench_gpu.py
times), and the weights themselves in bf16 (how train-dalle runs under DeepSpeed's bf16).

- eager: a dispatch mode tallies every operation (views and bare allocations move nothing);
  one layer's traffic is depth 2's minus depth 1's; full attention runs SDPA, as on CUDA (this
  CPU's own full kernel is switched off);
- compiled blocks (``train.compile_blocks``): inductor's byte count of the block's graphs
  (``get_read_write_buffers_sizes``: each buffer a kernel reads or writes, once), compiled for
  depth 1; what lies outside the blocks (embeddings, the heads, the loss) runs eagerly in both.

Then the floor those bytes set at the H200's memory bandwidth, and the MFU a step could reach if
its matmuls and attention ran at the dense bf16 peak and everything else at that bandwidth: the
ceiling that non-matmul traffic leaves. Each count runs in a fresh process (about 150 s for the
six on 2 CPU cores). Counts, not timings: other processes do not change them, and a CUDA
device running the same operations moves the same bytes.

Run: .venv/bin/python benchmarks/bench_traffic.py   (no target: it says what bounds the GPU step)
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import time

import torch

import common
from bench_gpu import PEAK_FLOPS, SPEC as GPU_SPEC
from dalle_ds.training.profiling import TrafficCounter, kind_of, sum_by_kind

SPEC = {**GPU_SPEC, "attn_types": ["full"]}  # the all-full step: its profile is the one to explain
HBM_BYTES_PER_S = 4.8e12  # the H200's memory bandwidth
# autocast dtype of each precision counted; None: the weights themselves in bf16, as train-dalle
# runs under DeepSpeed's bf16 (its ds_configs/*_bf16.json): no autocast casts, bf16 residuals
PRECISIONS = {"bf16 autocast": torch.bfloat16, "bf16 weights": None}
TOP_OPERATIONS = 10


def measure(mode: str, precision: str, depth: int) -> dict:
    """In a fresh process: bytes of one training step, by operation (eager) or of the compiled
    blocks' graphs by kind (compiled). ``precision``: a ``PRECISIONS`` key."""
    common.set_threads()
    from dalle_ds.attention import kernels

    kernels.FULL_KERNEL_MAX_LEN = 0  # SDPA, as on CUDA
    spec = {**SPEC, "depth": depth}
    model = common.build_ours(spec)
    autocast = PRECISIONS[precision]
    if autocast is None:
        model = model.to(torch.bfloat16)
    text, codes = common.make_batch(spec)
    step = common.train_step_fn(model, text, codes, autocast_dtype=autocast)
    if mode == "compiled":
        return _compiled_blocks_bytes(model, step)
    step()  # warm-up: first calls may allocate or cache differently
    with TrafficCounter() as traffic:
        step()
    return dict(traffic.bytes)


def _compiled_blocks_bytes(model, step) -> dict:
    from torch._inductor import metrics
    from torch._inductor.compile_fx import inductor_metrics_log
    from torch._inductor.scheduler import ExternKernelSchedulerNode

    from dalle_ds.training.compile import compile_blocks

    compile_blocks(model.transformer)
    # inductor counts bytes only with its metrics log on, and only when it compiles (not from its cache)
    inductor_metrics_log.setLevel(logging.INFO)
    torch._inductor.config.fx_graph_cache = False
    metrics.reset()
    step()  # compiles the block's forward and backward graphs, each run once at depth 1
    # (node, bytes // 4); a node inductor generated is fused work, "other" whatever it holds
    return sum_by_kind((str(node.node.python_kernel_name) if isinstance(node, ExternKernelSchedulerNode) else "fused",
                        4 * words) for node, words in metrics.nodes_num_elem)


def run_fresh(mode: str, precision: str, depth: int) -> dict:
    return common.measure_fresh(__file__, [mode, precision, str(depth)], tensor_peak=False)


def main():
    common.header("memory traffic of the 441M train step (fwd + bwd), counted")
    began = time.perf_counter()
    depth, flop_time = SPEC["depth"], common.model_flops(SPEC) / PEAK_FLOPS
    print(f"spec {SPEC}; {depth} layers; bytes each operation reads and writes, one pass per tensor; MFU "
          f"ceiling: the model FLOPs at {PEAK_FLOPS / 1e12:.0f} TFLOP/s ({flop_time * 1e3:.1f} ms per step) with "
          f"everything else at {HBM_BYTES_PER_S / 1e12} TB/s")
    rows, layers = [], {}
    for precision in PRECISIONS:
        one, two = run_fresh("eager", precision, 1), run_fresh("eager", precision, 2)
        layers[precision] = layer = {k: two.get(k, 0) - one.get(k, 0) for k in set(one) | set(two)}
        rest = sum_by_kind((k, one[k] - layer.get(k, 0)) for k in one)["other"]  # embeddings, heads, loss
        compiled = run_fresh("compiled", precision, 1)
        for blocks, per_layer in (("eager", sum_by_kind(layer.items())["other"]), ("compiled", compiled["other"])):
            step_other = depth * per_layer + rest
            floor = step_other / HBM_BYTES_PER_S
            rows.append([precision, blocks, per_layer / 2**20, rest / 2**30, step_other / 2**30, floor * 1e3,
                         f"{100 * flop_time / (flop_time + floor):.0f}%"])
    common.table(["precision", "blocks", "other MiB / layer", "outside GiB", "other GiB / step",
                  "ms at bandwidth", "MFU ceiling"], rows)
    print(f"\nthe eager layer's costliest non-matmul operations ({depth} layers' worth, GiB per step):")
    others = collections.Counter()
    for layer in layers.values():
        others.update({k: v for k, v in layer.items() if kind_of(k) == "other"})
    common.table(["operation", *PRECISIONS], [[name, *(depth * layers[p].get(name, 0) / 2**30 for p in PRECISIONS)]
                                             for name, _ in others.most_common(TOP_OPERATIONS)])
    print(f"wall {time.perf_counter() - began:.0f} s (counts: other processes do not change them)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main()
