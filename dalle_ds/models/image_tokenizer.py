"""What every image tokenizer (DiscreteVAE, VQGAN, OpenAIDiscreteVAE) is to the rest of the
system: images in [0, 1] -> a row-major grid of codes, codes -> images in [0, 1]. DALLE,
pretokenize, decode-check, generate and eval use only this interface, and a model folder that
holds any subclass loads as ``ImageTokenizer.from_pretrained``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .pretrained import PretrainedMixin


def fp32_code_logits(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` in fp32 outside any autocast, for logits whose argmax is a code: in bf16
    (pretokenize's autocast on GPU) near ties among thousands of codes would flip."""
    with torch.autocast(x.device.type, enabled=False):
        bias = None if conv.bias is None else conv.bias.float()
        return F.conv2d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding)


class ImageTokenizer(PretrainedMixin):
    """A subclass sets ``image_size``, ``channels`` and ``num_tokens``, has a ``grid_size``
    (side of the code grid) and implements ``get_codebook_indices`` and ``decode``."""

    image_size: int
    channels: int
    num_tokens: int
    grid_size: int

    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """(b, c, H, W) images in [0, 1] -> (b, h * w) long codes, row-major."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(b, h * w) codes -> (b, c, H, W) images in [0, 1]."""
        raise NotImplementedError

    def check_images(self, images: torch.Tensor) -> None:
        expected = (self.channels, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects images of shape (batch, {', '.join(map(str, expected))}), "
                f"got {tuple(images.shape)}"
            )

    def check_codes(self, codes: torch.Tensor) -> None:
        n = self.grid_size**2
        if codes.ndim != 2 or codes.shape[1] != n:
            raise ValueError(f"expected codes of shape (batch, {n}), got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.numel() and (codes.min() < 0 or codes.max() >= self.num_tokens):
            raise ValueError(f"codes must be integers in [0, {self.num_tokens}), got {codes.dtype} "
                             f"in [{codes.min().item()}, {codes.max().item()}]")
