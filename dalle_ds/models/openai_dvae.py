"""OpenAI's DALL-E dVAE (the ``dall_e`` package's Encoder and Decoder) as an image tokenizer.

The encoder maps pixels through the logit-Laplace squeeze and gives logits over the codebook at
every 8th pixel; a code is the most likely entry. The decoder takes the codes one-hot, and its
first ``channels`` outputs, through a sigmoid and the inverse squeeze, are the image. Module
names follow dall_e's ``blocks`` (its convs' ``w``, ``b`` are our ``weight``, ``bias``; import-vae
renames them).

einops legend: b batch, n codebook entries, h w code grid.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from einops import rearrange
from torch import nn

from .image_tokenizer import ImageTokenizer, fp32_code_logits
from .pretrained import records_config

GROUPS = 4  # resolution levels of encoder and decoder (dall_e's group_count); the grid is image / 8
LOGIT_LAPLACE_EPS = 0.1  # pixels are squeezed into [eps, 1 - eps] (dall_e.utils.map_pixels)


def _conv(dim_in: int, dim_out: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(dim_in, dim_out, kernel, padding=(kernel - 1) // 2)


class Block(nn.Module):
    """A residual block, its branch scaled by 1 / layers ** 2; the encoder's has kernels 3, 3, 3, 1,
    the decoder's 1, 3, 3, 3."""

    def __init__(self, dim_in: int, dim_out: int, num_layers: int, kernels: tuple[int, ...]):
        super().__init__()
        hidden = dim_out // 4
        dims = [dim_in, hidden, hidden, hidden, dim_out]
        self.id_path = _conv(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()
        layers = []
        for i, kernel in enumerate(kernels, start=1):
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", _conv(dims[i - 1], dims[i], kernel))]
        self.res_path = nn.Sequential(OrderedDict(layers))
        self.post_gain = 1 / num_layers**2

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _groups(dims: list[int], blocks_per_group: int, kernels: tuple[int, ...], resample) -> list:
    """(group_i, Sequential of blocks, then ``resample`` but in the last group) for dims[i] -> dims[i + 1]."""
    groups = []
    for i in range(GROUPS):
        layers = [(f"block_{j + 1}", Block(dims[i] if j == 0 else dims[i + 1], dims[i + 1],
                                           GROUPS * blocks_per_group, kernels)) for j in range(blocks_per_group)]
        if i < GROUPS - 1:
            layers.append(resample())
        groups.append((f"group_{i + 1}", nn.Sequential(OrderedDict(layers))))
    return groups


class OpenAIDiscreteVAE(ImageTokenizer, nn.Module):
    @records_config
    def __init__(
        self,
        image_size: int = 256,
        num_tokens: int = 8192,
        hidden_dim: int = 256,
        blocks_per_group: int = 2,
        init_dim: int = 128,
        channels: int = 3,
    ):
        """
        image_size: side of the square input images (OpenAI's model was trained at 256); a
            multiple of 8, the side of the code grid being image_size / 8.
        num_tokens: codebook size (``vocab_size``).
        hidden_dim: channels of the outermost level (``n_hid``); the levels have 1, 2, 4, 8 times it.
        blocks_per_group: residual blocks per level (``n_blk_per_group``).
        init_dim: channels the decoder's codes are embedded into (``n_init``).
        channels: image channels (``input_channels``, ``output_channels``).
        """
        super().__init__()
        if image_size % 2 ** (GROUPS - 1):
            raise ValueError(f"image_size must be a multiple of {2 ** (GROUPS - 1)}, got {image_size}")
        self.image_size, self.num_tokens, self.channels = image_size, num_tokens, channels
        widths = [hidden_dim * m for m in (1, 2, 4, 8)]
        self.encoder = nn.Sequential(OrderedDict([
            ("input", _conv(channels, hidden_dim, 7)),
            *_groups([hidden_dim, *widths], blocks_per_group, (3, 3, 3, 1), lambda: ("pool", nn.MaxPool2d(2))),
            ("output", nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=_conv(widths[-1], num_tokens, 1)))),
        ]))
        self.decoder = nn.Sequential(OrderedDict([
            ("input", _conv(num_tokens, init_dim, 1)),
            *_groups([init_dim, *reversed(widths)], blocks_per_group, (1, 3, 3, 3),
                     lambda: ("upsample", nn.Upsample(scale_factor=2, mode="nearest"))),
            ("output", nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=_conv(hidden_dim, 2 * channels, 1)))),
        ]))

    @property
    def grid_size(self) -> int:
        """Side of the code grid: image_size / 8."""
        return self.image_size // 2 ** (GROUPS - 1)

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """(b, c, H, W) in [0, 1] -> (b, h * w) long codes, row-major."""
        self.check_images(images)
        squeezed = (1 - 2 * LOGIT_LAPLACE_EPS) * images + LOGIT_LAPLACE_EPS
        output = self.encoder.output
        return fp32_code_logits(output.conv, output.relu(self.encoder[:-1](squeezed))).argmax(1).flatten(1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(b, h * w) codes -> (b, c, H, W) images in [0, 1]."""
        self.check_codes(codes)
        # the 1x1 input conv of a one-hot code is its weight column: looked up, not multiplied
        # by num_tokens channels that are almost all zero
        conv = self.decoder.input
        embeds = conv.weight[:, :, 0, 0].t()[codes.long()] + conv.bias  # (b, h * w, init_dim)
        stats = self.decoder[1:](rearrange(embeds, "b (h w) d -> b d h w", h=self.grid_size))
        means = torch.sigmoid(stats[:, :self.channels].float())
        return ((means - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)
