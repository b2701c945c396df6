"""The chunked linear + cross-entropy head: the same loss and gradients as nn.Linear followed by
F.cross_entropy, in fp32, under bf16 autocast and with bf16 weights, without saving the logits."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_dalle, tiny_vae
from dalle_ds.models import linear_cross_entropy
from dalle_ds.models.linear_cross_entropy import LinearCrossEntropy


def reference(head, x, targets):
    return F.cross_entropy(F.linear(x, head.weight, head.bias).flatten(0, -2).float(), targets.flatten())


def loss_and_grads(loss_fn, head, x, targets):
    x = x.detach().requires_grad_()
    head.zero_grad()
    loss = loss_fn(head, x, targets)
    loss.backward()
    return loss.detach(), [x.grad, head.weight.grad] + ([head.bias.grad] if head.bias is not None else [])


@pytest.mark.parametrize("rows_per_chunk", [1, 4, 21, 1000])  # one row, a partial last chunk, one chunk
@pytest.mark.parametrize("bias", [True, False])
def test_equals_linear_then_cross_entropy(monkeypatch, rows_per_chunk, bias):
    head = LinearCrossEntropy(16, 50, bias=bias)
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_ELEMENTS", 50 * rows_per_chunk)
    x, targets = torch.randn(3, 7, 16), torch.randint(0, 50, (3, 7))
    loss, grads = loss_and_grads(lambda h, x, t: h(x, t), head, x, targets)
    expected, expected_grads = loss_and_grads(reference, head, x, targets)
    assert loss.dtype == torch.float32 and loss == pytest.approx(float(expected), abs=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(head(x), F.linear(x, head.weight, head.bias))  # without targets: the plain layer


def test_bf16_autocast_and_bf16_weights_follow_the_plain_head(monkeypatch):
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_ELEMENTS", 50 * 8)
    head = LinearCrossEntropy(32, 50)
    x, targets = torch.randn(4, 10, 32), torch.randint(0, 50, (4, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(lambda h, x, t: h(x, t), head, x, targets)
        expected, expected_grads = loss_and_grads(lambda h, x, t: F.cross_entropy(h(x).flatten(0, 1).float(),
                                                                                     t.flatten()), head, x, targets)
    assert loss == pytest.approx(float(expected), abs=2e-3)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_with_a_loss_scale_keep_their_gradients(monkeypatch, dtype):
    """As a bf16 or fp16 DeepSpeed engine holds the head; fp16 engines scale the loss (here by
    2**16) so that small gradients survive: the chunked head must not underflow before that."""
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_ELEMENTS", 4096 * 2048)
    head = LinearCrossEntropy(16, 4096)
    # softmax / rows ~ 1 / (4096 x 8192): below fp16's smallest subnormal unless scaled first
    x, targets = torch.randn(8, 1024, 16), torch.randint(0, 4096, (8, 1024))
    expected, expected_grads = loss_and_grads(reference, head, x, targets)
    low = copy.deepcopy(head).to(dtype)
    scale = 2.0**16
    loss, grads = loss_and_grads(lambda h, x, t: h(x, t) * scale, low, x.to(dtype), targets)
    assert (loss / scale).dtype == torch.float32 and float(loss / scale) == pytest.approx(float(expected), abs=2e-2)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float() / scale, want, atol=0.02 * float(want.abs().max()), rtol=0.05)


def test_dalle_loss_saves_no_image_logits_for_backward():
    model = tiny_dalle(tiny_vae(num_tokens=37))  # a vocabulary no other dimension has
    text = torch.randint(1, 50, (2, 6))
    codes = torch.randint(0, model.num_image_tokens, (2, model.image_seq_len))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss, _, image_loss = model(text, codes, return_loss=True, return_loss_breakdown=True)
    logit_sized = [shape for shape in saved if shape[-1:] == (37,) and torch.Size(shape).numel() >= 2 * 16 * 37]
    assert saved and not logit_sized, logit_sized
    with torch.no_grad():  # the loss still equals cross-entropy over the joint logits' image part
        image_logits = model(text, codes)[:, model.text_seq_len:, -model.num_image_tokens:]
        expected = F.cross_entropy(image_logits.flatten(0, 1).float(), codes.flatten())
    assert float(image_loss.detach()) == pytest.approx(float(expected), abs=1e-5)
    loss.backward()
    assert model.to_image_logits.weight.grad.abs().sum() > 0
