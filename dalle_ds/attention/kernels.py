"""Attention kernels for the patterns in ``patterns.py``, and the dispatch between them.

einops legend: b batch, h heads, n sequence, d head dim; in the grouped kernel g groups of a
bucket, q queries per group, s keys per group, a keys every query of the bucket is scored
against (its shared keys).

Paths, chosen automatically by ``attend``:
- full pattern: fused causal SDPA (flash kernel on CPU and CUDA), except on CPU up to
  ``FULL_KERNEL_MAX_LEN`` positions, where the fused C++ kernel (``native.py``) runs it faster;
- sparse pattern, CUDA, training length, no dropout, head dim >= 16: FlexAttention with a block
  mask, compiled (``flex.py``), or where ``SPLIT_DEVICES`` names the device, the flash kernel for
  the text keys and FlexAttention for the image alone (``split.py``); a training-length call on
  CUDA that cannot take either is counted and warned about once per cause;
- sparse pattern otherwise (CPU; on CUDA: prompts of other lengths, dropout, small heads):
  ``gathered_attention``, whose cost follows density: the fused C++ CPU kernel (``native.py``)
  where it can run, else batched matmuls (any device);
- incremental decoding (KV cache): SDPA over the cache with the pattern's mask rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import flex, native, split
from .patterns import AttentionPattern

# Full attention runs the fused CPU kernel (blockwise: FullPattern.groups) up to this many positions:
# fwd+bwd against torch's CPU flash SDPA (2 threads) it took 0.5x the time at 320 positions
# (head dim 32), 0.65-0.8x at 1088-1280, about the same at 2192, 1.03-1.25x at 4352; at the
# demo's 160 positions on one thread per rank, 0.8x.
FULL_KERNEL_MAX_LEN = 1536
# Devices where a sparse layer at the training length runs FlexAttention (``flex.py``). CPU has
# no FlexAttention backward; the tests add it to run the compiled forward there.
FLEX_DEVICES = ("cuda",)
# Of those, devices where it runs as ``split.py``'s two kernels (flash for the text keys,
# FlexAttention for the image alone) instead of one FlexAttention call: none until a GPU has
# measured it faster (benchmarks/bench_gpu.py times both).
SPLIT_DEVICES: tuple[str, ...] = ()
# The batched path splits big buckets into chunks of at most this many scores per head. Smaller
# temporaries are reused by the allocator instead of being mapped afresh (page faults) on every
# call, and a chunk's scores stay nearer the cache: 2**15 measured best (benchmarks/bench_attention.py).
# The fused kernel keeps each group's scores in cache anyway: its plan has one chunk per bucket.
_SCORES_PER_CHUNK = 1 << 15


def _bias(pattern: AttentionPattern, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Additive mask (0 or -inf) of query positions ``q_pos[..., None]`` against key positions
    ``k_pos[..., None, :]``; -1 entries are padding (padded keys are never seen)."""
    q_pos = torch.where(q_pos >= 0, q_pos, pattern.layout.total_len)  # a padded query: after all
    allowed = pattern.allowed(q_pos[..., None], k_pos[..., None, :]) & (k_pos >= 0)[..., None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def _clamped(positions: torch.Tensor, n: int) -> torch.Tensor:
    """Positions as gather indices into a length-n prefix. Padding and positions past the prefix
    may point at any row: such keys are masked by the bias or seen only by queries past the
    prefix, whose outputs are dropped (their gradients are zero)."""
    return positions.clamp(0, n - 1)


class _Chunk:
    """Sequence positions of some groups of one bucket: queries (g, q) and keys (g, s), scored
    under ``bias`` (g, q, s, fp32; ``bias_t`` is its (g, s, q) transpose); -1 = padding."""

    def __init__(self, pattern: AttentionPattern, queries, keys, device):
        self.shape = (*queries.shape, keys.shape[1])  # (g, q, s)
        self.bias = _bias(pattern, queries, keys).float().to(device)
        self.bias_t = self.bias.transpose(1, 2).contiguous()
        self.queries, self.keys = queries.contiguous().to(device), keys.contiguous().to(device)

    def positions(self, n: int):
        """Query and key positions, flattened, as gather indices into a length-n prefix."""
        return _clamped(self.queries.flatten(), n), _clamped(self.keys.flatten(), n)

    def live(self, n: int) -> torch.Tensor | None:
        """Rows of the chunk's queries that are real positions of a length-n prefix (None: all)."""
        queries = self.queries.flatten()
        live = (queries >= 0) & (queries < n)
        return None if live.all() else live.nonzero().squeeze(1)


class GroupPlan:
    """The pattern's buckets in sequence positions, each as (shared key positions (a,), chunks):
    the text queries first, as one causal group with no shared keys; image buckets share the
    text, then their shared image keys, unmasked. With ``split``, big buckets are split into
    chunks of at most ``_SCORES_PER_CHUNK`` scores per head (for the batched path)."""

    def __init__(self, pattern: AttentionPattern, device: torch.device, split: bool):
        t = pattern.layout.text_len
        buckets = pattern.groups()
        _check_coverage(pattern, buckets)
        text = torch.arange(t)[None]
        self.buckets = [(torch.zeros(0, dtype=torch.long, device=device), [_Chunk(pattern, text, text, device)])]
        for bucket in buckets:
            shared = torch.cat([torch.arange(t), bucket.shared + t]).to(device)
            lq, ls = bucket.queries.shape[1], bucket.keys.shape[1]
            step = max(1, _SCORES_PER_CHUNK // (lq * (len(shared) + ls))) if split else len(bucket.queries)
            queries, keys = _shift(bucket.queries, t), _shift(bucket.keys, t)
            chunks = [_Chunk(pattern, queries[i : i + step], keys[i : i + step], device)
                      for i in range(0, len(queries), step)]
            self.buckets.append((shared, chunks))
        # the fused kernel's arguments: per chunk, its shared keys, queries, keys, bias and bias^T
        pairs = [(shared, chunk) for shared, chunks in self.buckets for chunk in chunks]
        self.native_chunks = ([shared for shared, _ in pairs], *(
            [getattr(chunk, name) for _, chunk in pairs] for name in ("queries", "keys", "bias", "bias_t")))


def _shift(index: torch.Tensor, t: int) -> torch.Tensor:
    """Image indices -> sequence positions, keeping -1 padding."""
    return torch.where(index >= 0, index + t, -1)


def _check_coverage(pattern: AttentionPattern, buckets) -> None:
    """Internal invariant, for exactness: every image query sits in exactly one group; a group's
    keys and its bucket's shared keys hold no key twice (a key held twice would be counted twice
    in the softmax); every image key a query may see is in one of them, and every shared key is
    seen by all of the bucket's queries (shared keys are scored unmasked)."""
    n_img, t = pattern.layout.image_len, pattern.layout.text_len
    needed = pattern.dense_mask()[t:, t:]
    covered = torch.zeros(n_img + 1, n_img + 1, dtype=torch.bool)  # row/col n_img: padding
    queries_seen = torch.zeros(n_img, dtype=torch.long)
    for bucket in buckets:
        queries, keys, shared = bucket.queries, bucket.keys, bucket.shared
        for group_keys in keys:
            held = torch.cat([group_keys[group_keys >= 0], shared])
            assert len(held.unique()) == len(held), f"{pattern.name} holds a key twice for one group"
        lq, ls = queries.shape[1], keys.shape[1]
        covered[queries[:, :, None].expand(-1, -1, ls), keys[:, None, :].expand(-1, lq, -1)] = True
        real = queries[queries >= 0]
        queries_seen.index_add_(0, real, torch.ones_like(real))
        covered[real[:, None], shared[None, :]] = True
        assert needed[real[:, None], shared[None, :]].all(), f"{pattern.name} shares keys some queries may not see"
    assert (queries_seen == 1).all(), f"{pattern.name} groups do not hold every image query exactly once"
    assert not (needed & ~covered[:n_img, :n_img]).any(), f"{pattern.name} groups miss allowed keys"


def _rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of x (b, h, n, d) at ``positions`` -> (b * h, len(positions), d)."""
    return x.index_select(2, positions).flatten(0, 1)


# A bucket's scores are one (b*h, g, q, a + s) tensor: column j < a is shared key j, the rest the
# group's own keys. These three products are the forward's and the backward's matmuls alike.

def _scores(x, shared, grouped, shape, bias=None):
    """x (bh, g*q, d) against [shared (bh, a, d) | grouped (bh, g*s, d)] -> (bh, g, q, a + s),
    plus ``bias`` (g, q, s) on the grouped part."""
    (g, lq, ls), (bh, a, d) = shape, shared.shape
    out = x.new_empty(bh, g, lq, a + ls)
    torch.bmm(x, shared.transpose(1, 2), out=out.view(bh, g * lq, a + ls)[..., :a])
    # a batched matmul into a strided output falls back to one gemm per matrix: it is copied
    # there instead, in the same pass as the bias is added
    grouped_scores = torch.bmm(x.view(bh * g, lq, d), grouped.view(bh * g, ls, d).transpose(1, 2)).view(bh, g, lq, ls)
    if bias is None:
        out[..., a:] = grouped_scores
    else:
        torch.add(grouped_scores, bias, out=out[..., a:])
    return out


def _weighted(w, shared, grouped, shape):
    """Weights w (bh, g, q, a + s) times [shared | grouped] values -> (bh, g*q, d)."""
    (g, lq, ls), (bh, a, d) = shape, shared.shape
    out = torch.bmm(w.view(bh, g * lq, a + ls)[..., :a], shared)
    grouped_part = torch.bmm(w.view(bh * g, lq, a + ls)[..., a:], grouped.view(bh * g, ls, d))
    return out.add_(grouped_part.view(bh, g * lq, d))


def _weighted_t(w, x, shape):
    """Transposed: weights w (bh, g, q, a + s) times rows x (bh, g*q, d) -> shared (bh, a, d),
    grouped (bh, g*s, d)."""
    (g, lq, ls), (bh, _, d) = shape, x.shape
    a = w.shape[-1] - ls
    shared = torch.bmm(w.view(bh, g * lq, a + ls)[..., :a].transpose(1, 2), x)
    # the grouped part contracts over only q rows: copied contiguous, its gemm runs faster
    grouped_w = w.view(bh * g, lq, a + ls)[..., a:].contiguous()
    grouped = torch.bmm(grouped_w.transpose(1, 2), x.view(bh * g, lq, d))
    return shared, grouped.view(bh, g * ls, d)


class _GroupedAttention(torch.autograd.Function):
    """Exact attention of every query over its bucket's shared and group keys, under one softmax.

    The backward is written out (FlashAttention's: dS = P * (dP - rowsum(dO * O))) so that each
    gradient is written once, where autograd would zero-fill and add a full-size tensor for every
    slice and gather. Runs in the inputs' dtype, the softmax in at least fp32.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: GroupPlan, dropout_p: float):
        b, h, n, d = q.shape
        result = q.new_empty(b, h, n, d)
        saved = []
        with torch.autocast(q.device.type, enabled=False):
            for shared, chunks in plan.buckets:
                a_pos = _clamped(shared, n)
                k_shared, v_shared = _rows(k, a_pos), _rows(v, a_pos)  # gathered once for all chunks
                for chunk in chunks:
                    q_pos, k_pos = chunk.positions(n)
                    x = _rows(q, q_pos).mul_(d**-0.5)
                    keys, values = (k_shared, _rows(k, k_pos)), (v_shared, _rows(v, k_pos))
                    scores = _scores(x, *keys, chunk.shape, chunk.bias)
                    p = scores.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
                    # drawn in fp32: bf16 uniforms come in steps of 1/256, which would bias the keep rate
                    keep = torch.rand(p.shape, device=p.device) >= dropout_p if dropout_p else None
                    out = _weighted(_dropped(p, keep, dropout_p), *values, chunk.shape)
                    saved += [x, *keys, *values, p, keep, out]
                    live = chunk.live(n)  # every position is one chunk's live row: written once
                    rows, positions = (out, q_pos) if live is None else (out[:, live], q_pos[live])
                    result.index_copy_(2, positions, rows.view(b, h, -1, d))
        ctx.plan, ctx.dropout_p = plan, dropout_p
        ctx.save_for_backward(*saved)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        n, d = grad.shape[2:]
        saved = iter(ctx.saved_tensors)
        dq, dk, dv = (grad.new_zeros(grad.shape) for _ in range(3))
        with torch.autocast(grad.device.type, enabled=False):
            for shared, chunks in ctx.plan.buckets:
                a_pos = _clamped(shared, n)
                for chunk in chunks:
                    x, k_shared, k_grouped, v_shared, v_grouped, p, keep, out = (next(saved) for _ in range(8))
                    q_pos, k_pos = chunk.positions(n)
                    g, lq, _ = chunk.shape
                    d_out = _rows(grad, q_pos)
                    live = chunk.live(n)
                    if live is not None:  # rows that never reached the output get no gradient
                        d_out = torch.zeros_like(d_out).index_copy_(1, live, d_out[:, live])
                    delta = torch.linalg.vecdot(d_out, out).view(-1, g, lq, 1)
                    d_p = _dropped(_scores(d_out, v_shared, v_grouped, chunk.shape), keep, ctx.dropout_p)
                    d_scores = d_p.sub_(delta).mul_(p)
                    _scatter(dq, [q_pos], [_weighted(d_scores, k_shared, k_grouped, chunk.shape).mul_(d**-0.5)])
                    _scatter(dk, [a_pos, k_pos], _weighted_t(d_scores, x, chunk.shape))
                    _scatter(dv, [a_pos, k_pos], _weighted_t(_dropped(p, keep, ctx.dropout_p), d_out, chunk.shape))
        return dq, dk, dv, None, None


def _dropped(p, keep, dropout_p):
    """Attention weights after dropout (``keep``: the mask drawn in forward, or None)."""
    return p if keep is None else p * keep / (1 - dropout_p)


def _scatter(grad, positions, parts):
    """Add each part's rows (b*h, m, d) into grad (b, h, n, d) at its positions (m,)."""
    for pos, part in zip(positions, parts):
        grad.index_add_(2, pos, part.view(*grad.shape[:2], -1, grad.shape[-1]))


class _FusedGroupedAttention(torch.autograd.Function):
    """The attention of ``_GroupedAttention``, by the fused CPU kernel (``native.py``): each
    group's scores are made and used while in cache, and the backward recomputes them from the
    saved log-sum-exp instead of keeping them. fp32 or bf16, softmax and gradients in fp32; no
    dropout."""

    @staticmethod
    def forward(ctx, q, k, v, plan: GroupPlan):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        native.ops().grouped_forward(q, k, v, *plan.native_chunks, out, lse)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        # every query's gradient row is written once (queries sit in exactly one group); keys add up
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk, dv = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) for _ in range(2))
        native.ops().grouped_backward(grad, q, k, v, out, lse, *ctx.plan.native_chunks, dq, dk, dv)
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None


def gathered_attention(pattern: AttentionPattern, q, k, v, dropout_p: float = 0.0, fused: bool | None = None):
    """Exact attention for a pattern with key groups over a prefix of the sequence (n <= total_len).

    Queries are gathered into their pattern's groups; each group scores its queries against the
    text and its bucket's shared image keys and against the group's own keys under its mask, in
    one softmax. Text queries are one causal group. q, k, v: (b, h, n, d).

    ``fused``: run the fused CPU kernel (True), the batched-matmul path (False), or the kernel
    wherever it can (None: CPU, fp32 or bf16, no dropout, kernel built; see ``native.usable``).
    """
    if q.shape[2] > pattern.layout.total_len:
        raise ValueError(f"{q.shape[2]} positions for a {pattern.name} pattern of {pattern.layout.total_len}: "
                         f"the sequence must not be longer than text_len + image tokens")
    if q.shape[2] <= pattern.layout.text_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if fused and not native.usable(q, dropout_p):
        raise ValueError(f"fused=True needs CPU fp32 or bf16 inputs without dropout and a built kernel "
                         f"(see dalle_ds/attention/native.py); got {q.device} {q.dtype}, dropout {dropout_p}")
    fused = native.usable(q, dropout_p) if fused is None else fused
    plan = pattern.derived(("plan", q.device, fused), lambda: GroupPlan(pattern, q.device, split=not fused))
    if fused:
        return _FusedGroupedAttention.apply(q, k, v, plan)
    return _GroupedAttention.apply(q, k, v, plan, dropout_p)


def dense_reference_attention(pattern: AttentionPattern, q, k, v, dropout_p: float = 0.0):
    """SDPA with the pattern's full (n, n) mask: the reference the fast paths are tested against."""
    mask = pattern.dense_mask(q.shape[2], device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def decode_attention(pattern: AttentionPattern, q, k, v, start: int):
    """Queries at positions [start, start + nq) against cached keys [0, start + nq)."""
    nq, nk = q.shape[2], k.shape[2]
    if nq == 1 and not pattern.sparse:
        return F.scaled_dot_product_attention(q, k, v)
    mask = dense_mask_on(pattern, q.device)[start : start + nq, :nk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def dense_mask_on(pattern: AttentionPattern, device) -> torch.Tensor:
    """The pattern's (total_len, total_len) bool mask on ``device``, built once: decoding's rows."""
    return pattern.derived(("dense_mask", torch.device(device)), lambda: pattern.dense_mask(device=device))


# Dynamo stays out of attention (0.5 us a call in eager): FlexAttention compiles itself (flex.py)
# and the CPU kernels are C++ ops it cannot trace, so a compiled region around a block
# (train.compile_blocks) ends its graph here and resumes after.
@torch.compiler.disable
def attend(pattern: AttentionPattern, q, k, v, *, start: int = 0, dropout_p: float = 0.0):
    """Pattern attention for queries at positions [start, start + nq); k, v cover [0, start + nq).

    q: (b, h, nq, d); k, v: (b, h, start + nq, d) -> (b, h, nq, d).
    """
    if start > 0:
        return decode_attention(pattern, q, k, v, start)
    if not pattern.sparse:
        if q.shape[2] <= FULL_KERNEL_MAX_LEN and native.usable(q, dropout_p):
            return gathered_attention(pattern, q, k, v, fused=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    # Flex only at the training length: each new length would recompile it (prompts vary).
    if q.device.type in FLEX_DEVICES and q.shape[2] == pattern.layout.total_len - 1:
        cause = _flex_unusable(q, dropout_p)
        if cause is None:
            if q.device.type in SPLIT_DEVICES and split.usable(q):
                return split.split_attention(pattern, q, k, v)
            return flex.pattern_attention(pattern, q, k, v)
        flex.note_unfused(cause)
    return gathered_attention(pattern, q, k, v, dropout_p)


def _flex_unusable(q, dropout_p: float) -> str | None:
    """Why FlexAttention cannot run these inputs (None: it can)."""
    if dropout_p > 0:
        return f"attention dropout is on ({dropout_p}; FlexAttention has none): set attn_dropout=0 for speed"
    if q.shape[-1] < flex.MIN_HEAD_DIM:
        return f"the head dim {q.shape[-1]} is below FlexAttention's minimum of {flex.MIN_HEAD_DIM}"
    return None
