"""Pre-norm transformer used by DALLE and CLIP.

Attention here owns the projections only. What the heads attend to (a causal pattern with a KV
cache in DALLE, a padding mask in CLIP) is an ``AttendFn`` handed in by the caller per layer, so
this file knows nothing about sparsity, caches or devices.

einops legend: b batch, n sequence, h heads, d head dim.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .reversible import reversible_sequence

# attend(q, k, v, dropout_p=...) -> out, all (b, h, n, d)
AttendFn = Callable[..., torch.Tensor]


class Attention(nn.Module):
    """The projections around an attention call; the call itself is the block's (see Block)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def qkv(self, x: torch.Tensor):
        """(b, n, dim) -> q, k, v, each (b, h, n, d)."""
        return rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)

    def out(self, heads: torch.Tensor) -> torch.Tensor:
        """(b, h, n, d) -> (b, n, dim)."""
        return self.to_out(rearrange(heads, "b h n d -> b n (h d)"))

    @property
    def dropout_p(self) -> float:
        return self.dropout if self.training else 0.0


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020), as in DALLE-pytorch."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult * 2)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(dim * mult, dim)

    def forward(self, x):
        h = self.proj_in(x)
        if torch.compiler.is_compiling():  # plain ops, which inductor fuses; _GEGLU's out= writes would break the graph
            x, gate = h.chunk(2, dim=-1)
            return self.proj_out(self.dropout(x * F.gelu(gate)))
        return self.proj_out(self.dropout(_GEGLU.apply(h)))


class _GEGLU(torch.autograd.Function):
    """x * gelu(gate) for [x | gate] = h, with a backward that writes both halves of dh in place:
    autograd's chunk would concatenate them afterwards, one more pass over the widest tensor."""

    @staticmethod
    def forward(ctx, h):
        x, gate = h.chunk(2, dim=-1)
        activated = F.gelu(gate)
        ctx.save_for_backward(x, gate, activated)
        return x * activated

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, gate, activated = ctx.saved_tensors
        dh = grad.new_empty(*grad.shape[:-1], 2 * grad.shape[-1])
        dx, dgate = dh.chunk(2, dim=-1)
        torch.mul(grad, activated, out=dx)
        torch.mul(grad, x, out=dgate)  # d(activated), turned into d(gate) in place: no temporary
        torch.ops.aten.gelu_backward.grad_input(dgate, gate, grad_input=dgate)
        return dh


class Block(nn.Module):
    """Attention and feed-forward branches, each pre-normed and, with sandwich norm (CogView),
    post-normed too. ``forward`` is the plain residual layer; the reversible stack couples the
    branches itself."""

    def __init__(self, dim, heads, dim_head, ff_mult, attn_dropout, ff_dropout, sandwich_norm):
        super().__init__()
        post_norm = (lambda: nn.LayerNorm(dim)) if sandwich_norm else nn.Identity
        self.attn_norm, self.attn, self.attn_post_norm = (
            nn.LayerNorm(dim), Attention(dim, heads, dim_head, attn_dropout), post_norm())
        self.ff_norm, self.ff, self.ff_post_norm = (
            nn.LayerNorm(dim), FeedForward(dim, ff_mult, ff_dropout), post_norm())

    def attn_branch(self, x, attend: AttendFn):
        q, k, v = self.attn.qkv(self.attn_norm(x))
        return self.attn_post_norm(self.attn.out(attend(q, k, v, dropout_p=self.attn.dropout_p)))

    def ff_branch(self, x):
        return self.ff_post_norm(self.ff(self.ff_norm(x)))

    def forward(self, x, attend: AttendFn):
        # attn_branch, written out so that the attention call stands in this frame: compiled
        # (train.compile_blocks), dynamo breaks the graph at that call, and a break inside a nested
        # call would split the block into a graph per enclosing frame, each with its own host cost
        q, k, v = self.attn.qkv(self.attn_norm(x))
        x = x + self.attn_post_norm(self.attn.out(attend(q, k, v, dropout_p=self.attn.dropout_p)))
        return x + self.ff_branch(x)


class Transformer(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        sandwich_norm: bool = False,
        reversible: bool = False,
        checkpoint_activations: bool = False,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, heads, dim_head, ff_mult, attn_dropout, ff_dropout, sandwich_norm) for _ in range(depth)
        )
        self.reversible = reversible
        # Plain layers recompute their activations in backward instead of storing them.
        self.checkpoint_activations = checkpoint_activations
        # False: differentiate the reversible stack with plain autograd (the test reference).
        self.reversible_memory_efficient = True

    def forward(self, x: torch.Tensor, attends: Sequence[AttendFn]) -> torch.Tensor:
        """x: (b, n, dim); ``attends``: one attention function per layer."""
        if self.reversible:
            layers = [(partial(blk.attn_branch, attend=a), blk.ff_branch) for blk, a in zip(self.blocks, attends)]
            return reversible_sequence(x, layers, self.reversible_memory_efficient)
        for blk, attend in zip(self.blocks, attends):
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = checkpoint(blk, x, attend, use_reentrant=False)
            else:
                x = blk(x, attend)
        return x
