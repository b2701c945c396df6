"""VQGAN as an image tokenizer: the architecture of taming-transformers' VQModel (nearest-entry
vector quantisation) and GumbelVQ (a learned projection to code logits). A convolutional encoder
with self-attention at the low resolutions, a 1x1 conv into the codebook space, the quantiser, a
1x1 conv back, and a mirrored decoder. Module names follow taming's, so that its checkpoints
load as they are once ``import-vae`` has dropped the training-only loss weights.

Images enter in [0, 1] and come back in [0, 1]; taming's networks work in [-1, 1], converted here.

einops legend: b batch, c channels, h w feature map (or code grid), d codebook dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .image_tokenizer import ImageTokenizer, fp32_code_logits
from .pretrained import records_config

# taming-transformers' released configs; the constructor's defaults are the f16 ones
PRESETS = {
    "imagenet_f16_1024": dict(num_tokens=1024),
    "imagenet_f16_16384": dict(num_tokens=16384),
    "gumbel_f8_8192": dict(num_tokens=8192, ch_mult=(1, 1, 2, 4), attn_resolutions=(32,), quantizer="gumbel"),
}
NORM_GROUPS = 32  # every GroupNorm of taming's networks


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6)


def _conv3(dim_in: int, dim_out: int) -> nn.Conv2d:
    return nn.Conv2d(dim_in, dim_out, 3, padding=1)


class ResnetBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(dim_in), _conv3(dim_in, dim_out)
        self.norm2, self.conv2 = _norm(dim_out), _conv3(dim_out, dim_out)
        if dim_in != dim_out:
            self.nin_shortcut = nn.Conv2d(dim_in, dim_out, 1)

    def forward(self, x):  # (b, c_in, h, w) -> (b, c_out, h, w)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions of a feature map."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = _norm(dim)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(dim, dim, 1) for _ in range(4))

    def forward(self, x):  # (b, c, h, w) -> (b, c, h, w)
        normed = self.norm(x)
        q, k, v = (rearrange(f(normed), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scaled by c ** -0.5, as taming's
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[2]))


class Downsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)

    def forward(self, x):  # (b, c, h, w) -> (b, c, h / 2, w / 2); taming pads right and bottom only
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = _conv3(dim, dim)

    def forward(self, x):  # (b, c, h, w) -> (b, c, 2h, 2w)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Middle(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(dim, dim), AttnBlock(dim), ResnetBlock(dim, dim)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


def _stage(dim_in: int, dim_out: int, num_blocks: int, attention: bool) -> nn.Module:
    """One resolution level: ``num_blocks`` residual blocks, each followed by attention if asked."""
    stage = nn.Module()
    stage.block = nn.ModuleList(ResnetBlock(dim_in if i == 0 else dim_out, dim_out) for i in range(num_blocks))
    stage.attn = nn.ModuleList(AttnBlock(dim_out) for _ in range(num_blocks) if attention)
    return stage


def _run_stage(stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(stage.block):
        h = block(h)
        if len(stage.attn):
            h = stage.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, channels, hidden_dim, ch_mult, num_res_blocks, attn_resolutions, image_size, z_channels):
        super().__init__()
        dims = [hidden_dim * m for m in (1, *ch_mult)]
        self.conv_in = _conv3(channels, hidden_dim)
        self.down = nn.ModuleList()
        resolution = image_size
        for level, (dim_in, dim_out) in enumerate(zip(dims[:-1], dims[1:])):
            stage = _stage(dim_in, dim_out, num_res_blocks, resolution in attn_resolutions)
            if level < len(ch_mult) - 1:
                stage.downsample = Downsample(dim_out)
                resolution //= 2
            self.down.append(stage)
        self.mid = Middle(dims[-1])
        self.norm_out, self.conv_out = _norm(dims[-1]), _conv3(dims[-1], z_channels)

    def forward(self, x):  # (b, channels, H, W) in [-1, 1] -> (b, z_channels, h, w)
        h = self.conv_in(x)
        for stage in self.down:
            h = _run_stage(stage, h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, channels, hidden_dim, ch_mult, num_res_blocks, attn_resolutions, image_size, z_channels):
        super().__init__()
        dims = [hidden_dim * m for m in ch_mult]
        self.conv_in = _conv3(z_channels, dims[-1])
        self.mid = Middle(dims[-1])
        self.up = nn.ModuleList()  # indexed by level, as the encoder's down; run from the last level
        resolution = image_size // 2 ** (len(ch_mult) - 1)
        dim_in = dims[-1]
        for level in reversed(range(len(ch_mult))):
            stage = _stage(dim_in, dims[level], num_res_blocks + 1, resolution in attn_resolutions)
            if level > 0:
                stage.upsample = Upsample(dims[level])
                resolution *= 2
            self.up.insert(0, stage)
            dim_in = dims[level]
        self.norm_out, self.conv_out = _norm(dims[0]), _conv3(dims[0], channels)

    def forward(self, z):  # (b, z_channels, h, w) -> (b, channels, H, W) in about [-1, 1]
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = _run_stage(stage, h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """VQModel's: each position takes the codebook entry nearest to it."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, dim)

    def codes(self, z):  # (b, d, h, w) -> (b, h, w)
        # in fp32 whatever the autocast: bf16 distances would tie entries that are merely close
        with torch.autocast(z.device.type, enabled=False):
            flat = rearrange(z.float(), "b d h w -> (b h w) d")
            entries = self.embedding.weight.float()
            distances = flat.pow(2).sum(1, keepdim=True) + entries.pow(2).sum(1) - 2 * flat @ entries.t()
        return distances.argmin(1).view(z.shape[0], *z.shape[2:])

    def lookup(self, codes):  # (b, h, w) -> (b, d, h, w)
        return rearrange(self.embedding(codes), "b h w d -> b d h w")


