"""FlexAttention for the sparse patterns: the fused path on CUDA at the training length.

einops legend: b batch, h heads, n sequence, m slots (positions in FlexAttention's order, padding
included), d head dim.

**Layout.** FlexAttention's cost is the number of (query block, key block) tiles its block mask
visits. In raster order a column pattern touches every earlier row's blocks, and the block-sparse
pattern's summary blocks sit in every tile, so each pattern may lay its image out in another
order (``AttentionPattern.flex_order``); the text may be padded to a whole number of blocks, so
that no tile holds both text and image keys. q, k and v are then gathered into that order and the
output back, which costs memory traffic that raster order does not pay. ``FlexPlan`` takes, of
raster or the pattern's order, padded or not, the layout of least estimated time: the area of its
tiles plus its gathers, priced by ``GATHER_COST`` (``benchmarks/bench_tiles.py`` prints each
pattern's choice; ``benchmarks/bench_gpu.py --sections layouts`` times every candidate on a GPU).

**Compilation.** One compiled ``flex_attention`` serves every layer and pattern:
- batch and heads are dynamic: flex_attention marks the head count static, so heads are folded
  into the batch, which is marked dynamic; a new batch size or head count does not recompile.
  Lengths, head dim and dtype are static, as the kernel is tuned for them;
- a mask rule is a pattern method of its class over integer layout constants, plus a slot table
  (a tensor): dynamo guards on the class and those constants, so each (pattern class, layout)
  compiles once per grad mode, however many layers or models use it (``split.py``'s image-alone
  patterns, which also return the log-sum-exp, are layouts of their own);
- the recompile limit is ``RECOMPILE_LIMIT`` for this function alone, and hitting it is an error
  (dynamo would otherwise run flex_attention unfused, materialising every score, with only a
  warning).
``COUNTS`` holds the compiles and the calls that could not use this path (the trainer logs them).
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torch.nn.attention import flex_attention as _flex

from .patterns import AttentionPattern

MIN_HEAD_DIM = 16  # FlexAttention's CUDA kernel rejects smaller heads
# FlexAttention's default block. 64-blocks visit up to a third fewer tiles here, but on an H200
# (torch 2.11, 2026-11-30) each visited score cost 3.5-4x as much, fwd+bwd: they always lost.
BLOCK_SIZE = 128
# The estimated cost of one (position x head-dim) element gathered into slot order and back (q, k,
# v in, the output out, forward and backward), in visited scores (fwd+bwd) of a 128-block tile.
# H200, torch 2.11, bf16: a visited score 6.1 ps fwd+bwd (axial_col in raster order at 1280
# positions, at e8295ba); a forward gather 42 us per (8, 16, 1280, 64) tensor (bench_gpu.py's
# profile, 2026-11-30), and its backward, now a gather too, assumed the same: 32 ps per element
# for the four. So gathering 1280 positions of head dim 64 costs as much as 0.48 of full causal
# attention's tiles: a reordering pays only on long images. bench_gpu.py --sections layouts refits it.
GATHER_COST = 5.3
# Compiled variants allowed: 4 sparse pattern classes x 2 grad modes x 2 dtypes leaves room for a
# second layout (a fine-tuning run at another resolution, or split.py's image-alone patterns beside
# the whole ones, as bench_gpu.py times both). Past it: an error, never a slow fallback.
RECOMPILE_LIMIT = 32
# "compiles": compiled graphs of flex_attention; "unfused_calls": sparse attention calls at the
# training length on a FlexAttention device that took the gathered path instead
COUNTS: collections.Counter = collections.Counter()
_warned: set[str] = set()


@dataclass(frozen=True)
class FlexPlan:
    """A pattern's FlexAttention layout at one length n: the block mask over m slots, and the
    gathers into and out of slot order (None: raster order, no padding, nothing to gather)."""

    block_mask: _flex.BlockMask
    slots: torch.Tensor | None  # (m,) position held by each slot; -1 = padding
    gather: torch.Tensor | None  # (m,) the row each slot reads: padding reads position 0, masked out
    inverse: torch.Tensor | None  # (n,) slot of each position
    tile_fraction: float  # area of the visited tiles / that of full causal attention's
    partial_fraction: float  # the part of tile_fraction in partial tiles (masked score by score)
    estimated_cost: float  # tile_fraction plus the gathers' cost in the same unit (GATHER_COST)
    reordered: bool  # the image in the pattern's flex_order (else raster order)
    text_padding: int  # padding slots after the text

    def __str__(self) -> str:
        return f"{'pattern' if self.reordered else 'raster'} order, text padding {self.text_padding}"

    def attend(self, q, k, v, kernel=None, return_lse: bool = False):
        """q, k, v: (b, h, n, d) -> (b, h, n, d), and with ``return_lse`` each query's log-sum-exp
        of its scores, (b, h, n) fp32, differentiable. ``kernel(q, k, v, block_mask, return_lse)``
        attends in slot order, (b*h, 1, m, d); by default the compiled flex_attention."""
        b, h = q.shape[:2]
        if self.gather is not None:
            q, k, v = (_SlotGather.apply(x, self.gather, self.inverse) for x in (q, k, v))
        # Heads into the batch (see above), contiguous: dynamo guards on strides, and q, k, v are
        # strided views of one projection (gathered ones are contiguous already).
        q, k, v = (x.flatten(0, 1).contiguous().unsqueeze(1) for x in (q, k, v))
        outputs = (kernel or compiled_flex)(q, k, v, self.block_mask, return_lse)
        outputs = outputs if return_lse else (outputs,)  # out (b*h, 1, m, d), lse (b*h, 1, m)
        if self.inverse is not None:
            outputs = [_SlotGather.apply(x, self.inverse, self.gather) for x in outputs]
        outputs = [x.view(b, h, *x.shape[2:]) for x in outputs]
        return tuple(outputs) if return_lse else outputs[0]


class _SlotGather(torch.autograd.Function):
    """``x.index_select(2, index)`` whose backward is ``grad.index_select(2, back)``, not the
    scatter-add index_select's own backward does (atomics: 2.4x the gather's time on an H200).
    Exact for a plan's gathers: each position sits in one slot, and what reaches a padding slot
    (position 0's gradient, on the way back out) stays there, as a padding query sees only
    itself, and is dropped on the way back in."""

    @staticmethod
    def forward(ctx, x, index, back):
        ctx.save_for_backward(back)
        return x.index_select(2, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        return grad.index_select(2, back), None, None


def pattern_attention(pattern: AttentionPattern, q, k, v, kernel=None, return_lse: bool = False):
    """FlexAttention of q, k, v (b, h, n, d) under ``pattern``; ``kernel`` and ``return_lse`` as in
    ``FlexPlan.attend``."""
    return plan_for(pattern, q.shape[2], q.shape[3], q.device).attend(q, k, v, kernel, return_lse)


def plan_for(pattern: AttentionPattern, n: int, head_dim: int, device) -> FlexPlan:
    """``build_plan``'s layout, built once per length, head dim and device."""
    return pattern.derived(("flex_plan", n, head_dim, device), lambda: build_plan(pattern, n, head_dim, device))


def build_plan(pattern: AttentionPattern, n: int, head_dim: int, device) -> FlexPlan:
    """The layout of least estimated cost; ties go to the simpler (fewer gathers)."""
    return min(candidate_plans(pattern, n, head_dim, device), key=lambda plan: plan.estimated_cost)


def candidate_plans(pattern: AttentionPattern, n: int, head_dim: int, device) -> list[FlexPlan]:
    """Raster or the pattern's order, text padded or not: simplest first."""
    causal = causal_area(n, device)
    order = pattern.flex_order()
    plans = []
    for image_order in (None, order) if order is not None else (None,):
        for pad_text in (False, True):
            if pad_text and pattern.layout.text_len % BLOCK_SIZE == 0:
                continue  # the text fills whole blocks: the same as unpadded
            padding = (-pattern.layout.text_len) % BLOCK_SIZE if pad_text else 0
            slots = _slots(pattern, n, image_order, padding)
            gathers = _gathers(slots, n, device)
            mask = _block_mask(pattern, gathers[0], n, device)
            tiles, partial = _area(mask) / causal, _area(mask, partial_only=True) / causal
            cost = tiles + (0.0 if slots is None else GATHER_COST * n * head_dim / causal)
            plans.append(FlexPlan(mask, *gathers, tiles, partial, cost, image_order is not None, padding))
    return plans


def _gathers(slots, n: int, device):
    """(slots, gather, inverse) on the device; all None for the raster layout."""
    if slots is None:
        return None, None, None
    slots = slots.to(device)
    real = (slots >= 0).nonzero().squeeze(1)
    return slots, slots.clamp(min=0), torch.empty(n, dtype=torch.long, device=device).index_copy_(0, slots[real], real)


def _slots(pattern: AttentionPattern, n: int, image_order, padding: int):
    """Positions in slot order: [text | padding | image in ``image_order``]; None for the plain
    raster layout."""
    t = pattern.layout.text_len
    if image_order is None and padding == 0:
        return None
    image = torch.arange(pattern.layout.image_len) if image_order is None else image_order
    image = image[image < n - t] + t  # the training length drops the last image token
    return torch.cat([torch.arange(t), torch.full((padding,), -1), image])


def _block_mask(pattern: AttentionPattern, slots, n: int, device) -> _flex.BlockMask:
    if slots is None:
        def mask_mod(b, h, q, k):
            return pattern.allowed(q, k)
        m = n
    else:
        def mask_mod(b, h, q, k):
            q_pos, k_pos = slots[q], slots[k]
            real = (q_pos >= 0) & (k_pos >= 0)
            # a padding query sees only itself, so that no row is empty; its output is dropped
            return (real & pattern.allowed(q_pos.clamp(min=0), k_pos.clamp(min=0))) | ((q_pos < 0) & (q == k))
        m = len(slots)
    return _flex.create_block_mask(mask_mod, None, None, m, m, device=device, BLOCK_SIZE=BLOCK_SIZE)


def causal_area(n: int, device) -> int:
    """Query-key pairs in the tiles full causal attention visits."""
    return _area(_flex.create_block_mask(_causal, None, None, n, n, device=device, BLOCK_SIZE=BLOCK_SIZE))


def _causal(b, h, q, k):
    return k <= q


def _area(block_mask: _flex.BlockMask, partial_only: bool = False) -> int:
    """Query-key pairs in the tiles the mask visits (partial and full, or partial only)."""
    tiles = block_mask.kv_num_blocks.sum()
    if block_mask.full_kv_num_blocks is not None and not partial_only:
        tiles = tiles + block_mask.full_kv_num_blocks.sum()
    q_block, kv_block = block_mask.BLOCK_SIZE
    return int(tiles) * q_block * kv_block


def _counting_inductor(graph, example_inputs):
    """Inductor, counting its compiles."""
    COUNTS["compiles"] += 1
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph, example_inputs)


