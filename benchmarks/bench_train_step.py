"""Training step (forward + backward + AdamW step) throughput: ours fp32 / bf16 autocast vs the
peer (dalle-pytorch 1.6.6) fp32, plus our MFU.

Run: .venv/bin/python benchmarks/bench_train_step.py   (after bash benchmarks/setup_peer.sh)
Targets: ours fp32 >= 1.4x peer fp32 tokens/s; ours bf16 >= 2.5x peer fp32.
"""

import statistics

import torch

import common
from dalle_ds.training.optim import OptimConfig, build_optimizer

SPEC = dict(dim=256, depth=4, heads=8, dim_head=32, num_text_tokens=1000, text_seq_len=64,
            image_size=128, vae_layers=3, num_image_tokens=1024, batch=8)
TIMING = dict(warmup=2, repeats=5)
ROUNDS = 3  # the peer and ours take turns, so that a noisy spell of a shared machine hits both


def main():
    common.set_threads()
    start = common.header("training step: fwd + bwd + AdamW, codes as input")
    tokens = SPEC["batch"] * common.seq_len(SPEC)
    print(f"spec {SPEC}; {tokens} tokens per step ({common.seq_len(SPEC)} per sample); {ROUNDS} rounds of "
          f"peer then ours, medians of the rounds' medians\n{common.PEER_NOTE}")

    text, codes = common.make_batch(SPEC)
    steps = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = common.build_ours(SPEC)
        opt = build_optimizer(model, OptimConfig(lr=1e-4))  # what our trainers step with
        steps[name] = common.train_step_fn(model, text, codes, opt, autocast_dtype=dtype)
    rounds = []  # per round: median seconds of the peer and of each of ours
    for _ in range(ROUNDS):
        medians = {"peer": common.run_peer("train_step", SPEC, **TIMING)["median"]}
        medians.update({name: common.timeit(step, **TIMING)["median"] for name, step in steps.items()})
        rounds.append(medians)
    peer = statistics.median(r["peer"] for r in rounds)
    ours = {name: statistics.median(r[name] for r in rounds) for name in steps}
    print("fp32 vs peer per round: " + ", ".join(f"{r['peer'] / r['fp32']:.2f}x" for r in rounds))

    flops = common.model_flops(SPEC)
    peaks = {"fp32": common.matmul_peak(torch.float32), "bf16": common.matmul_peak(torch.bfloat16)}
    rows = [["peer fp32", peer * 1e3, tokens / peer, 1.0, "", ""]]
    for name, sec in ours.items():
        mfu = flops / sec / peaks[name]
        rows.append([f"ours {name}", sec * 1e3, tokens / sec, peer / sec, flops / sec / 1e9, f"{100 * mfu:.1f}%"])
    common.table(["run", "ms/step", "tokens/s", "vs peer", "GFLOP/s", "MFU"], rows)
    print(f"model FLOPs/step (ours, see common.model_flops) {flops / 1e9:.2f} G; measured matmul peak "
          f"fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    print(common.verdict("ours fp32 vs peer fp32", peer / ours["fp32"], 1.4))
    print(common.verdict("ours bf16 vs peer fp32", peer / ours["bf16"], 2.5))
    common.footer(start)


if __name__ == "__main__":
    main()
