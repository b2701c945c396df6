"""DALL-E's attention patterns over a [text | image grid] sequence.

Sequence layout (positions): ``0 .. text_len-1`` are text (bos + caption), then image code
``i`` (raster order on a ``grid_h x grid_w`` grid) sits at position ``text_len + i``.

Every pattern is causal. Text queries attend causally to text. Image queries attend to all of
the text plus the image keys their pattern allows. Each pattern states its rule once, in
``image_rule``; the dense reference mask, the FlexAttention mask and the masks of the CPU
kernel's key groups are all derived from it, and the kernel asserts that the groups cover it.

The CPU kernel (``kernels.gathered_attention``) needs each pattern to cover its allowed keys
with *groups*: a group is a set of image queries and a set of image keys, scored under a mask.
``groups()`` returns them in buckets of equal shape (``GroupBucket``), as index tensors padded
with -1. A bucket may also list *shared* image keys that every one of its queries may see (the
block-sparse pattern's summary blocks): those are scored, like the text, in one matmul for the
whole bucket, unmasked and never copied per group. Every key a query may see must lie in the
text, its group's keys or its bucket's shared keys. The work done is
sum(|queries| x (text_len + |shared| + |group keys|)) over groups: it follows the density.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ..config import constructor_defaults


@dataclass(frozen=True)
class SequenceLayout:
    """Where text and image sit in the transformer's sequence."""

    text_len: int  # bos + text_seq_len
    grid_h: int
    grid_w: int

    @property
    def image_len(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def total_len(self) -> int:
        return self.text_len + self.image_len


@dataclass(frozen=True)
class GroupBucket:
    """Equally shaped groups of image indices (-1 = padding) for the CPU kernel. For exactness
    (the kernel checks it): each image query is in exactly one group, and no key is held twice
    for a group, neither within its keys nor between its keys and the bucket's shared keys."""

    queries: torch.Tensor  # (G, Lq): each group's queries
    keys: torch.Tensor  # (G, Lk): image keys each group's queries are scored against, masked by the rule
    shared: torch.Tensor = torch.zeros(0, dtype=torch.long)  # (S,): keys all the bucket's queries see


class AttentionPattern:
    """Base class: a causal [text | image] mask defined by an image-to-image rule."""

    name: str
    sparse = True  # False: plain causal attention computes it everywhere

    def __init__(self, layout: SequenceLayout):
        self.layout = layout
        self._derived: dict = {}

    def derived(self, key: tuple, build):
        """What the kernels derive from this pattern (per device, length, ...), built once."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def image_rule(self, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        """May image query ``qi`` see image key ``ki`` (both image indices, ki <= qi)?"""
        raise NotImplementedError

    def allowed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Boolean mask for sequence positions (broadcasting; tensor ops only, so that
        FlexAttention can trace it)."""
        t = self.layout.text_len
        qi = (q - t).clamp(min=0)
        ki = (k - t).clamp(min=0)
        return (k <= q) & ((k < t) | ((q >= t) & self.image_rule(qi, ki)))

    def dense_mask(self, n: int | None = None, device=None) -> torch.Tensor:
        """(n, n) bool mask. The reference that every fast path is tested against."""
        n = self.layout.total_len if n is None else n
        pos = torch.arange(n, device=device)
        return self.allowed(pos[:, None], pos[None, :])

    def groups(self) -> list[GroupBucket]:
        """Buckets of query groups that cover the rule. Every image query appears exactly once
        over all buckets."""
        raise NotImplementedError(f"{self.name} attention has no key groups")

    def image_alone(self) -> "AttentionPattern":
        """The same rule over the image alone, no text before it (split.py's image part)."""
        def build():
            alone = copy.copy(self)
            alone.layout, alone._derived = SequenceLayout(0, self.layout.grid_h, self.layout.grid_w), {}
            return alone
        return self.derived(("image_alone",), build)

    def flex_order(self) -> torch.Tensor | None:
        """Image indices in the order FlexAttention should lay them out, so that the pairs the
        rule allows fall in few (query block, key block) tiles; None: raster order."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layout})"


class FullPattern(AttentionPattern):
    name = "full"
    sparse = False  # plain causal attention computes it everywhere; on CPU the kernel may too
    group_queries = 128  # image queries per group of the CPU kernel (64 measured the same)

    def image_rule(self, qi, ki):
        return torch.ones_like(qi & ki, dtype=torch.bool)

    def groups(self):
        # Blockwise causal attention: each block of queries scores every earlier image key as
        # shared (unmasked) keys and its own block under the causal mask, one bucket per block.
        n, size = self.layout.image_len, self.group_queries
        blocks = [torch.arange(start, min(start + size, n))[None] for start in range(0, n, size)]
        return [GroupBucket(block, block, torch.arange(block[0, 0])) for block in blocks]  # the last one shorter


class AxialRowPattern(AttentionPattern):
    """Each image token sees the earlier tokens of its own row."""

    name = "axial_row"

    def image_rule(self, qi, ki):
        w = self.layout.grid_w
        return qi // w == ki // w

    def groups(self):
        idx = torch.arange(self.layout.image_len).view(self.layout.grid_h, self.layout.grid_w)
        return [GroupBucket(idx, idx)]


class AxialColPattern(AttentionPattern):
    """Each image token sees the earlier tokens of its own column."""

    name = "axial_col"

    def image_rule(self, qi, ki):
        w = self.layout.grid_w
        return qi % w == ki % w

    def groups(self):
        return [GroupBucket(self._columns(), self._columns())]

    def flex_order(self):
        # column-major: each column is one contiguous run, as a row is in raster order
        return self._columns().flatten()

    def _columns(self) -> torch.Tensor:
        return torch.arange(self.layout.image_len).view(self.layout.grid_h, self.layout.grid_w).t()


class ConvLikePattern(AttentionPattern):
    """Each image token sees the causal part of the k x k window centred on it."""

    name = "conv_like"
    # Queries per group: a tile_h x tile_w tile of the grid shares one key window. Bigger tiles
    # score more keys per query but run larger, more efficient matmuls; 4 x 8 measured best.
    tile_h, tile_w = 4, 8

    def __init__(self, layout: SequenceLayout, kernel_size: int = 5):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"conv_like kernel_size must be a positive odd number, got {kernel_size}")
        super().__init__(layout)
        self.kernel_size = kernel_size

    def image_rule(self, qi, ki):
        w, r = self.layout.grid_w, self.kernel_size // 2
        return (qi // w - ki // w <= r) & ((qi % w - ki % w).abs() <= r)

    def groups(self):
        h, w, r = self.layout.grid_h, self.layout.grid_w, self.kernel_size // 2
        th, tw = min(self.tile_h, h), min(self.tile_w, w)
        q_tiles, k_windows = [], []
        for r0 in range(0, h, th):
            for c0 in range(0, w, tw):
                q_tiles.append(_grid_indices(self.layout, range(r0, r0 + th), range(c0, c0 + tw)))
                k_windows.append(_grid_indices(self.layout, range(r0 - r, r0 + th), range(c0 - r, c0 + tw + r)))
        return [GroupBucket(torch.stack(q_tiles), torch.stack(k_windows))]


def _grid_indices(layout: SequenceLayout, rows: range, cols: range) -> torch.Tensor:
    """Raster indices of a rows x cols block of the grid, flattened; -1 outside the grid."""
    r, c = torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]
    inside = (r >= 0) & (r < layout.grid_h) & (c >= 0) & (c < layout.grid_w)
    return torch.where(inside, r * layout.grid_w + c, -1).flatten()


class BlockSparsePattern(AttentionPattern):
    """Image tokens in blocks of ``block_size`` (raster order). A block sees itself and the
    ``local_blocks - 1`` blocks before it, plus every ``stride``-th earlier block (the last
    block of each stride acts as a summary, as in Sparse Transformer's fixed pattern)."""

    name = "sparse"
    group_blocks = 2  # query blocks per group of the CPU kernel: bigger matmuls, more keys per query

    def __init__(self, layout: SequenceLayout, block_size: int = 16, local_blocks: int = 4, stride: int = 8):
        if min(block_size, local_blocks, stride) < 1:
            raise ValueError(
                f"sparse attention needs block_size, local_blocks and stride >= 1, got "
                f"{block_size}, {local_blocks}, {stride}"
            )
        super().__init__(layout)
        self.block_size, self.local_blocks, self.stride = block_size, local_blocks, stride

    def image_rule(self, qi, ki):
        bq, bk = qi // self.block_size, ki // self.block_size
        return (bq - bk < self.local_blocks) | (bk % self.stride == self.stride - 1)

    def groups(self):
        # A group is group_blocks query blocks and the local windows they see. The summary blocks
        # before the window are shared keys; groups with the same window width and the same
        # summaries form a bucket, so only the image's last group may be padded, and no summary
        # is scored for a query that cannot see it.
        n, bs, gb = self.layout.image_len, self.block_size, self.group_blocks
        buckets: dict[tuple[int, int], list[int]] = {}
        for first in range(0, math.ceil(n / bs), gb):  # the group's first query block
            start = max(0, first + 1 - self.local_blocks)  # its first key block
            buckets.setdefault((first + gb - start, start // self.stride), []).append(first)
        groups = []
        for (width, summaries), firsts in buckets.items():
            q_idx = torch.stack([torch.arange(first * bs, (first + gb) * bs) for first in firsts])
            k_idx = torch.stack([torch.arange((first + gb - width) * bs, (first + gb) * bs) for first in firsts])
            summary_blocks = torch.arange(summaries) * self.stride + self.stride - 1
            shared = (summary_blocks[:, None] * bs + torch.arange(bs)).flatten()
            groups.append(GroupBucket(_pad_out_of_range(q_idx, n), _pad_out_of_range(k_idx, n), shared))
        return groups

    def flex_order(self):
        # The summary blocks first, then the rest, each in raster order. In raster order every
        # 128 positions hold a summary block, so every earlier tile would be visited; gathered
        # together, the summaries fill a few tiles near the text, which all later queries share.
        idx = torch.arange(self.layout.image_len)
        summary = (idx // self.block_size) % self.stride == self.stride - 1
        return torch.cat([idx[summary], idx[~summary]])


def _pad_out_of_range(idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.where(idx < n, idx, -1)


# Each type's class and the model options (DALLE's keywords) its constructor takes, by its own
# parameter names; the defaults live in the constructors.
_BUILDERS = {
    "full": (FullPattern, {}),
    "axial_row": (AxialRowPattern, {}),
    "axial_col": (AxialColPattern, {}),
    "conv_like": (ConvLikePattern, {"conv_kernel_size": "kernel_size"}),
    "sparse": (BlockSparsePattern, {"sparse_block_size": "block_size", "sparse_local_blocks": "local_blocks",
                                    "sparse_stride": "stride"}),
}
ATTN_TYPES = tuple(_BUILDERS)


def build_pattern(attn_type: str, layout: SequenceLayout, **options) -> AttentionPattern:
    """``options``: conv_kernel_size, sparse_block_size, sparse_local_blocks, sparse_stride (each
    pattern takes its own; left out, the pattern's default)."""
    if attn_type not in _BUILDERS:
        raise ValueError(f"unknown attention type {attn_type!r}; expected one of {', '.join(ATTN_TYPES)}")
    cls, names = _BUILDERS[attn_type]
    return cls(layout, **{param: options[option] for option, param in names.items() if option in options})


def pattern_default(option: str):
    """The default of a model option (e.g. ``"sparse_stride"``): its pattern constructor's."""
    cls, names = next((cls, names) for cls, names in _BUILDERS.values() if option in names)
    return constructor_defaults(cls)[names[option]]
