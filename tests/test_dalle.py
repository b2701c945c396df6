"""DALLE: causality for every pattern, reversible gradients, learning, and bad input."""

import pytest
import torch

from conftest import tiny_dalle
from dalle_ds import DALLE, DiscreteVAE
from dalle_ds.attention.patterns import ATTN_TYPES
from dalle_ds.models.reversible import reversible_sequence


def batch(dalle, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, dalle.num_text_tokens, (b, dalle.text_seq_len), generator=g)
    codes = torch.randint(0, dalle.num_image_tokens, (b, dalle.image_seq_len), generator=g)
    return text, codes


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_changing_a_token_never_changes_earlier_logits(attn_type):
    dalle = tiny_dalle(attn_types=(attn_type, "full") if attn_type != "full" else "full").eval()
    text, codes = batch(dalle)
    logits = dalle(text, codes)
    t = dalle.text_seq_len
    # input position p holds bos for p=0, caption token p for p <= t, image code p - t - 1 after
    for pos in (2, t, t + 1, t + 5, t + dalle.image_seq_len - 1):
        text2, codes2 = text.clone(), codes.clone()
        if pos <= t:
            text2[:, pos - 1] = (text2[:, pos - 1] % (dalle.num_text_tokens - 1)) + 1
        else:
            codes2[:, pos - t - 1] = (codes2[:, pos - t - 1] + 1) % dalle.num_image_tokens
        logits2 = dalle(text2, codes2)
        torch.testing.assert_close(logits2[:, :pos], logits[:, :pos], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits2[:, pos], logits[:, pos]), "the changed token must matter"


