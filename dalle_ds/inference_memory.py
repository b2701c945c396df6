"""What generation holds in memory per batch size, from the model's shape: printed before a run,
and used to choose the batch size from a GPU's free memory.

Generation holds DALL-E's weights (its dVAE's included), a KV cache for the whole sequence, the
activations of the first forward pass (the caption and any primed codes at once; each later
step sees one position) and, per step, the image head's logits with sampling's fp32 copies.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models.dalle import DALLE
from .models.kv_cache import KVCache

FREE_MEMORY_USED = 0.8  # of the free memory a chosen batch may fill: the dVAE decode and the allocator need the rest
_SAMPLING_COPIES = 3  # fp32 copies of the logits in sampling: tempered, filtered, probabilities


@dataclass
class MemoryEstimate:
    batch_size: int
    weights: int  # bytes: DALL-E's parameters and buffers, its dVAE's included
    kv_cache: int  # keys and values of every layer for the whole sequence
    activations: int  # the first forward pass's largest intermediates: layer inputs, q/k/v, GEGLU, scores
    logits: int  # one step's image logits and sampling's fp32 copies

    @property
    def per_batch(self) -> int:
        """What grows with the batch: all but the weights."""
        return self.kv_cache + self.activations + self.logits

    @property
    def total(self) -> int:
        return self.weights + self.per_batch

    def line(self) -> str:
        names = ("weights", "kv_cache", "activations", "logits")
        parts = ", ".join(f"{name} {_gib(getattr(self, name))}" for name in names)
        return f"memory for batch size {self.batch_size}: ~{_gib(self.total)} ({parts})"


def estimate_memory(dalle: DALLE, batch_size: int, *, guided: bool = False, primed_codes: int = 0) -> MemoryEstimate:
    """The estimate for ``batch_size`` images per pass, in the model's current dtypes. ``guided``:
    classifier-free guidance runs an unconditional row beside each; ``primed_codes``: codes of an
    image prompt, which the first forward pass takes with the caption."""
    rows = batch_size * (2 if guided else 1)
    config, dtype = dalle.config, dalle.to_image_logits.weight.dtype
    dim, heads, dim_head, item = config["dim"], config["heads"], config["dim_head"], dtype.itemsize
    kv_cache = KVCache.nbytes_for(len(dalle.patterns), rows, heads, dalle.layout.total_len, dim_head, dtype)
    n = dalle.layout.text_len + primed_codes
    per_position = 2 * dim + 3 * heads * dim_head + 3 * config["ff_mult"] * dim  # x and its norm, q/k/v, GEGLU
    activations = rows * (n * per_position * item + heads * n * n * 4)  # attention scores in fp32
    logits = rows * dalle.num_image_tokens * (item + _SAMPLING_COPIES * 4)
    weights = sum(t.nbytes for t in (*dalle.parameters(), *dalle.buffers()))
    return MemoryEstimate(batch_size, weights, kv_cache, activations, logits)


def batch_size_for(dalle: DALLE, free_bytes: int, most: int, *, guided: bool = False, primed_codes: int = 0) -> int:
    """The largest batch size up to ``most`` whose per-batch memory fits ``FREE_MEMORY_USED`` of
    ``free_bytes`` (measured with the weights already in place)."""
    one = estimate_memory(dalle, 1, guided=guided, primed_codes=primed_codes).per_batch
    fits = int(FREE_MEMORY_USED * free_bytes // one)
    if fits < 1:
        raise ValueError(f"one image needs ~{_gib(one)} beside the weights, {_gib(free_bytes)} is free: free the "
                         f"GPU, use --dtype bf16, or generate on another device")
    return min(fits, most)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
