"""FlexAttention for the sparse patterns: the fused path on CUDA at the training length.

einops legend: b batch, h heads, n sequence, m slots (positions in FlexAttention's order, padding
included), d head dim.

**Tiles.** FlexAttention's cost is the number of (query block, key block) tiles its block mask
visits. In raster order a column pattern touches every earlier row's blocks, and the block-sparse
pattern's summary blocks sit in every tile, so each pattern may lay its image out in another
order (``AttentionPattern.flex_order``); the text may be padded to a whole number of blocks, so
that no tile holds both text and image keys. q, k and v are gathered into that order and the
output is gathered back. ``FlexPlan`` takes, of raster or the pattern's order, padded or not, in
blocks of 128 or 64, the layout whose tiles cover the least area (``benchmarks/bench_tiles.py``
prints each pattern's choice against full causal attention's tiles).

**Compilation.** One compiled ``flex_attention`` serves every layer and pattern:
- batch and heads are dynamic: flex_attention marks the head count static, so heads are folded
  into the batch, which is marked dynamic; a new batch size or head count does not recompile.
  Lengths, head dim and dtype are static, as the kernel is tuned for them;
- a mask rule is a pattern method of its class over integer layout constants, plus a slot table
  (a tensor): dynamo guards on the class and those constants, so each (pattern class, layout)
  compiles once per grad mode, however many layers or models use it;
- the recompile limit is ``RECOMPILE_LIMIT`` for this function alone, and hitting it is an error
  (dynamo would otherwise run flex_attention unfused, materialising every score, with only a
  warning);
- on CUDA it compiles with inductor's ``max_autotune``: the backward's default Triton tiles (64 x
  128 on sm90 at head dim 64) do not divide 64-blocks, and inductor drops every config that does
  not before it applies ``kernel_options``; autotuning offers smaller tiles and times them (tens
  of seconds more per compile, cached on disk by inductor).
``COUNTS`` holds the compiles and the calls that could not use this path (the trainer logs them).
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass

import torch
from torch.nn.attention import flex_attention as _flex

from .patterns import AttentionPattern

MIN_HEAD_DIM = 16  # FlexAttention's CUDA kernel rejects smaller heads
BLOCK_SIZES = (128, 64)  # the candidates; 128 is FlexAttention's default
# Compiled variants allowed: 4 sparse pattern classes x 2 grad modes x 2 dtypes leaves room for a
# second layout (a fine-tuning run at another resolution). Past it: an error, never a slow fallback.
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
    block_size: int
    slots: torch.Tensor | None  # (m,) position held by each slot; -1 = padding
    gather: torch.Tensor | None  # (m,) the row each slot reads: padding reads position 0, masked out
    inverse: torch.Tensor | None  # (n,) slot of each position
    tile_fraction: float  # area of the visited tiles / that of full causal attention's (128 x 128)
    reordered: bool  # the image in the pattern's flex_order (else raster order)
    text_padding: int  # padding slots after the text

    def __str__(self) -> str:
        order = "pattern order" if self.reordered else "raster order"
        return f"{order}, text padding {self.text_padding}, {self.block_size} blocks"

    @property
    def kernel_options(self) -> dict:
        """Triton tiles that divide the block size (forward; the backward's come from autotuning)."""
        if self.block_size >= 128:
            return {}
        names = ("fwd_BLOCK_M", "fwd_BLOCK_N", "bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2")
        return dict.fromkeys(names, self.block_size)

    def attend(self, q, k, v, kernel=None):
        """q, k, v: (b, h, n, d) -> (b, h, n, d). ``kernel(q, k, v, block_mask, kernel_options)``
        attends in slot order, (b*h, 1, m, d); by default the compiled flex_attention."""
        b, h = q.shape[:2]
        if self.gather is not None:
            q, k, v = (x.index_select(2, self.gather) for x in (q, k, v))
        # Heads into the batch (see above), contiguous: dynamo guards on strides, and q, k, v are
        # strided views of one projection (gathered ones are contiguous already).
        q, k, v = (x.flatten(0, 1).contiguous().unsqueeze(1) for x in (q, k, v))
        out = (kernel or compiled_flex)(q, k, v, self.block_mask, self.kernel_options)
        if self.inverse is not None:
            out = out.index_select(2, self.inverse)
        return out.view(b, h, *out.shape[2:])


def pattern_attention(pattern: AttentionPattern, q, k, v, kernel=None):
    """FlexAttention of q, k, v (b, h, n, d) under ``pattern``, its plan built once per length and
    device; ``kernel`` as in ``FlexPlan.attend``."""
    n = q.shape[2]
    plan = pattern.derived(("flex_plan", n, q.device), lambda: build_plan(pattern, n, q.device))
    return plan.attend(q, k, v, kernel)


def build_plan(pattern: AttentionPattern, n: int, device) -> FlexPlan:
    """The layout of least visited area; ties go to fewer gathers, then to bigger blocks."""
    return min(candidate_plans(pattern, n, device), key=lambda plan: plan.tile_fraction)


def candidate_plans(pattern: AttentionPattern, n: int, device) -> list[FlexPlan]:
    """Raster or the pattern's order, text padded or not, each block size: simplest first."""
    causal = _area(_flex.create_block_mask(_causal, None, None, n, n, device=device))
    order = pattern.flex_order()
    plans = []
    for image_order in (None, order) if order is not None else (None,):
        for pad_text in (False, True):
            for block in BLOCK_SIZES:
                if pad_text and pattern.layout.text_len % block == 0:
                    continue  # the text fills whole blocks: the same as unpadded
                padding = (-pattern.layout.text_len) % block if pad_text else 0
                slots = _slots(pattern, n, image_order, padding)
                gathers = _gathers(slots, n, device)
                mask = _block_mask(pattern, gathers[0], n, block, device)
                plans.append(FlexPlan(mask, block, *gathers, _area(mask) / causal, image_order is not None, padding))
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


def _block_mask(pattern: AttentionPattern, slots, n: int, block: int, device) -> _flex.BlockMask:
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
    return _flex.create_block_mask(mask_mod, None, None, m, m, device=device, BLOCK_SIZE=block)


def _causal(b, h, q, k):
    return k <= q


def _area(block_mask: _flex.BlockMask) -> int:
    """Query-key pairs in the tiles the mask visits (partial and full)."""
    tiles = block_mask.kv_num_blocks.sum()
    if block_mask.full_kv_num_blocks is not None:
        tiles = tiles + block_mask.full_kv_num_blocks.sum()
    q_block, kv_block = block_mask.BLOCK_SIZE
    return int(tiles) * q_block * kv_block


def _counting_inductor(graph, example_inputs):
    """Inductor, counting its compiles; autotuned on CUDA (see the module's docstring)."""
    COUNTS["compiles"] += 1
    from torch._inductor.compile_fx import compile_fx

    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
    return compile_fx(graph, example_inputs, config_patches={"max_autotune": True} if on_cuda else None)


_compiled = torch.compile(_flex.flex_attention, backend=_counting_inductor, dynamic=None, fullgraph=True)


def compiled_flex(q, k, v, block_mask, kernel_options):
    """flex_attention, compiled once (see the module's docstring); q, k, v: (b*h, 1, m, d)."""
    if torch.compiler.is_compiling():  # traced into a caller's compiled region: fused there
        return _flex.flex_attention(q, k, v, block_mask=block_mask, kernel_options=kernel_options)
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
            return _compiled(q, k, v, block_mask=block_mask, kernel_options=kernel_options)
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


def eager_flex(q, k, v, block_mask, kernel_options):
    """flex_attention uncompiled: it materialises the scores, for tests of the mask only."""
    return _flex.flex_attention(q, k, v, block_mask=block_mask)


def note_unfused(cause: str) -> None:
    """A sparse layer at the training length could not use FlexAttention: counted, warned once per cause."""
    COUNTS["unfused_calls"] += 1
    if cause not in _warned:
        _warned.add(cause)
        warnings.warn(f"sparse attention runs unfused (gathered batched matmuls, much slower than "
                      f"FlexAttention) because {cause}; counted in attention/unfused_calls", stacklevel=3)