@pytest.mark.parametrize("attn_types", [("full",), ("axial_row", "axial_col", "conv_like", "sparse")])
def test_reversible_custom_backward_equals_autograd_with_dropout(attn_types):
    dalle = tiny_dalle(reversible=True, depth=4, attn_types=attn_types, attn_dropout=0.2, ff_dropout=0.2).train()
    text, codes = batch(dalle)

    def grads(memory_efficient):
        dalle.zero_grad()
        dalle.transformer.reversible_memory_efficient = memory_efficient
        torch.manual_seed(123)  # same dropout masks in both runs
        loss = dalle(text, codes, return_loss=True)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in dalle.named_parameters() if p.grad is not None}

    loss_rev, g_rev = grads(True)
    loss_ref, g_ref = grads(False)
    torch.testing.assert_close(loss_rev, loss_ref)
    assert g_rev.keys() == g_ref.keys() and len(g_rev) > 10
    for name in g_ref:
        torch.testing.assert_close(g_rev[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("options", [dict(), dict(reversible=True, attn_types=("axial_row", "sparse")),
                                     dict(sandwich_norm=True, stable=True, attn_types="conv_like")])
def test_learns_a_fixed_batch(options):
    dalle = tiny_dalle(**options).train()
    text, codes = batch(dalle, b=4)
    opt = torch.optim.Adam([p for p in dalle.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        loss = dalle(text, codes, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::8]


def test_loss_breakdown_and_weighting():
    dalle = tiny_dalle(loss_img_weight=3.0).eval()
    text, codes = batch(dalle)
    loss, text_loss, image_loss = dalle(text, codes, return_loss=True, return_loss_breakdown=True)
    torch.testing.assert_close(loss, (text_loss + 3.0 * image_loss) / 4.0)
    assert torch.equal(loss, dalle(text, codes, return_loss=True))


def test_pixels_are_encoded_by_the_frozen_vae():
    dalle = tiny_dalle().eval()
    images = torch.rand(2, 3, 16, 16)
    text, _ = batch(dalle)
    codes = dalle.vae.get_codebook_indices(images)
    assert torch.equal(dalle(text, images, return_loss=True), dalle(text, codes, return_loss=True))
    assert not any(p.requires_grad for p in dalle.vae.parameters())
    dalle.train()
    assert not dalle.vae.training


def test_mask_marks_padding():
    dalle = tiny_dalle().eval()
    text, codes = batch(dalle)
    mask = torch.ones_like(text, dtype=torch.bool)
    mask[:, 3:] = False
    padded = text.clone()
    padded[:, 3:] = 0
    assert torch.equal(dalle(text, codes, mask=mask), dalle(padded, codes))
    assert torch.equal(dalle(text[:, :3], codes), dalle(padded, codes)), "short captions are padded"


def test_null_cond_prob_drops_captions_in_training_only():
    dalle = tiny_dalle(null_cond_prob=0.5)
    text, codes = batch(dalle, b=64)
    dalle.train()
    torch.manual_seed(1)
    a = dalle(text, codes, return_loss=True)
    torch.manual_seed(2)
    b = dalle(text, codes, return_loss=True)
    assert a != b
    dalle.eval()
    assert dalle(text, codes, return_loss=True) == dalle(text, codes, return_loss=True)


@pytest.mark.parametrize("make_input, message", [
    (lambda d: (torch.randint(0, 50, (2, 7)), None), "text must be integer token ids of shape \\(batch, <= 6\\)"),
    (lambda d: (torch.full((2, 6), 50), None), "text ids must lie in \\[0, num_text_tokens=50\\)"),
    (lambda d: (torch.ones(2, 6, dtype=torch.long), torch.full((2, 16), 32)), "image codes must lie in \\[0, 32\\)"),
    (lambda d: (torch.ones(2, 6, dtype=torch.long), torch.zeros(2, 17, dtype=torch.long)), "shape \\(batch, <= 16\\)"),
    (lambda d: (torch.ones(2, 6, dtype=torch.long), torch.rand(2, 3, 32, 32)), "images of shape \\(batch, 3, 16, 16\\)"),
    (lambda d: (torch.ones(2, 6, dtype=torch.long), torch.rand(2, 1, 16, 16)), "images of shape \\(batch, 3, 16, 16\\)"),
])
def test_bad_input_is_a_clear_value_error(make_input, message):
    dalle = tiny_dalle()
    text, image = make_input(dalle)
    with pytest.raises(ValueError, match=message):
        dalle(text, image, return_loss=image is not None)


def test_bad_construction_is_a_clear_value_error():
    with pytest.raises(ValueError, match="unknown attention type 'axial'"):
        tiny_dalle(attn_types=("full", "axial"))
    with pytest.raises(ValueError, match="needs a trained image tokenizer"):
        DALLE(dim=32, vae=torch.nn.Linear(2, 2), depth=1)
    with pytest.raises(ValueError, match="divisible by 2 \\*\\* num_layers"):
        DiscreteVAE(image_size=20, num_layers=3)

    class LyingVAE(DiscreteVAE):  # claims a 4x4 grid but encodes 8x8
        grid_size = 4

    dalle = tiny_dalle(vae=LyingVAE(image_size=32, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8))
    with pytest.raises(ValueError, match="the VAE gave 64 codes per image, but DALLE was built for a 4x4 grid"):
        dalle(torch.ones(1, 6, dtype=torch.long), torch.rand(1, 3, 32, 32))


def saved_activation_bytes(dalle, text, codes):
    """Bytes autograd keeps for the backward pass of one training forward (parameters excluded)."""
    params = {p.data_ptr() for p in dalle.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dalle(text, codes, return_loss=True)
    return total


def test_reversible_activation_memory_is_flat_in_depth():
    def saved(depth, reversible):
        dalle = tiny_dalle(depth=depth, reversible=reversible, attn_types=("full", "conv_like")).train()
        return saved_activation_bytes(dalle, *batch(dalle))

    assert saved(8, True) == saved(2, True)
    assert saved(8, False) > 3 * saved(2, False) - saved(2, True)  # plain layers keep activations
    assert saved(8, True) < 0.2 * saved(8, False)


def test_reversible_recomputes_under_the_forward_autocast():
    """Backward runs outside autocast; the recomputation must still be in bf16 like the forward."""
    dalle = tiny_dalle(reversible=True, depth=3, attn_types=("full", "sparse")).train()
    text, codes = batch(dalle)

    def grads(memory_efficient):
        dalle.zero_grad()
        dalle.transformer.reversible_memory_efficient = memory_efficient
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = dalle(text, codes, return_loss=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in dalle.named_parameters() if p.grad is not None}

    g_rev, g_ref = grads(True), grads(False)
    for name in g_ref:  # recomputing in fp32 instead would be off by ~1e-2
        assert (g_rev[name] - g_ref[name]).norm() <= 1e-5 * g_ref[name].norm(), name


def test_reversible_stack_of_no_layers_is_the_identity():
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = reversible_sequence(x, [])
    out.sum().backward()
    torch.testing.assert_close(out, x)
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_reversible_backward_twice_is_a_clear_error():
    dalle = tiny_dalle(reversible=True)
    loss = dalle(*batch(dalle), return_loss=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once per forward"):
        loss.backward()


def test_reversible_layers_train_below_frozen_embeddings():
    dalle = tiny_dalle(reversible=True)
    for emb in (dalle.text_emb, dalle.text_pos_emb, dalle.image_emb, dalle.image_row_emb, dalle.image_col_emb):
        emb.requires_grad_(False)
    dalle(*batch(dalle), return_loss=True).backward()
    assert dalle.transformer.blocks[0].attn.to_qkv.weight.grad is not None


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_bf16_model_matches_fp32(attn_type):
    """DeepSpeed's bf16 mode runs the whole model in bf16, without autocast."""
    dalle = tiny_dalle(attn_types=attn_type).eval()
    text, codes = batch(dalle)
    expected = dalle(text, codes, return_loss=True)
    got = dalle.to(torch.bfloat16)(text, codes, return_loss=True)
    assert got.dtype == torch.float32  # the loss is reduced in fp32
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)


def test_activation_checkpointing_gives_the_same_gradients_and_stores_less():
    plain = tiny_dalle(attn_dropout=0.2, ff_dropout=0.2, attn_types=("full", "sparse")).train()
    checkpointed = tiny_dalle(attn_dropout=0.2, ff_dropout=0.2, attn_types=("full", "sparse"),
                              checkpoint_activations=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    text, codes = batch(plain)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(5)
        model(text, codes, return_loss=True).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
    assert saved_activation_bytes(checkpointed, text, codes) < 0.5 * saved_activation_bytes(plain, text, codes)
