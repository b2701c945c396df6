"""A linear head and its cross-entropy in one, chunked over rows, so that the (rows, vocab)
logits never exist whole: at DALL-E's image head they are batch x 1024 x 8192, held once in
the compute dtype and again in fp32 for the loss, its softmax and its gradient.

The forward computes each chunk's logits, its loss terms and, when gradients are wanted, the
chunk's gradients with respect to the input, weight and bias (softmax - one-hot, through the
matmuls), then drops the logits. The backward only scales the saved gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32): rows = CHUNK_ELEMENTS // vocab


class LinearCrossEntropy(nn.Linear):
    """``nn.Linear`` (same weights, same state-dict keys); given targets too, it returns the
    mean cross-entropy of its logits against them without materialising the logits. (One
    forward for both, so that wrappers that gather weights around a module's forward, such as
    ZeRO-3, see the loss too.)"""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., dim) -> logits (..., vocab); with targets (...) class ids, the mean
        cross-entropy, an fp32 scalar."""
        if targets is None:
            return super().forward(x)
        rows = max(1, CHUNK_ELEMENTS // self.out_features)
        return _ChunkedCrossEntropy.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias, targets.reshape(-1),
                                          rows)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What nn.Linear would compute in here: the autocast dtype if autocast is on, else that of
    its input and weight."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x.dtype, weight.dtype)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, rows):
        dtype = _compute_dtype(x, weight)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        want_grads = any(ctx.needs_input_grad[:3])
        # the gradients wait in fp32 for backward's scale (fp16 loss scaling: in fp16, a mean
        # over thousands of rows would underflow before it is scaled up)
        grad_x = x.new_empty(x.shape, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        total, n = x.new_zeros((), dtype=torch.float32), x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, n, rows):
                xc, tc = x[start:start + rows].to(dtype), targets[start:start + rows]
                logits = F.linear(xc, w, b).float()  # (rows, vocab)
                lse = logits.logsumexp(-1)
                total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
                if not want_grads:
                    continue
                # d(the chunk's summed loss)/d(logits) = softmax - one_hot, in place of the logits;
                # in [-1, 1], so the compute dtype holds it (the mean's 1 / n comes at the end)
                dlogits = logits.sub_(lse[:, None]).exp_()
                dlogits[torch.arange(len(tc), device=tc.device), tc] -= 1
                dlogits = dlogits.to(dtype)
                if grad_x is not None:
                    grad_x[start:start + rows] = dlogits @ w
                if grad_w is not None:
                    grad_w += dlogits.t() @ xc
                if grad_b is not None:
                    grad_b += dlogits.sum(0)
        grads = [g.div_(n) if g is not None else None for g in (grad_x, grad_w, grad_b)]
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.dtypes = [None if g is None else t.dtype for g, t in zip(grads, (x, weight, bias))]
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grads = [None if dtype is None else (next(saved) * grad_loss).to(dtype) for dtype in ctx.dtypes]
        return *grads, None, None
