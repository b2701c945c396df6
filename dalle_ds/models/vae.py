"""Discrete VAE (DALL-E's dVAE with a Gumbel-softmax bottleneck), API-compatible with
DALLE-pytorch's DiscreteVAE.

Images enter in [0, 1] (per ``normalization`` they are standardised inside); ``decode`` and the
reconstructions come back in the same [0, 1] space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .image_tokenizer import ImageTokenizer
from .pretrained import records_config


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x):
        return self.net(x) + x


class DiscreteVAE(ImageTokenizer, nn.Module):
    @records_config
    def __init__(
        self,
        image_size: int = 256,
        num_tokens: int = 512,
        codebook_dim: int = 512,
        num_layers: int = 3,
        num_resnet_blocks: int = 0,
        hidden_dim: int = 64,
        channels: int = 3,
        smooth_l1_loss: bool = False,
        temperature: float = 0.9,
        straight_through: bool = False,
        kl_div_loss_weight: float = 0.0,
        normalization=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ):
        """
        image_size: side of the square input images; must be divisible by 2 ** num_layers.
        num_tokens: codebook size (image vocabulary of DALLE).
        codebook_dim: size of each codebook vector.
        num_layers: stride-2 down/up-sampling stages; the code grid is image_size / 2**num_layers.
        num_resnet_blocks: residual blocks after the encoder and before the decoder.
        hidden_dim: conv channels.
        temperature: Gumbel-softmax temperature (anneal it during training).
        straight_through: hard one-hot samples in the forward pass, soft gradients.
        kl_div_loss_weight: weight of KL(q(z|x) || uniform) in the loss.
        smooth_l1_loss: reconstruction loss smooth L1 instead of MSE.
        normalization: (means, stds) per channel applied to inputs, or None.
        """
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if image_size % (2**num_layers) != 0:
            raise ValueError(
                f"image_size {image_size} must be divisible by 2 ** num_layers = {2 ** num_layers}"
            )
        self.image_size, self.num_tokens, self.num_layers, self.channels = image_size, num_tokens, num_layers, channels
        self.temperature, self.straight_through = temperature, straight_through
        self.kl_div_loss_weight, self.smooth_l1_loss = kl_div_loss_weight, smooth_l1_loss
        self.codebook = nn.Embedding(num_tokens, codebook_dim)

        enc, dec = [], []
        enc_in = channels
        for _ in range(num_layers):
            enc += [nn.Conv2d(enc_in, hidden_dim, 4, stride=2, padding=1), nn.ReLU()]
            dec += [nn.ConvTranspose2d(hidden_dim, hidden_dim, 4, stride=2, padding=1), nn.ReLU()]
            enc_in = hidden_dim
        res = [ResBlock(hidden_dim) for _ in range(num_resnet_blocks)]
        self.encoder = nn.Sequential(*enc, *res, nn.Conv2d(hidden_dim, num_tokens, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(codebook_dim, hidden_dim, 1),
            *[ResBlock(hidden_dim) for _ in range(num_resnet_blocks)],
            *dec,
            nn.Conv2d(hidden_dim, channels, 1),
        )
        if normalization is not None:
            means, stds = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalization)
            if means.numel() != channels or stds.numel() != channels:
                raise ValueError(f"normalization needs {channels} means and stds, got {normalization}")
        else:
            means, stds = torch.zeros(1, channels, 1, 1), torch.ones(1, channels, 1, 1)
        self.register_buffer("norm_mean", means, persistent=False)
        self.register_buffer("norm_std", stds, persistent=False)

    @property
    def grid_size(self) -> int:
        """Side of the code grid: image_size / 2 ** num_layers."""
        return self.image_size // (2**self.num_layers)

    def _standardise(self, images):
        # in the images' dtype: engines that cast the weights to bf16 may leave buffers in fp32
        return (images - self.norm_mean.to(images.dtype)) / self.norm_std.to(images.dtype)

    def _logits(self, images):  # (b, c, H, W) in [0, 1] -> (b, num_tokens, h, w)
        self.check_images(images)
        return self.encoder(self._standardise(images))

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """(b, c, H, W) -> (b, h * w) long codes, row-major."""
        return self._logits(images).argmax(dim=1).flatten(1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(b, h * w) codes -> (b, c, H, W) images in [0, 1] space."""
        self.check_codes(codes)
        embeds = rearrange(self.codebook(codes.long()), "b (h w) d -> b d h w", h=self.grid_size)
        return self.decoder(embeds) * self.norm_std + self.norm_mean

    def forward(self, img, return_recon_loss=False, return_recons=False, return_logits=False, temp=None,
                return_loss=None):
        """Reconstruct ``img``. ``return_logits``: the encoder logits. ``return_recon_loss`` (alias
        ``return_loss``, DALLE-pytorch 1.x's name): the loss, plus the reconstructions when
        ``return_recons``. Otherwise the reconstructions."""
        return_recon_loss = return_recon_loss or bool(return_loss)
        logits = self._logits(img)
        if return_logits:
            return logits
        soft_one_hot = F.gumbel_softmax(logits, tau=temp or self.temperature, dim=1, hard=self.straight_through)
        sampled = torch.einsum("b n h w, n d -> b d h w", soft_one_hot, self.codebook.weight)
        out = self.decoder(sampled)  # standardised space
        recons = out * self.norm_std + self.norm_mean
        if not return_recon_loss:
            return recons
        target = self._standardise(img)
        recon_loss = (F.smooth_l1_loss if self.smooth_l1_loss else F.mse_loss)(out, target)
        log_qy = F.log_softmax(rearrange(logits, "b n h w -> b (h w) n"), dim=-1)
        log_uniform = torch.full_like(log_qy, -math.log(self.num_tokens))
        kl_div = F.kl_div(log_uniform, log_qy, reduction="batchmean", log_target=True)
        loss = recon_loss + kl_div * self.kl_div_loss_weight
        return (loss, recons) if return_recons else loss
