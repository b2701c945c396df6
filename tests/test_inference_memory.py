"""The generation memory estimate against the real allocations, and the batch size it chooses."""

import pytest
import torch

from conftest import tiny_dalle
from dalle_ds.generate import cast_for_inference
from dalle_ds.inference_memory import FREE_MEMORY_USED, batch_size_for, estimate_memory
from dalle_ds.models.kv_cache import KVCache


def prefill_cache(dalle, rows: int, primed: int) -> KVCache:
    """The cache a generation allocates: its first forward pass over caption and primed codes."""
    cache = KVCache(len(dalle.patterns), dalle.layout.total_len)
    text = torch.randint(1, dalle.num_text_tokens, (rows, dalle.text_seq_len))
    codes = torch.randint(0, dalle.num_image_tokens, (rows, primed))
    with torch.inference_mode():
        dalle.hidden(torch.cat([dalle.embed_text(dalle.prepare_text(text)), dalle.embed_image(codes)], dim=1), cache)
    return cache


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("batch, guided, primed", [(3, False, 0), (2, True, 8)])
def test_the_estimate_matches_the_real_cache_and_weights(dtype, batch, guided, primed):
    dalle = tiny_dalle(heads=3, dim_head=8, depth=3)
    cast_for_inference(dalle, dtype, torch.device("cpu"))
    estimate = estimate_memory(dalle, batch, guided=guided, primed_codes=primed)
    cache = prefill_cache(dalle, batch * (2 if guided else 1), primed)
    assert estimate.kv_cache == sum(t.nbytes for t in cache.keys + cache.values)
    assert estimate.weights == sum(p.nbytes for p in dalle.parameters()) + sum(b.nbytes for b in dalle.buffers())
    assert estimate.total == estimate.weights + estimate.kv_cache + estimate.activations + estimate.logits
    double = estimate_memory(dalle, 2 * batch, guided=guided, primed_codes=primed)
    assert double.per_batch == 2 * estimate.per_batch and double.weights == estimate.weights


def test_bf16_halves_the_transformer_but_not_the_dvae():
    dalle = tiny_dalle()
    fp32 = estimate_memory(dalle, 4)
    vae_bytes = sum(t.nbytes for t in (*dalle.vae.parameters(), *dalle.vae.buffers()))
    cast_for_inference(dalle, "bf16", torch.device("cpu"))
    bf16 = estimate_memory(dalle, 4)
    assert bf16.kv_cache * 2 == fp32.kv_cache
    assert bf16.weights - vae_bytes == (fp32.weights - vae_bytes) // 2
    assert all(p.dtype == torch.float32 for p in dalle.vae.parameters())


def test_the_batch_size_is_the_most_that_fits_free_memory():
    dalle = tiny_dalle()
    one = estimate_memory(dalle, 1, guided=True).per_batch
    free = int(5.5 * one / FREE_MEMORY_USED)
    assert batch_size_for(dalle, free, most=64, guided=True) == 5
    assert batch_size_for(dalle, free, most=3, guided=True) == 3  # never more than the images asked for
    with pytest.raises(ValueError, match="one image needs .* beside the weights"):
        batch_size_for(dalle, one // 2, most=8, guided=True)
