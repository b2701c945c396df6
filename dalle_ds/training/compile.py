"""Regional torch.compile (torchtitan's way): each transformer block compiled on its own, so the
compiler fuses its norms, GEGLU, dropouts and residual adds, while the attention call stays
outside the graphs (``kernels.attend`` is ``torch.compiler.disable``: FlexAttention compiles
itself, the CPU kernels are C++). A block is two graphs, before and after that call, since
``Block.forward`` makes the call in its own frame. A switch of train-dalle, off by default: on an
H200 it was slower (benchmarks/bench_gpu.py runs the train step both ways; the README has the
figures).
"""

from __future__ import annotations

import torch

from ..attention.flex import recompile_limit_names

# The blocks share one code object: dynamo keeps an entry per attention pattern x grad mode x
# train/eval (and a dynamic-batch one), more than its default limit of 8.
RECOMPILE_LIMIT = 64


def compile_blocks(transformer: torch.nn.Module) -> None:
    """Compiles each block of a plain (not reversible) Transformer in place."""
    if transformer.reversible:
        raise ValueError("train.compile_blocks compiles plain layers: the reversible stack calls each block's "
                         "branches itself; set model.reversible=false or train.compile_blocks=false")
    limit = recompile_limit_names()[0]
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
    # torch 2.13's AOTAutograd cache, when warm, rebuilds a graph output that aliases an
    # intermediate (q, k, v, views of one projection, before the attention call) with a corrupt
    # shape and fails; the FX graph cache stays on
    torch._functorch.config.enable_autograd_cache = False
    for block in transformer.blocks:
        block.compile()
