"""RevNet-style reversible residual stack (Gomez et al. 2017), as used by Reformer and DALL-E
reimplementations: activation memory does not grow with depth.

Each layer couples two streams: y1 = x1 + f(x2); y2 = x2 + g(y1). Forward keeps only the
last layer's graph; backward walks the other layers in reverse, reconstructing each layer's
inputs from its outputs while recomputing f and g with gradients. Dropout inside f and g draws
the same masks in the recomputation because each call replays the RNG state recorded in the
forward pass. The backward runs once per forward (its buffers are freed as it goes).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Branch = Callable[[torch.Tensor], torch.Tensor]


class _ReplayableBranch:
    """Calls a branch; remembers the RNG and autocast state of the recorded call to replay it
    (backward usually runs outside ``torch.autocast``, yet must recompute in the same precision)."""

    def __init__(self, fn: Branch):
        self.fn = fn
        self.cpu_state = self.cuda_state = self.autocast = None

    def record(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        self.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return self.fn(x)

    def replay(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        enabled, dtype = self.autocast
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], device_type=device):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_state is not None:
                torch.cuda.set_rng_state(self.cuda_state, x.device)
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                return self.fn(x)


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layers):
        x1, x2 = x.chunk(2, dim=-1)
        *rest, (f_last, g_last) = layers
        for f, g in rest:
            x1 = x1 + f.record(x2)
            x2 = x2 + g.record(x1)
        # The last layer keeps its graph: backward starts from it without recomputing it (one
        # layer's activations, whatever the depth).
        with torch.enable_grad():
            x1, x2 = x1.detach().requires_grad_(), x2.detach().requires_grad_()
            y1 = x1 + f_last.record(x2)
            y2 = x2 + g_last.record(y1)
        ctx.layers, ctx.last = rest, (x1, x2, y1, y2)
        return torch.cat([y1, y2], dim=-1).detach()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.last is None:
            raise RuntimeError("the reversible stack's backward runs once per forward: run the forward "
                               "again instead of backward with retain_graph=True")
        (x1, x2, y1, y2), ctx.last = ctx.last, None
        torch.autograd.backward([y1, y2], list(grad_out.chunk(2, dim=-1)))
        y1, y2, dy1, dy2 = x1.detach(), x2.detach(), x1.grad, x2.grad
        for f, g in reversed(ctx.layers):
            with torch.enable_grad():
                y1.requires_grad_(True)
                gy1 = g.replay(y1)
                torch.autograd.backward(gy1, dy2)
            with torch.no_grad():
                x2 = y2 - gy1
                dy1 = dy1 + y1.grad
            with torch.enable_grad():
                x2.requires_grad_(True)
                fx2 = f.replay(x2)
                torch.autograd.backward(fx2, dy1)
            with torch.no_grad():
                x1 = y1.detach() - fx2
                dy2 = dy2 + x2.grad
            y1, y2 = x1.detach(), x2.detach()
        return torch.cat([dy1, dy2], dim=-1), None


def reversible_sequence(x: torch.Tensor, layers: Sequence[tuple[Branch, Branch]], memory_efficient: bool = True):
    """x: (..., dim) -> (..., dim). The input is duplicated into both streams and the two output
    streams are averaged. ``memory_efficient=False`` differentiates the same computation with
    plain autograd (stores every activation); it is the reference for the custom backward."""
    x = torch.cat([x, x], dim=-1)
    if memory_efficient and torch.is_grad_enabled() and layers:
        # The parameters are not inputs of the Function (backward accumulates their .grad
        # directly, so torch.autograd.grad on them is not supported); its input must require
        # grad for backward to run at all, e.g. when the embeddings below are frozen.
        if not x.requires_grad:
            x = x.detach().requires_grad_()
        # autograd runs Function.forward without recording a graph: nothing is stored per layer
        wrapped = [(_ReplayableBranch(f), _ReplayableBranch(g)) for f, g in layers]
        x = _ReversibleFunction.apply(x, wrapped)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        for f, g in layers:
            x1 = x1 + f(x2)
            x2 = x2 + g(x1)
        x = torch.cat([x1, x2], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return (x1 + x2) / 2
