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
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token is enough
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, *, temperature: float, filter_thres: float | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """(b, vocab) logits -> (b,) sampled ids. Temperature first, then top-k, then top-p (so the
    nucleus is taken from the tempered distribution); temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if filter_thres is not None:
        logits = top_k_filter(logits, filter_thres)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
