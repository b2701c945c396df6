"""Sparse attention in two kernels: SDPA's flash kernel for the text keys, a sparse kernel
(FlexAttention) for the image keys alone, merged by their log-sum-exps.

einops legend: b batch, h heads, n sequence (t text, then m image positions), d head dim.

**Why.** Every image query sees the whole text, so in one FlexAttention call (``flex.py``) the
text keys fill a large share of the tiles each sparse pattern visits, at FlexAttention's price per
tile (on an H200, 6.1 ps per visited score fwd+bwd, where causal flash attention took 4.5 ps per
score at 1280 positions and 2.7 at 4352). Here the flash kernel scores them, every image
query against the text unmasked, its best case, and FlexAttention visits only the image's own
tiles (``AttentionPattern.image_alone``). Not measured on a GPU yet: ``kernels.SPLIT_DEVICES`` is
empty until ``benchmarks/bench_gpu.py`` (which times both) shows it faster.

**Exact.** Text queries attend causally to the text (flash, causal). An image query's softmax over
the text (o1, lse1) and over its image keys (o2, lse2) merge into O = w1 o1 + w2 o2, with
w_i = exp(lse_i - L) and L = logaddexp(lse1, lse2). The backward is ring attention's: flash's
backward given the merged O and L is the merged softmax's gradient over its own keys; the image
part is differentiated through (o2, lse2) by autograd, with the merge's gradients w2 dO for o2 and
w2 (rowsum(dO o2) - rowsum(dO O)) for lse2.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from . import flex
from .patterns import AttentionPattern

# image_kernel(q, k, v) -> (out, lse): attention over the image alone, (b, h, m, d) and (b, h, m)
# fp32, differentiable through both
ImageKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_FLASH_DTYPES = (torch.float16, torch.bfloat16)  # what the CUDA flash kernel takes


def usable(q: torch.Tensor) -> bool:
    """Whether the flash kernel takes these inputs: any float dtype on CPU; on CUDA a build with
    it, an Ampere or newer GPU, half precision and a head dim that is a multiple of 8, at most 256."""
    if q.device.type == "cpu":
        return True
    d = q.shape[-1]
    return _flash_on(q.device) and q.dtype in _FLASH_DTYPES and d % 8 == 0 and d <= 256


@cache
def _flash_on(device: torch.device) -> bool:
    """Whether this CUDA device runs the flash kernel (asked once per device, not per layer call)."""
    return (device.type == "cuda" and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


def split_attention(pattern: AttentionPattern, q, k, v, image_kernel: ImageKernel | None = None):
    """Pattern attention of q, k, v (b, h, n, d), n past the text -> (b, h, n, d). ``image_kernel``:
    by default FlexAttention under ``pattern.image_alone()``."""
    t, n = pattern.layout.text_len, q.shape[2]
    if not t < n <= pattern.layout.total_len:
        raise ValueError(f"split attention needs image positions: {n} positions for a text of {t} and "
                         f"{pattern.layout.total_len} in all")
    graph = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))  # a backward to come
    return _SplitAttention.apply(q, k, v, t, image_kernel or flex_image(pattern.image_alone()), graph)


def flex_image(pattern: AttentionPattern, kernel=None) -> ImageKernel:
    """The image kernel by FlexAttention under ``pattern`` (an image-alone one), in the layout
    ``flex.py`` chooses; ``kernel`` as in ``FlexPlan.attend`` (default: compiled)."""
    return partial(flex.pattern_attention, pattern, kernel=kernel, return_lse=True)


class _SplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, t: int, image_kernel: ImageKernel, graph: bool):
        # contiguous halves: the flash kernels' inputs (and ring attention found strided k, v unsafe)
        (q_t, q_i), (k_t, k_i), (v_t, v_i) = ((x[:, :, :t].contiguous(), x[:, :, t:].contiguous()) for x in (q, k, v))
        result = q.new_empty(q.shape)
        with torch.autocast(q.device.type, enabled=False):
            (text_out, text), (cross_out, cross) = _flash(q_t, k_t, v_t, True), _flash(q_i, k_t, v_t, False)
            with torch.set_grad_enabled(graph):  # the image part's graph, for the backward
                image_inputs = [x.detach().requires_grad_(graph) for x in (q_i, k_i, v_i)]
                o2, lse2 = image_kernel(*image_inputs)
            lse = torch.logaddexp(cross.lse, lse2.detach()).contiguous()  # flash's backward reads it raw
            w1, w2 = (torch.exp(part - lse).unsqueeze(-1) for part in (cross.lse, lse2.detach()))
            result[:, :, :t] = text_out
            result[:, :, t:] = w1 * cross_out + w2 * o2.detach()
        cross.lse = lse  # the image queries' backward takes the merged softmax's, as their output
        ctx.save_for_backward(result)
        ctx.text, ctx.cross, ctx.image = text, cross, (image_inputs, o2, lse2)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.image is None:
            raise RuntimeError("split attention's backward runs once per forward (its image part's graph is "
                               "freed): run the forward again instead of backward with retain_graph=True")
        t = ctx.text.q.shape[2]
        (result,) = ctx.saved_tensors
        out_t, out_i = result[:, :, :t], result[:, :, t:]
        grad_t, grad_i = grad[:, :, :t].contiguous(), grad[:, :, t:].contiguous()
        image_inputs, o2, lse2 = ctx.image
        with torch.autocast(grad.device.type, enabled=False):
            dq_t, dk_t, dv_t = _flash_backward(ctx.text, grad_t, out_t)
            dq_i, dk_cross, dv_cross = _flash_backward(ctx.cross, grad_i, out_i)
            w2 = torch.exp(lse2.detach() - ctx.cross.lse)
            d_o2 = (w2.unsqueeze(-1) * grad_i).to(o2.dtype)
            # rowsum(d_o2 o2) of the rounded d_o2 that the image kernel's backward sees, less w2 rowsum(dO O)
            d_lse2 = _rowdot(d_o2, o2.detach()) - w2 * _rowdot(grad_i, out_i)
            dq_ii, dk_ii, dv_ii = torch.autograd.grad([o2, lse2], image_inputs, [d_o2, d_lse2])
        ctx.text = ctx.cross = ctx.image = None
        return (torch.cat([dq_t, _added(dq_i, dq_ii)], dim=2), torch.cat([_added(dk_t, dk_cross), dk_ii], dim=2),
                torch.cat([_added(dv_t, dv_cross), dv_ii], dim=2), None, None, None)


def _added(a, b) -> torch.Tensor:
    """Two gradients of one tensor, added in fp32 at least."""
    return torch.add(a.float(), b.float()).to(a.dtype)


def _rowdot(a, b) -> torch.Tensor:
    """Per-row dot product over the head dim, in fp32: (b, h, m, d) x2 -> (b, h, m)."""
    return torch.linalg.vecdot(a.float(), b.float())


@dataclass
class _FlashCall:
    """One call of the flash kernel, what its backward needs besides the output: the inputs, the
    log-sum-exp (b, h, L) fp32 it returned, and (CUDA) its sequence bookkeeping and RNG state."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    lse: torch.Tensor
    state: tuple


def _flash(q, k, v, causal: bool) -> tuple[torch.Tensor, _FlashCall]:
    """Flash attention: its output, and the call for its backward. ``causal`` aligns the query
    and key sequences at their starts (only used with equal lengths here)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        return out, _FlashCall(q, k, v, causal, lse, ())
    # out, lse, cum_seq_q, cum_seq_k, max_q, max_k, philox seed and offset, debug mask
    out, lse, *state, _ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)
    return out, _FlashCall(q, k, v, causal, lse, tuple(state))


def _flash_backward(call: _FlashCall, grad, out):
    """(dq, dk, dv) of ``call`` for the output gradient ``grad``, given the output ``out`` (and
    the call's ``lse``) that the softmax's gradient is taken for."""
    if grad.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, call.q, call.k, call.v, out, call.lse, 0.0, call.causal)
    cum_q, cum_k, max_q, max_k, seed, offset = call.state
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad, call.q, call.k, call.v, out, call.lse, cum_q, cum_k, max_q, max_k, 0.0, call.causal, seed, offset)
