"""Attention kernels for the patterns in ``patterns.py``, and the dispatch between them.

einops legend: b batch, h heads, n sequence, d head dim, g key group, q queries of a group,
s keys of a group (text keys first, then the group's image keys).

Paths, chosen automatically by ``attend``:
- full pattern: fused causal SDPA (flash kernel on CPU and CUDA);
- sparse pattern on CUDA without dropout: FlexAttention with a block mask (compiled);
- sparse pattern otherwise: ``gathered_attention``, the CPU path, whose cost follows density;
- incremental decoding (KV cache): SDPA over the cache with the pattern's mask rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as _flex

from .patterns import AttentionPattern


class _Bucket:
    """One bucket of equally shaped groups and its additive mask."""

    def __init__(self, pattern: AttentionPattern, q_idx: torch.Tensor, k_idx: torch.Tensor, device):
        layout = pattern.layout
        t = layout.text_len
        q_pos = torch.where(q_idx >= 0, q_idx + t, layout.total_len)  # padding: after everything
        allowed = pattern.allowed(q_pos[:, :, None], (k_idx + t)[:, None, :]) & (k_idx >= 0)[:, None, :]
        self.shape = (*q_idx.shape, k_idx.shape[1])  # (g, q, s)
        self.bias = torch.zeros(self.shape).masked_fill(~allowed, float("-inf")).to(device)


class GroupPlan:
    """All buckets of a pattern's groups, gathered with one index per tensor, and the mask of
    the keys every image query is scored against (text, then the pattern's shared image keys)."""

    def __init__(self, pattern: AttentionPattern, device: torch.device):
        groups = pattern.groups()
        t, n_img = pattern.layout.text_len, pattern.layout.image_len
        self.buckets = [_Bucket(pattern, q_idx, k_idx, device) for q_idx, k_idx in groups]
        # Row counts of each bucket in the gathered queries and keys (split, whose backward is
        # one concatenation, rather than slices, whose backward is a zero-filled full copy each).
        self.q_sizes = [q_idx.numel() for q_idx, _ in groups]
        self.k_sizes = [k_idx.numel() for _, k_idx in groups]
        q_flat = torch.cat([q_idx.flatten() for q_idx, _ in groups])
        k_flat = torch.cat([k_idx.flatten() for _, k_idx in groups])
        self.q_index, self.k_index = q_flat.clamp(min=0).to(device), k_flat.clamp(min=0).to(device)
        inverse = torch.empty(n_img, dtype=torch.long)
        inverse[q_flat[q_flat >= 0]] = torch.nonzero(q_flat >= 0).squeeze(1)
        self.inverse = inverse.to(device)  # image index -> row of the gathered queries

        shared = pattern.shared_image_keys()
        self.shared_index = shared.to(device)
        self.shared_bias = None  # text keys are always allowed: no mask unless image keys are shared
        if shared.numel():
            q_pos = torch.where(q_flat >= 0, q_flat + t, pattern.layout.total_len)
            allowed = pattern.allowed(q_pos[:, None], shared[None, :] + t)
            # a shared key that a query's own group also holds is scored there, never twice
            in_group = torch.cat([
                (k_idx[:, :, None] == shared).any(1)[:, None, :].expand(-1, q_idx.shape[1], -1).flatten(0, 1)
                for q_idx, k_idx in groups])
            bias = torch.zeros(len(q_flat), t + shared.numel())
            bias[:, t:].masked_fill_(~(allowed & ~in_group), float("-inf"))
            self.shared_bias = bias.to(device)


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
    are never copied per group) and against the group's own image keys, under one softmax.
    q, k, v: (b, h, n, d).
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
    # keys scored against every image query: the text, then the pattern's shared image keys
    k_all = torch.cat([k[:, :, :t].reshape(bh, t, d), gather(k, shared)], dim=1)
    v_all = torch.cat([v[:, :, :t].reshape(bh, t, d), gather(v, shared)], dim=1)
    scores_all = qg @ k_all.transpose(1, 2)  # (bh, all group queries, t + shared): one matmul
    if plan.shared_bias is not None:
        scores_all = scores_all + plan.shared_bias
    s_all = k_all.shape[1]
    outs = []
    per_bucket = zip(plan.buckets, _split(qg, plan.q_sizes), _split(scores_all, plan.q_sizes),
                     _split(kg, plan.k_sizes), _split(vg, plan.k_sizes))
    for bucket, q_b, scores_all_b, k_b, v_b in per_bucket:
        g, lq, ls = bucket.shape
        q_b, k_b, v_b = q_b.view(bh, g, lq, d), k_b.view(bh, g, ls, d), v_b.view(bh, g, ls, d)
        scores_image = q_b @ k_b.transpose(2, 3) + bucket.bias
        p = torch.cat([scores_all_b.view(bh, g, lq, s_all), scores_image], dim=-1).softmax(dim=-1)
        if dropout_p:
            p = F.dropout(p, dropout_p)
        out = p[..., :s_all].reshape(bh, g * lq, s_all) @ v_all + (p[..., s_all:] @ v_b).view(bh, g * lq, d)
        outs.append(out.to(q.dtype))
    out_img = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).index_select(1, plan.inverse[: n - t])
    out_img = out_img.view(b, h, n - t, d)
    return torch.cat([out_text, out_img], dim=2)


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
    if q.is_cuda and dropout_p == 0.0:
        return flex_pattern_attention(pattern, q, k, v)
    return gathered_attention(pattern, q, k, v, dropout_p)
