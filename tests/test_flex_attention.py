"""The FlexAttention path (sparse attention on CUDA), tested on CPU: every layout it may choose
against the dense reference, forward and gradients; the tiles it visits; the compiled forward
through inductor's CPU backend inside the model, and how often it compiles; what happens when it
cannot run; and split.py's variant (flash for the text keys, FlexAttention for the image)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask

from dalle_ds.attention import flex, kernels, split
from dalle_ds.attention.kernels import attend, dense_reference_attention
from dalle_ds.attention.patterns import ATTN_TYPES, SequenceLayout, build_pattern

from conftest import tiny_dalle, tiny_vae

SPARSE_TYPES = [t for t in ATTN_TYPES if t != "full"]
OPTIONS = dict(conv_kernel_size=3, sparse_block_size=4, sparse_local_blocks=2, sparse_stride=3)
# small, and large enough (n > 128) that orders, padding and block sizes change the tiles
LAYOUTS = [SequenceLayout(5, 6, 7), SequenceLayout(9, 12, 16), SequenceLayout(65, 16, 16)]


def qkv(n, heads=3, dim_head=8, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, n, dim_head, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def dense_in_slot_order(q, k, v, block_mask, return_lse=False):
    """What FlexAttention computes, as dense attention under the block mask's own rule:
    differentiable on CPU (the log-sum-exp too), so that the gathers into and out of slot order
    are checked with gradients."""
    m = q.shape[2]
    mask = create_mask(block_mask.mask_mod, None, None, m, m)
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # in fp32, as FlexAttention computes: its output in the inputs' dtype, the log-sum-exp in fp32
    scores = (q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    return (torch.exp(scores - lse.unsqueeze(-1)) @ v.float()).to(q.dtype), lse


@pytest.mark.parametrize("attn_type", SPARSE_TYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_every_flex_layout_equals_dense_reference_forward_and_gradients(attn_type, layout):
    pattern = build_pattern(attn_type, layout, **OPTIONS)
    for n in (layout.total_len - 1, layout.total_len):
        plans = flex.candidate_plans(pattern, n, 8, "cpu")
        assert any(plan.slots is not None for plan in plans)  # gathered layouts are among them
        q, k, v = qkv(n)
        ref = dense_reference_attention(pattern, q, k, v)
        grad = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
        for plan in plans:
            out = plan.attend(q, k, v, dense_in_slot_order)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), ref_grads):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
                eager = plan.attend(q.detach(), k.detach(), v.detach(), flex.eager_flex)  # no CPU backward
            torch.testing.assert_close(eager, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_type", SPARSE_TYPES)
def test_chosen_flex_layout_gathers_only_where_the_estimate_says_it_pays(attn_type):
    """At DALL-E's sizes (head dim 64), by the estimate: at 256 text + 32x32 image no reordering
    pays for its gathers (raster order, as measured fastest on an H200); at 256 text + 64x64
    each type visits at most 0.4 of full causal attention's tiles, the column and block-sparse
    types in their own order (in raster order they visit all of them)."""
    for layout in (SequenceLayout(257, 64, 64), SequenceLayout(257, 32, 32)):
        pattern = build_pattern(attn_type, layout)
        n = layout.total_len - 1
        plan = flex.build_plan(pattern, n, 64, "cpu")
        plans = flex.candidate_plans(pattern, n, 64, "cpu")
        assert all(0 < p.partial_fraction < p.tile_fraction for p in plans)  # the text's tiles are full
        if layout.grid_h == 32:
            assert plan.slots is None, str(plan)
        else:
            assert plan.tile_fraction <= 0.4, (str(plan), plan.tile_fraction)
            assert plan.reordered == (attn_type in ("axial_col", "sparse")), str(plan)


def test_dalle_compiles_flex_once_per_pattern_whatever_batch_heads_or_mode(monkeypatch):
    """The compiled path as CUDA runs it, inside DALLE (forward: FlexAttention has no CPU
    backward): every attention type, 3 batch sizes, 2 head counts, train and eval. Each sparse
    pattern compiles once, and the logits equal the gathered path's."""
    torch._dynamo.reset()  # counted from a clean cache, whatever ran before
    monkeypatch.setattr(kernels, "FLEX_DEVICES", ("cpu",))
    vae = tiny_vae(image_size=64)  # a 16 x 16 grid: n = 262, three blocks
    models = [tiny_dalle(vae, attn_types=ATTN_TYPES, depth=len(ATTN_TYPES), heads=heads, dim_head=16)
              for heads in (2, 4)]
    compiles, unfused = flex.COUNTS["compiles"], flex.COUNTS["unfused_calls"]
    for model in models:
        for train in (True, False):
            model.train(train)
            for batch in (1, 2, 3):
                text = torch.randint(1, 50, (batch, 6))
                codes = torch.randint(0, vae.num_tokens, (batch, 256))
                with torch.no_grad():
                    fast = model(text, codes)
                    monkeypatch.setattr(kernels, "FLEX_DEVICES", ())
                    reference = model(text, codes)
                    monkeypatch.setattr(kernels, "FLEX_DEVICES", ("cpu",))
                torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    assert flex.COUNTS["compiles"] - compiles == len(SPARSE_TYPES)
    assert flex.COUNTS["unfused_calls"] == unfused


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on CUDA")
@pytest.mark.parametrize("attn_type", SPARSE_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chosen_flex_layout_on_cuda_equals_dense_reference_forward_and_gradients(attn_type, dtype):
    """The compiled kernel's own backward (CPU has none), at a layout of several blocks."""
    layout = LAYOUTS[2]
    pattern = build_pattern(attn_type, layout, **OPTIONS)
    n = layout.total_len - 1
    q, k, v = (x.detach().to("cuda", dtype).requires_grad_() for x in qkv(n, dim_head=64))
    ref_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out, ref = flex.pattern_attention(pattern, q, k, v), dense_reference_attention(pattern, *ref_inputs)
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), ref, **tolerance)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad.to(dtype)), torch.autograd.grad(ref, ref_inputs, grad)):
        torch.testing.assert_close(a.float(), b, **tolerance)


