"""FlexAttention's work per sparse pattern, on any machine: for every layout
``dalle_ds.attention.flex`` considers, the area of the (query block, key block) tiles its block
mask visits as a fraction of full causal attention's (and the part of it in partial tiles, whose
scores are masked one by one), and its estimated cost (the tiles plus the
gathers into slot order, at head dim 64, in the same unit); the layout of least cost is chosen.

Run: .venv/bin/python benchmarks/bench_tiles.py   (CPU, about 10 s)
Targets (issue 11), on the chosen layout's tiles: each sparse type <= 0.35 at 256 text + 64x64
image, <= 0.5 at 64 text + 32x32.
"""

import common
from dalle_ds.attention import flex
from dalle_ds.attention.patterns import ATTN_TYPES, SequenceLayout, build_pattern

HEAD_DIM = 64
SIZES = [(SequenceLayout(257, 64, 64), 0.35), (SequenceLayout(65, 32, 32), 0.5), (SequenceLayout(257, 32, 32), None)]


def main():
    start = common.header("FlexAttention tiles visited, as a fraction of full causal attention's")
    for layout, target in SIZES:
        n = layout.total_len - 1
        print(f"\n{layout.text_len - 1} text + {layout.grid_h}x{layout.grid_w} image: n = {n}")
        rows, verdicts = [], []
        for name in ATTN_TYPES[1:]:
            pattern = build_pattern(name, layout)
            plans = flex.candidate_plans(pattern, n, HEAD_DIM, "cpu")
            chosen = flex.build_plan(pattern, n, HEAD_DIM, "cpu")
            rows += [[name, str(plan), plan.tile_fraction, plan.partial_fraction, plan.estimated_cost,
                      "<- chosen" if str(plan) == str(chosen) else ""] for plan in plans]
            if target:
                verdicts.append(common.verdict(f"{name} tiles / full causal's", chosen.tile_fraction, target, False))
        common.table(["type", "layout", "tile fraction", "of it partial", "estimated cost", ""], rows)
        print("\n".join(verdicts))
    common.footer(start)


if __name__ == "__main__":
    main()
