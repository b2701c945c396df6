"""Attention kernels for the patterns in ``patterns.py``, and the dispatch between them.

einops legend: b batch, h heads, n sequence, d head dim; in ``gathered_attention`` g groups of
a bucket, q queries per group, s image keys per group, a keys every image query is scored
against (the text, then the pattern's shared image keys).

Paths, chosen automatically by ``attend``:
- full pattern: fused causal SDPA (flash kernel on CPU and CUDA);
- sparse pattern, CUDA, training length, no dropout: FlexAttention with a block mask (compiled);
- sparse pattern otherwise: ``gathered_attention``, the CPU path, whose cost follows density;
- incremental decoding (KV cache): SDPA over the cache with the pattern's mask rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as _flex

from .patterns import AttentionPattern

_FLEX_MIN_HEAD_DIM = 16  # FlexAttention's CUDA kernel rejects smaller heads


def _bias(pattern: AttentionPattern, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """Additive mask (0 or -inf) of image queries ``q_idx[..., None]`` against image keys
    ``k_idx[..., None, :]``; -1 entries are padding (padded keys are never seen)."""
    layout = pattern.layout
    q_pos = torch.where(q_idx >= 0, q_idx + layout.text_len, layout.total_len)  # padding: after all
    allowed = pattern.allowed(q_pos[..., None], (k_idx + layout.text_len)[..., None, :]) & (k_idx >= 0)[..., None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


class _Bucket:
    """One bucket of equally shaped groups and its additive mask (g, q, s)."""

    def __init__(self, pattern: AttentionPattern, q_idx: torch.Tensor, k_idx: torch.Tensor, device):
        self.shape = (*q_idx.shape, k_idx.shape[1])  # (g, q, s)
        self.bias = _bias(pattern, q_idx, k_idx).to(device)


class GroupPlan:
    """All buckets of a pattern's groups, gathered with one index per tensor, and the mask of
    the keys every image query is scored against (text, then the pattern's shared image keys)."""

    def __init__(self, pattern: AttentionPattern, device: torch.device):
        groups = pattern.groups()
        n_img = pattern.layout.image_len
        shared = pattern.shared_image_keys()
        _check_coverage(pattern, groups, shared)
        self.buckets = [_Bucket(pattern, q_idx, k_idx, device) for q_idx, k_idx in groups]
        q_flat = torch.cat([q_idx.flatten() for q_idx, _ in groups])
        k_flat = torch.cat([k_idx.flatten() for _, k_idx in groups])
        self.q_index, self.k_index = q_flat.clamp(min=0).to(device), k_flat.clamp(min=0).to(device)
        inverse = torch.empty(n_img, dtype=torch.long)
        inverse[q_flat[q_flat >= 0]] = torch.nonzero(q_flat >= 0).squeeze(1)
        self.inverse = inverse.to(device)  # image index -> row of the gathered queries

        self.shared_index = shared.to(device)
        self.shared_bias = None  # text keys are always allowed: no mask unless image keys are shared
        if shared.numel():
            # a shared key that a query's own group also holds is scored there, never twice
            in_group = torch.cat([(k_idx[:, :, None] == shared).any(1).repeat_interleave(q_idx.shape[1], 0)
                                  for q_idx, k_idx in groups])
            image_bias = _bias(pattern, q_flat[:, None], shared[None, :]).squeeze(1)
            image_bias = image_bias.masked_fill(in_group, float("-inf"))
            text_bias = torch.zeros(len(q_flat), pattern.layout.text_len)
            self.shared_bias = torch.cat([text_bias, image_bias], dim=1).to(device)

    def sizes(self, which: str) -> list[int]:
        """Rows each bucket takes in the gathered queries (``"q"``) or keys (``"k"``)."""
        return [g * (lq if which == "q" else ls) for g, lq, ls in (b.shape for b in self.buckets)]


def _check_coverage(pattern: AttentionPattern, groups, shared: torch.Tensor) -> None:
    """Internal invariant: every image key a query may see is in its group or shared."""
    n_img, t = pattern.layout.image_len, pattern.layout.text_len
    covered = torch.zeros(n_img + 1, n_img + 1, dtype=torch.bool)  # row/col n_img: padding
    for q_idx, k_idx in groups:
        lq, ls = q_idx.shape[1], k_idx.shape[1]
        covered[q_idx[:, :, None].expand(-1, -1, ls), k_idx[:, None, :].expand(-1, lq, -1)] = True
    covered[:, shared] = True
    needed = pattern.dense_mask()[t:, t:]
    assert not (needed & ~covered[:n_img, :n_img]).any(), f"{pattern.name} groups miss allowed keys"


def _memo(pattern: AttentionPattern, key: tuple, build):
    if key not in pattern.memo:
        pattern.memo[key] = build()
    return pattern.memo[key]


def _split(x: torch.Tensor, sizes: list[int]):
    """Rows of each bucket along dim 1 (no copy, and no backward copy, for a single bucket)."""
    return (x,) if len(sizes) == 1 else x.split(sizes, dim=1)


def gathered_attention(pattern: AttentionPattern, q, k, v, dropout_p: float = 0.0):
    """Exact attention for a sparse pattern over a prefix of the sequence (n <= total_len).

    Text queries: causal SDPA over text. Image queries: gathered into groups; each group scores
    its queries against the text and shared image keys (one matmul for all groups: those keys
    are never copied per group) and against the group's own image keys, under one softmax
    (in fp32, whatever the input dtype). q, k, v: (b, h, n, d).
    """
    t = pattern.layout.text_len
    b, h, n, d = q.shape
    n_text = min(n, t)
    out_text = F.scaled_dot_product_attention(
        q[:, :, :n_text], k[:, :, :n_text], v[:, :, :n_text], is_causal=True, dropout_p=dropout_p
    )
    if n <= t:
        return out_text
    plan = _memo(pattern, ("plan", q.device), lambda: GroupPlan(pattern, q.device))
    bh, last = b * h, n - t - 1  # last: the newest image index present

    def gather(x, index):  # image rows of x at ``index`` -> (bh, len(index), d), straight from x's strides
        return x[:, :, t:].index_select(2, index).view(bh, -1, d)

    # Indices past the newest present token (and -1 padding, mapped to 0) are masked out by the
    # plan's biases or belong to queries whose outputs are dropped, so any valid row will do.
    q_index, k_index, shared = (i.clamp(max=last) for i in (plan.q_index, plan.k_index, plan.shared_index))
    qg = gather(q, q_index) * d**-0.5  # (bh, all group queries, d)
    kg, vg = gather(k, k_index), gather(v, k_index)
    k_all = torch.cat([k[:, :, :t].reshape(bh, t, d), gather(k, shared)], dim=1)  # (bh, a, d)
    v_all = torch.cat([v[:, :, :t].reshape(bh, t, d), gather(v, shared)], dim=1)
    scores_all = qg @ k_all.transpose(1, 2)  # (bh, all group queries, a): one matmul for all groups
    if plan.shared_bias is not None:
        scores_all = scores_all + plan.shared_bias
    a = k_all.shape[1]
    outs = []
    q_sizes, k_sizes = plan.sizes("q"), plan.sizes("k")
    per_bucket = zip(plan.buckets, _split(qg, q_sizes), _split(scores_all, q_sizes),
                     _split(kg, k_sizes), _split(vg, k_sizes))
    for bucket, q_b, scores_all_b, k_b, v_b in per_bucket:
        g, lq, ls = bucket.shape
        q_b, k_b, v_b = q_b.view(bh, g, lq, d), k_b.view(bh, g, ls, d), v_b.view(bh, g, ls, d)
        scores_image = q_b @ k_b.transpose(2, 3) + bucket.bias  # (bh, g, q, s)
        scores = torch.cat([scores_all_b.view(bh, g, lq, a), scores_image], dim=-1)
        p = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        if dropout_p:
            p = F.dropout(p, dropout_p)
        outs.append(p[..., :a].reshape(bh, g * lq, a) @ v_all + (p[..., a:] @ v_b).view(bh, g * lq, d))
    out_img = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).index_select(1, plan.inverse[: n - t])
    return torch.cat([out_text, out_img.view(b, h, n - t, d)], dim=2)