_compiled = torch.compile(_flex.flex_attention, backend=_counting_inductor, dynamic=None, fullgraph=True)


def compiled_flex(q, k, v, block_mask, return_lse: bool = False):
    """flex_attention, compiled once (see the module's docstring); q, k, v: (b*h, 1, m, d).
    ``return_lse``: (out, log-sum-exp) instead of out."""
    if torch.compiler.is_compiling():  # traced into a caller's compiled region: fused there
        return eager_flex(q, k, v, block_mask, return_lse)
    for x in (q, k, v):
        torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.mark_static(x, 2)  # a second length is another model: never a dynamic one
    limit, fail, limit_hit = recompile_limit_names()
    try:
        # Explicit for this call, whatever the process sets: the limit, failing at it (suppress_errors
        # may not be on with that), and no automatic dynamic shapes (a second layout would make the
        # block mask's sizes dynamic, as maybe_mark_dynamic does the batch on purpose).
        patch = {limit: RECOMPILE_LIMIT, fail: True, "suppress_errors": False, "automatic_dynamic_shapes": False}
        with torch._dynamo.config.patch(patch):
            return _lse_pair(_compiled(q, k, v, block_mask=block_mask, **_aux(return_lse)))
    except limit_hit as e:
        raise RuntimeError(
            f"FlexAttention was compiled {RECOMPILE_LIMIT} times in this process (dalle_ds.attention.flex."
            f"RECOMPILE_LIMIT); running it uncompiled would materialise every score. More layouts, dtypes or "
            f"patterns than expected are in use: raise RECOMPILE_LIMIT if that is intended") from e


