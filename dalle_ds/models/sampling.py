"""Logit filters for sampling: top-k (DALLE-pytorch's ``filter_thres``) and top-p (nucleus)."""

from __future__ import annotations

import torch


def top_k_filter(logits: torch.Tensor, thres: float) -> torch.Tensor:
    """Keeps the top ``(1 - thres)`` fraction of the vocabulary (at least one), as DALLE-pytorch."""
    k = max(int((1 - thres) * logits.shape[-1]), 1)
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of tokens whose probability mass reaches ``top_p``."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, *, temperature: float, filter_thres: float | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """(b, vocab) logits -> (b,) sampled ids."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if filter_thres is not None:
        logits = top_k_filter(logits, filter_thres)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = (logits / temperature).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