def dense_reference_attention(pattern: AttentionPattern, q, k, v, dropout_p: float = 0.0):
    """SDPA with the pattern's full (n, n) mask: the reference the fast paths are tested against."""
    mask = pattern.dense_mask(q.shape[2], device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


_compiled_flex = None


def flex_pattern_attention(pattern: AttentionPattern, q, k, v, compiled: bool = True):
    """FlexAttention with the pattern's block mask (built once per length and device)."""
    global _compiled_flex
    n = q.shape[2]
    block_mask = _memo(pattern, ("block_mask", n, q.device), lambda: _flex.create_block_mask(
        lambda b, h, qi, ki: pattern.allowed(qi, ki), None, None, n, n, device=q.device))
    if not compiled:
        return _flex.flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(_flex.flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def decode_attention(pattern: AttentionPattern, q, k, v, start: int):
    """Queries at positions [start, start + nq) against cached keys [0, start + nq)."""
    nq, nk = q.shape[2], k.shape[2]
    if nq == 1 and not pattern.sparse:
        return F.scaled_dot_product_attention(q, k, v)
    mask = _memo(pattern, ("dense_mask", q.device), lambda: pattern.dense_mask(device=q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[start : start + nq, :nk])


def attend(pattern: AttentionPattern, q, k, v, *, start: int = 0, dropout_p: float = 0.0):
    """Pattern attention for queries at positions [start, start + nq); k, v cover [0, start + nq).

    q: (b, h, nq, d); k, v: (b, h, start + nq, d) -> (b, h, nq, d).
    """
    if start > 0:
        return decode_attention(pattern, q, k, v, start)
    if not pattern.sparse:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    # Flex only at the training length: each new length would recompile it (prompts vary).
    training_len = q.shape[2] == pattern.layout.total_len - 1
    if q.is_cuda and dropout_p == 0.0 and training_len and q.shape[-1] >= _FLEX_MIN_HEAD_DIM:
        return flex_pattern_attention(pattern, q, k, v)
    return gathered_attention(pattern, q, k, v, dropout_p)
