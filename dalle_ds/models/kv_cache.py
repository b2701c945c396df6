"""Preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values for positions [0, length). ``append`` writes in place, so a
    decoding step costs no reallocation or concatenation."""

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0  # positions cached before the current forward pass
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @staticmethod
    def nbytes_for(num_layers: int, batch: int, heads: int, max_len: int, dim_head: int, dtype: torch.dtype) -> int:
        """What ``append`` allocates over all layers: keys and values of (batch, heads, max_len, dim_head)."""
        return 2 * num_layers * batch * heads * max_len * dim_head * dtype.itemsize

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (b, h, t, d) for positions [length, length + t) -> all cached (b, h, length + t, d)."""
        if self.keys[layer] is None:
            b, h, _, d = k.shape
            # zeros, not garbage: a static decoding step reads the unwritten tail (masked; 0 * NaN is NaN)
            self.keys[layer] = k.new_zeros(b, h, self.max_len, d)
            self.values[layer] = v.new_zeros(b, h, self.max_len, d)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to reach {end}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def write_at(self, layer: int, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v: (b, h, 1, d) for the position held in the (1,) device tensor ``position`` (no host
        sync: ``StaticDecodeStep``) -> the whole cache (b, h, max_len, d); ``append`` filled it first."""
        self.keys[layer].index_copy_(2, position, k)
        self.values[layer].index_copy_(2, position, v)
        return self.keys[layer], self.values[layer]
