"""Generation: KV cache equals uncached decoding for every pattern, sampling controls,
guidance, priming, seeds and CLIP reranking."""

import pytest
import torch

from conftest import tiny_clip, tiny_dalle
from dalle_ds.attention.patterns import ATTN_TYPES
from dalle_ds.models.kv_cache import KVCache
from dalle_ds.models.sampling import top_k_filter, top_p_filter
from dalle_ds.models import static_decode
from dalle_ds.models.static_decode import StaticDecodeStep


def captions(dalle, b=2):
    return torch.randint(1, dalle.num_text_tokens, (b, dalle.text_seq_len))


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("reversible", [False, True])
def test_cached_logits_equal_a_full_forward(attn_type, reversible):
    dalle = tiny_dalle(attn_types=(attn_type, "full"), reversible=reversible).eval()
    text = captions(dalle)
    codes = torch.randint(0, dalle.num_image_tokens, (2, dalle.image_seq_len))
    with torch.no_grad():
        full = dalle.to_image_logits(dalle.hidden(torch.cat(
            [dalle.embed_text(dalle.prepare_text(text)), dalle.embed_image(codes[:, :-1])], dim=1)))
        cache = KVCache(len(dalle.patterns), dalle.layout.total_len)
        steps = [dalle.hidden(torch.cat([dalle.embed_text(dalle.prepare_text(text)),
                                         dalle.embed_image(codes[:, :3])], dim=1), cache)[:, -4:]]
        for j in range(3, dalle.image_seq_len - 1):
            steps.append(dalle.hidden(dalle.embed_image(codes[:, j:j + 1], j), cache))
        cached = dalle.to_image_logits(torch.cat(steps, dim=1))
    torch.testing.assert_close(cached, full[:, dalle.text_seq_len:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("reversible", [False, True])
def test_static_decoding_step_gives_the_cached_steps_logits(attn_type, reversible):
    """The fixed-shape step that generate(cuda_graph=True) records and replays, run eagerly on
    CPU: every step's logits equal the growing-cache step's, after a primed prefill."""
    dalle = tiny_dalle(attn_types=(attn_type, "full"), reversible=reversible).eval()
    codes = torch.randint(0, dalle.num_image_tokens, (2, dalle.image_seq_len))
    with torch.no_grad():
        prefill = torch.cat([dalle.embed_text(dalle.prepare_text(captions(dalle))), dalle.embed_image(codes[:, :3])], 1)
        growing, fixed = (KVCache(len(dalle.patterns), dalle.layout.total_len) for _ in range(2))
        for cache in (growing, fixed):
            dalle.hidden(prefill, cache)
        step = StaticDecodeStep(dalle, fixed, 2, torch.device("cpu"), record=False)
        for j in range(3, dalle.image_seq_len - 1):
            expected = dalle.to_image_logits(dalle.hidden(dalle.embed_image(codes[:, j:j + 1], j), growing)[:, -1])
            torch.testing.assert_close(step(codes[:, j:j + 1], j), expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="not the cache's next position"):
            step(codes[:, :1], 2)


def test_static_decoding_step_traces_as_one_graph_without_host_syncs():
    """What recording a CUDA graph needs, checked on CPU: dynamo traces the step whole
    (fullgraph: no graph break, no .item(), no data-dependent Python)."""
    dalle = tiny_dalle(attn_types=("axial_row", "full")).eval()
    cache = KVCache(len(dalle.patterns), dalle.layout.total_len)
    x = dalle.embed_text(dalle.prepare_text(captions(dalle)))
    with torch.no_grad():
        dalle.hidden(x, cache)
        step = StaticDecodeStep(dalle, cache, 2, torch.device("cpu"), record=False)
        step.code.fill_(5)
        eager = step.forward()
        traced = torch.compile(step.forward, fullgraph=True, backend="eager")()
    torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("attn_type", ["axial_col", "sparse"])
def test_generation_through_the_fixed_shape_step_equals_eager_generation(attn_type, monkeypatch):
    """generate_codes(cuda_graph=True) end to end, its step run unrecorded on CPU: with guidance,
    an image prompt and sampling, the same codes as the eager cached loop."""
    monkeypatch.setattr(static_decode, "GRAPH_DEVICES", ("cuda", "cpu"))
    dalle = tiny_dalle(attn_types=(attn_type, "full"))
    text, primer = captions(dalle), torch.randint(0, dalle.num_image_tokens, (2, dalle.image_seq_len))
    options = dict(seed=4, cond_scale=3.0, img=primer, num_init_img_tokens=5, filter_thres=0.5)
    eager = dalle.generate_codes(text, **options)
    assert torch.equal(dalle.generate_codes(text, cuda_graph=True, **options), eager)
    assert torch.equal(eager[:, :5], primer[:, :5])


def test_cuda_graph_generation_needs_cuda_and_the_cache():
    dalle = tiny_dalle()
    with pytest.raises(ValueError, match="needs use_cache=True and the model on a CUDA device"):
        dalle.generate_codes(captions(dalle), cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_graph_generation_equals_eager_generation(attn_type, autocast):
    dalle = tiny_dalle(attn_types=(attn_type, "full")).cuda()
    text = captions(dalle).cuda()
    primer = torch.randint(0, dalle.num_image_tokens, (2, 5), device="cuda")
    options = dict(temperature=0.0, cond_scale=2.0, img=primer, num_init_img_tokens=5)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        greedy = dalle.generate_codes(text, **options)
        assert torch.equal(dalle.generate_codes(text, cuda_graph=True, **options), greedy)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_cached_generation_equals_uncached(attn_type):
    dalle = tiny_dalle(attn_types=attn_type)
    text = captions(dalle)
    cached = dalle.generate_codes(text, seed=3, use_cache=True)
    assert torch.equal(cached, dalle.generate_codes(text, seed=3, use_cache=False))
    assert cached.shape == (2, dalle.image_seq_len)
    assert cached.min() >= 0 and cached.max() < dalle.num_image_tokens


def test_generation_records_no_autograd_graph():
    """Decoding saves nothing for a backward, whatever the caller's grad mode: per-token autograd
    bookkeeping would only slow the loop."""
    dalle = tiny_dalle(attn_types=("full", "axial_row"))
    saved = []
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dalle.generate_codes(captions(dalle), seed=0)
        assert not saved
        dalle(captions(dalle), torch.zeros(2, dalle.image_seq_len, dtype=torch.long))  # a forward does save
    assert saved  # the hook sees what a forward saves: its silence above means something


def test_seed_makes_generation_reproducible():
    dalle = tiny_dalle()
    text = captions(dalle, b=3)
    a = dalle.generate_codes(text, seed=7, filter_thres=0.0)
    assert torch.equal(a, dalle.generate_codes(text, seed=7, filter_thres=0.0))
    assert not torch.equal(a, dalle.generate_codes(text, seed=8, filter_thres=0.0))


def test_greedy_and_top1_agree():
    dalle = tiny_dalle()
    text = captions(dalle)
    greedy = dalle.generate_codes(text, temperature=0.0)
    assert torch.equal(greedy, dalle.generate_codes(text, filter_thres=0.999, seed=1))
    assert torch.equal(greedy, dalle.generate_codes(text, top_p=1e-6, filter_thres=None, seed=2))


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(top_k_filter(logits, 0.5)) == [True, True, False, False]
    assert kept(top_p_filter(logits, 0.6)) == [True, True, False, False]
    assert kept(top_p_filter(logits, 0.5)) == [True, False, False, False]
    assert kept(top_p_filter(logits[:, [3, 2, 1, 0]], 0.9)) == [False, True, True, True]


def test_temperature_applies_before_the_nucleus():
    from dalle_ds.models.sampling import sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    # at temperature 0.25 the top token holds > 0.8 of the mass, so top_p=0.8 keeps it alone
    assert sample(logits, temperature=0.25, filter_thres=None, top_p=0.8, generator=g).eq(0).all()
    drawn = sample(logits, temperature=1.0, filter_thres=None, top_p=0.8, generator=g)
    assert set(drawn.tolist()) == {0, 1}


def test_classifier_free_guidance_combines_conditional_and_null_logits():
    dalle = tiny_dalle(null_cond_prob=0.2).eval()
    text = captions(dalle)
    codes = dalle.generate_codes(text, cond_scale=3.0, temperature=0.0)
    t = dalle.text_seq_len
    with torch.no_grad():
        cond = dalle(text)[:, t, -dalle.num_image_tokens:]
        null = dalle(torch.zeros_like(text))[:, t, -dalle.num_image_tokens:]
    assert torch.equal(codes[:, 0], (null + 3.0 * (cond - null)).argmax(-1))
    assert not torch.equal(codes, dalle.generate_codes(text, temperature=0.0))


def test_priming_conditions_generation_on_the_first_codes():
    dalle = tiny_dalle().eval()
    text = captions(dalle)
    prime = torch.randint(0, dalle.num_image_tokens, (2, dalle.image_seq_len))
    codes = dalle.generate_codes(text, img=prime, num_init_img_tokens=5, temperature=0.0)
    assert torch.equal(codes[:, :5], prime[:, :5])
    with torch.no_grad():  # the first sampled code is the greedy choice given the primed codes
        logits = dalle(text, prime[:, :5])[:, -1, -dalle.num_image_tokens:]
    assert torch.equal(codes[:, 5], logits.argmax(-1))
    images = torch.rand(2, 3, 16, 16)
    codes = dalle.generate_codes(text, img=images, seed=0)
    n = int(0.4375 * dalle.image_seq_len)
    assert torch.equal(codes[:, :n], dalle.vae.get_codebook_indices(images)[:, :n])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("attn_type", ["full", "sparse"])
def test_guided_and_primed_cached_generation_equals_uncached(batch, attn_type):
    dalle = tiny_dalle(attn_types=attn_type, null_cond_prob=0.1)
    text = captions(dalle, b=batch)
    prime = torch.randint(0, dalle.num_image_tokens, (batch, dalle.image_seq_len))
    kwargs = dict(cond_scale=2.5, img=prime, num_init_img_tokens=3, seed=11)
    assert torch.equal(dalle.generate_codes(text, use_cache=True, **kwargs),
                       dalle.generate_codes(text, use_cache=False, **kwargs))


def test_bad_priming_is_a_clear_value_error():
    dalle = tiny_dalle()
    text = captions(dalle)
    prime = torch.randint(0, dalle.num_image_tokens, (3, dalle.image_seq_len))
    with pytest.raises(ValueError, match="img has 3 images to prime 2 captions"):
        dalle.generate_codes(text, img=prime)
    with pytest.raises(ValueError, match="num_init_img_tokens must be in \\[0, 16\\]"):
        dalle.generate_codes(text, img=prime[:2], num_init_img_tokens=-1)


def test_clip_scores_each_generation_against_its_caption_in_input_order():
    """As in DALLE-pytorch: image i belongs to caption i, and scores[i] is its CLIP score, so
    several captions in one call stay lined up with their images."""
    dalle = tiny_dalle()
    clip = tiny_clip().eval()
    text = torch.cat([captions(dalle, b=1).repeat(3, 1), captions(dalle, b=2)[1:]])  # 3 samples of one, and another
    images, scores = dalle.generate_images(text, clip=clip, seed=0)
    assert images.shape == (4, 3, 16, 16) and scores.shape == (4,)
    torch.testing.assert_close(images, dalle.generate_images(text, seed=0))
    with torch.no_grad():
        torch.testing.assert_close(scores, clip(text, images))


def test_generation_leaves_training_mode_alone():
    dalle = tiny_dalle().train()
    dalle.generate_codes(captions(dalle), seed=0)
    assert dalle.training and dalle.transformer.training


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_generation_agrees_with_fp32(dtype):
    """Greedy decoding, so only rounding can make the dtypes differ."""
    from dalle_ds.generate import cast_for_inference

    torch.manual_seed(1)
    dalle = tiny_dalle(dim=64)
    text = captions(dalle, b=4)
    reference = dalle.generate_codes(text, temperature=0)
    cast_for_inference(dalle, dtype, torch.device("cpu"))
    codes = dalle.generate_codes(text, temperature=0)
    assert codes.shape == reference.shape and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < dalle.num_image_tokens
    assert (codes == reference).float().mean() > 0.8
    images = dalle.generate_images(text, temperature=0)  # the dVAE, still fp32, decodes
    assert images.dtype == torch.float32 and images.shape == (4, 3, 16, 16) and torch.isfinite(images).all()