class GumbelQuantizer(nn.Module):
    """GumbelVQ's: a 1x1 conv gives each position logits over the codebook. Its code here is the
    most likely entry; taming's training samples with Gumbel noise, which a tokenizer must not."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, num_tokens, 1)
        self.embed = nn.Embedding(num_tokens, dim)

    def codes(self, z):  # (b, d, h, w) -> (b, h, w)
        return fp32_code_logits(self.proj, z).argmax(1)

    def lookup(self, codes):  # (b, h, w) -> (b, d, h, w)
        return rearrange(self.embed(codes), "b h w d -> b d h w")


QUANTIZERS = {"vq": VectorQuantizer, "gumbel": GumbelQuantizer}


class VQGAN(ImageTokenizer, nn.Module):
    @records_config
    def __init__(
        self,
        image_size: int = 256,
        num_tokens: int = 1024,
        embed_dim: int = 256,
        z_channels: int = 256,
        hidden_dim: int = 128,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions=(16,),
        channels: int = 3,
        quantizer: str = "vq",
    ):
        """
        image_size: side of the square input images (taming's ``resolution``); it fixes where
            attention goes, and the code grid is image_size / 2 ** (len(ch_mult) - 1).
        num_tokens: codebook size (``n_embed``); embed_dim: size of each codebook vector.
        z_channels: channels of the encoder's output and of the decoder's input.
        hidden_dim: channels of the first level (``ch``); level i has hidden_dim * ch_mult[i].
        num_res_blocks: residual blocks per encoder level (the decoder has one more).
        attn_resolutions: feature-map sides at which a level's blocks are followed by attention.
        channels: image channels (``in_channels`` = ``out_ch``).
        quantizer: 'vq' (VQModel: the nearest codebook entry) or 'gumbel' (GumbelVQ: the most
            likely entry of a learned projection of the embed_dim channels; taming's GumbelVQ
            runs only with embed_dim == z_channels).
        Presets: ``VQGAN.preset(name)`` with a name of PRESETS.
        """
        super().__init__()
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {sorted(QUANTIZERS)}, got {quantizer!r}")
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size {image_size} must be divisible by 2 ** (len(ch_mult) - 1) = "
                             f"{2 ** (len(ch_mult) - 1)}")
        if hidden_dim % NORM_GROUPS:
            raise ValueError(f"hidden_dim must be a multiple of {NORM_GROUPS} (GroupNorm groups), got {hidden_dim}")
        self.image_size, self.num_tokens, self.channels = image_size, num_tokens, channels
        self.num_downsamples = len(ch_mult) - 1
        shape = dict(channels=channels, hidden_dim=hidden_dim, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                     attn_resolutions=tuple(attn_resolutions), image_size=image_size, z_channels=z_channels)
        self.encoder, self.decoder = Encoder(**shape), Decoder(**shape)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.quantize = QUANTIZERS[quantizer](num_tokens, embed_dim)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @classmethod
    def preset(cls, name: str, **overrides) -> "VQGAN":
        """An untrained VQGAN of a released config: imagenet_f16_1024, imagenet_f16_16384, gumbel_f8_8192."""
        if name not in PRESETS:
            raise ValueError(f"unknown VQGAN preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def grid_size(self) -> int:
        """Side of the code grid: image_size / 2 ** (len(ch_mult) - 1)."""
        return self.image_size // 2**self.num_downsamples

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """(b, c, H, W) in [0, 1] -> (b, h * w) long codes, row-major."""
        self.check_images(images)
        return self.quantize.codes(self.quant_conv(self.encoder(images * 2 - 1))).flatten(1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(b, h * w) codes -> (b, c, H, W) images in [0, 1]."""
        self.check_codes(codes)
        embeds = self.quantize.lookup(rearrange(codes.long(), "b (h w) -> b h w", h=self.grid_size))
        return (self.decoder(self.post_quant_conv(embeds)).clamp(-1, 1) + 1) / 2