def test_flex_past_its_recompile_limit_is_an_error(monkeypatch):
    """Past the limit dynamo would run flex_attention unfused: an error names the limit instead."""
    pattern = build_pattern("axial_row", LAYOUTS[0])
    n = LAYOUTS[0].total_len - 1
    with torch.no_grad():
        flex.pattern_attention(pattern, *qkv(n, dim_head=16, requires_grad=False))
        monkeypatch.setattr(flex, "RECOMPILE_LIMIT", 1)
        with pytest.raises(RuntimeError, match="RECOMPILE_LIMIT"):
            flex.pattern_attention(pattern, *qkv(n, dim_head=32, requires_grad=False))  # a new head dim


def test_sparse_layer_that_cannot_use_flex_warns_once_per_cause_and_counts(monkeypatch):
    monkeypatch.setattr(kernels, "FLEX_DEVICES", ("cpu",))
    monkeypatch.setattr(flex, "_warned", set())
    layout = LAYOUTS[0]
    pattern = build_pattern("conv_like", layout, **OPTIONS)
    before = flex.COUNTS["unfused_calls"]
    q, k, v = qkv(layout.total_len - 1, dim_head=16)
    with pytest.warns(UserWarning, match="runs unfused .* attention dropout is on"):
        out = attend(pattern, q, k, v, dropout_p=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same cause again: no second warning
        attend(pattern, q, k, v, dropout_p=0.1)
    small = qkv(layout.total_len - 1, dim_head=8)
    with pytest.warns(UserWarning, match="head dim 8 is below FlexAttention's minimum of 16"):
        torch.testing.assert_close(attend(pattern, *small), dense_reference_attention(pattern, *small),
                                   atol=1e-5, rtol=1e-5)
    assert flex.COUNTS["unfused_calls"] - before == 3
    assert out.shape == q.shape
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # other lengths (prompts) take the gathered path by design
        attend(pattern, *qkv(layout.text_len + 3, dim_head=16))
    assert flex.COUNTS["unfused_calls"] - before == 3


def image_kernel_of(plan):
    """split.py's image part through one of the image-alone pattern's layouts, differentiable on CPU."""
    return lambda q, k, v: plan.attend(q, k, v, dense_in_slot_order, return_lse=True)


@pytest.mark.parametrize("attn_type", SPARSE_TYPES)
@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=str)
def test_split_attention_equals_dense_reference_forward_and_gradients(attn_type, layout):
    """The two kernels merged by their log-sum-exps, through every layout of the image part
    (gathered ones too), at the training length and the whole sequence."""
    pattern = build_pattern(attn_type, layout, **OPTIONS)
    t = layout.text_len
    for n in (layout.total_len - 1, layout.total_len):
        q, k, v = qkv(n)
        ref = dense_reference_attention(pattern, q, k, v)
        grad = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
        plans = flex.candidate_plans(pattern.image_alone(), n - t, 8, "cpu")
        assert any(plan.slots is not None for plan in plans) == (pattern.flex_order() is not None)
        for plan in plans:
            out = split.split_attention(pattern, q, k, v, image_kernel_of(plan))
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), ref_grads):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_split_attention_recomputed_under_activation_checkpointing_and_once_per_forward():
    """Inside a non-reentrant checkpoint (``checkpoint_activations``) the forward runs again in
    the backward; the gradients stay exact. A second backward of one forward is a clear error."""
    layout = LAYOUTS[1]
    pattern = build_pattern("axial_col", layout, **OPTIONS)
    n = layout.total_len - 1
    plan = flex.plan_for(pattern.image_alone(), n - layout.text_len, 8, "cpu")
    q, k, v = qkv(n)
    ref = dense_reference_attention(pattern, q, k, v)
    grad = torch.randn_like(ref)

    def split_layer(*inputs):
        return split.split_attention(pattern, *inputs, image_kernel=image_kernel_of(plan))
    out = torch.utils.checkpoint.checkpoint(split_layer, q, k, v, use_reentrant=False)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    out = split_layer(q, k, v)
    out.backward(grad, retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        out.backward(grad)


def test_split_attention_in_bf16_follows_the_fp32_reference():
    layout = LAYOUTS[1]
    pattern = build_pattern("conv_like", layout, **OPTIONS)
    n = layout.total_len - 1
    q, k, v = (x.detach().bfloat16().requires_grad_() for x in qkv(n))
    plan = flex.plan_for(pattern.image_alone(), n - layout.text_len, 8, "cpu")
    out = split.split_attention(pattern, q, k, v, image_kernel_of(plan))
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = dense_reference_attention(pattern, *ref_inputs)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for a, b in zip(grads, torch.autograd.grad(ref, ref_inputs, grad.float())):
        torch.testing.assert_close(a.float(), b, atol=3e-2, rtol=3e-2)


def test_dalle_runs_split_attention_where_configured(monkeypatch):
    """kernels.SPLIT_DEVICES sends the training length's sparse layers through split.py (its
    default image kernel, FlexAttention, uncompiled here: compiled, it returns no log-sum-exp on
    CPU); the logits equal the CPU kernel's."""
    calls = []
    original = split.split_attention
    monkeypatch.setattr(split, "split_attention", lambda *args: calls.append(args[0].name) or original(*args))
    monkeypatch.setattr(flex, "compiled_flex", flex.eager_flex)
    vae = tiny_vae(image_size=32)
    model = tiny_dalle(vae, attn_types=ATTN_TYPES, depth=len(ATTN_TYPES), dim_head=16).eval()
    text, codes = torch.randint(1, 50, (2, 6)), torch.randint(0, vae.num_tokens, (2, 64))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        reference = model(text, codes)
        monkeypatch.setattr(kernels, "FLEX_DEVICES", ("cpu",))
        monkeypatch.setattr(kernels, "SPLIT_DEVICES", ("cpu",))
        split_logits = model(text, codes)
    assert calls == SPARSE_TYPES
    torch.testing.assert_close(split_logits, reference, atol=1e-4, rtol=1e-4)


def test_split_attention_without_image_positions_is_an_error():
    layout = LAYOUTS[0]
    with pytest.raises(ValueError, match="needs image positions"):
        split.split_attention(build_pattern("axial_row", layout), *qkv(layout.text_len))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA flash kernel and FlexAttention's backward")
@pytest.mark.parametrize("attn_type", SPARSE_TYPES)
def test_split_attention_on_cuda_equals_dense_reference_forward_and_gradients(attn_type):
    layout = LAYOUTS[2]
    pattern = build_pattern(attn_type, layout, **OPTIONS)
    n = layout.total_len - 1
    q, k, v = (x.detach().to("cuda", torch.bfloat16).requires_grad_() for x in qkv(n, dim_head=64))
    ref_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out, ref = split.split_attention(pattern, q, k, v), dense_reference_attention(pattern, *ref_inputs)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad.bfloat16()), torch.autograd.grad(ref, ref_inputs, grad)):
        torch.testing.assert_close(a.float(), b, atol=3e-2, rtol=3e-2)