def recompile_limit_names():
    """Dynamo's recompile-limit setting, its fail switch and the exception it raises (torch < 2.6:
    the "cache" names)."""
    if hasattr(torch._dynamo.config, "recompile_limit"):
        return "recompile_limit", "fail_on_recompile_limit_hit", torch._dynamo.exc.FailOnRecompileLimitHit
    return "cache_size_limit", "fail_on_cache_limit_hit", torch._dynamo.exc.FailOnCacheLimitHit


def eager_flex(q, k, v, block_mask, return_lse: bool = False):
    """flex_attention called as it is: traced into a compiled region, fused there; elsewhere it
    materialises the scores (tests of the mask and of the log-sum-exp use it so)."""
    return _lse_pair(_flex.flex_attention(q, k, v, block_mask=block_mask, **_aux(return_lse)))


def _aux(return_lse: bool) -> dict:
    """flex_attention's keywords for the log-sum-exp (none without: the call stays as it was)."""
    return {"return_aux": _flex.AuxRequest(lse=True)} if return_lse else {}


def _lse_pair(result):
    """flex_attention's (out, aux) as (out, lse); a lone out as it is."""
    return (result[0], result[1].lse) if isinstance(result, tuple) else result


def note_unfused(cause: str) -> None:
    """A sparse layer at the training length could not use FlexAttention: counted, warned once per cause."""
    COUNTS["unfused_calls"] += 1
    if cause not in _warned:
        _warned.add(cause)
        warnings.warn(f"sparse attention runs unfused (gathered batched matmuls, much slower than "
                      f"FlexAttention) because {cause}; counted in attention/unfused_calls", stacklevel=3)
