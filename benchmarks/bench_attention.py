"""Attention types at 64 text + 32x32 image tokens: whole-model fwd+bwd (return_loss) and
attention-only fwd+bwd, ours per type vs the peer's (dalle-pytorch 1.6.6) full attention.

Run: .venv/bin/python benchmarks/bench_attention.py   (after bash benchmarks/setup_peer.sh)
Targets: our full >= 2x faster than the peer's full; each sparse type <= 0.35x our full.
The whole model spends most of its time outside attention (projections, feed-forward, logits),
so the sparse target is judged on the attention-only timing; both are printed. Attention alone
runs in rounds of every type; a type's ratio to our full is the median of its rounds' ratios.
The rounds also time each sparse type's batched-matmul CPU path (what runs without the fused
kernel), for the kernel's gain in the same run.
"""

import statistics

import common
from dalle_ds.attention.kernels import attend, gathered_attention
from dalle_ds.attention.patterns import ATTN_TYPES, SequenceLayout, build_pattern
from dalle_ds.models.transformer import Attention

SPEC = dict(dim=256, depth=2, heads=8, dim_head=32, num_text_tokens=1000, text_seq_len=64,
            image_size=256, vae_layers=3, num_image_tokens=1024, batch=2)
ATTN_ONLY = dict(heads=8, dim_head=64)  # q, k, v: (batch, 8, n, 64)
TIMING = dict(warmup=1, repeats=3)
ATTN_TIMING = dict(warmup=2, repeats=5)
ROUNDS = 3  # attention alone: every type once per round, so that a noisy spell hits all of them


def ours_attention_only(name: str, batched: bool = False):
    """fwd+bwd step of attention alone with the ``name`` pattern (``batched``: the CPU path's
    batched-matmul implementation instead of the automatic choice)."""
    g = common.grid(SPEC)
    pattern = build_pattern(name, SequenceLayout(SPEC["text_seq_len"] + 1, g, g))
    heads, dim_head = ATTN_ONLY["heads"], ATTN_ONLY["dim_head"]
    attn = Attention(heads * dim_head, heads, dim_head)

    def kernel(q, k, v, dropout_p):
        if batched:
            return gathered_attention(pattern, q, k, v, dropout_p, fused=False)
        return attend(pattern, q, k, v, dropout_p=dropout_p)

    return common.attention_only_fn(attn, heads * dim_head, SPEC["batch"], common.seq_len(SPEC),
                                    lambda a, x: a.out(kernel(*a.qkv(x), dropout_p=a.dropout_p)))


def main():
    common.set_threads()
    start = common.header("attention types: whole model fwd+bwd and attention-only fwd+bwd")
    print(f"spec {SPEC}; n = {common.seq_len(SPEC)} positions; attention-only q,k,v = "
          f"({SPEC['batch']}, {ATTN_ONLY['heads']}, {common.seq_len(SPEC)}, {ATTN_ONLY['dim_head']})\n{common.PEER_NOTE}")
    peer_model = common.run_peer("fwd_bwd", SPEC, **TIMING)["median"]
    peer_attn = common.run_peer("attention_only", SPEC, **ATTN_ONLY, **ATTN_TIMING)["median"]

    text, codes = common.make_batch(SPEC)
    model = {name: common.timeit(common.train_step_fn(common.build_ours(SPEC, attn_types=name), text, codes),
                                 **TIMING)["median"] for name in ATTN_TYPES}
    steps = {name: ours_attention_only(name) for name in ATTN_TYPES}
    steps.update({f"{name} batched": ours_attention_only(name, batched=True) for name in ATTN_TYPES[1:]})
    rounds = [{name: common.timeit(step, **ATTN_TIMING)["median"] for name, step in steps.items()}
              for _ in range(ROUNDS)]
    attn = {name: statistics.median(r[name] for r in rounds) for name in steps}
    ratio = {name: statistics.median(r[name] / r["full"] for r in rounds) for name in steps}

    rows = [["peer full", peer_model * 1e3, 1.0, "", peer_attn * 1e3, 1.0, ""]]
    for name in ATTN_TYPES:
        rows.append([f"ours {name}", model[name] * 1e3, model[name] / peer_model, model[name] / model["full"],
                     attn[name] * 1e3, attn[name] / peer_attn, ratio[name]])
    for name in ATTN_TYPES[1:]:
        batched = f"{name} batched"
        rows.append([f"ours {batched}", "", "", "", attn[batched] * 1e3, attn[batched] / peer_attn, ratio[batched]])
    common.table(["run", "model ms", "vs peer", "vs our full", "attn-only ms", "vs peer", "vs our full"], rows)
    print(common.verdict("whole model: peer full / our full", peer_model / model["full"], 2.0))
    print(common.verdict("attention-only: peer full / our full", peer_attn / attn["full"], 2.0))
    for name in ATTN_TYPES[1:]:
        per_round = ", ".join(f"{r[name] / r['full']:.2f}" for r in rounds)
        print(common.verdict(f"attention-only: our {name} / our full", ratio[name], 0.35, False)
              + f"  (rounds {per_round}; whole model {model[name] / model['full']:.2f}x)")
    common.footer(start)


if __name__ == "__main__":
    main()
