"""CLIP (Radford et al. 2021): a text transformer and a ViT, contrastively trained, used to rank
DALLE's generations. API-compatible with DALLE-pytorch's CLIP.

einops legend: b batch, n tokens, p patch side, c channels, h heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .pretrained import PretrainedMixin, records_config
from .transformer import Transformer


class CLIP(PretrainedMixin, nn.Module):
    @records_config
    def __init__(
        self,
        *,
        dim_text: int = 512,
        dim_image: int = 512,
        dim_latent: int = 512,
        num_text_tokens: int = 10000,
        text_enc_depth: int = 6,
        text_seq_len: int = 256,
        text_heads: int = 8,
        text_dim_head: int = 64,
        num_visual_tokens: int = 512,
        visual_enc_depth: int = 6,
        visual_heads: int = 8,
        visual_dim_head: int = 64,
        visual_image_size: int = 256,
        visual_patch_size: int = 32,
        channels: int = 3,
        dropout: float = 0.0,
    ):
        """
        dim_text / dim_image: widths of the text and image encoders; dim_latent: shared space.
        num_text_tokens, text_seq_len: text vocabulary (pad id 0) and maximum caption length.
        text_enc_depth, text_heads, text_dim_head: text transformer shape.
        visual_enc_depth, visual_heads, visual_dim_head: ViT shape.
        visual_image_size, visual_patch_size, channels: images are split into square patches.
        num_visual_tokens: accepted for DALLE-pytorch compatibility (its ViT ignores it too).
        dropout: attention and feed-forward dropout in both encoders.
        """
        super().__init__()
        if visual_image_size % visual_patch_size != 0:
            raise ValueError(
                f"visual_image_size {visual_image_size} must be divisible by visual_patch_size {visual_patch_size}"
            )
        self.num_text_tokens, self.text_seq_len = num_text_tokens, text_seq_len
        self.image_size, self.patch_size, self.channels = visual_image_size, visual_patch_size, channels
        num_patches = (visual_image_size // visual_patch_size) ** 2

        self.text_emb = nn.Embedding(num_text_tokens, dim_text)
        self.text_pos_emb = nn.Embedding(text_seq_len, dim_text)
        self.text_transformer = Transformer(dim_text, text_enc_depth, text_heads, text_dim_head,
                                            attn_dropout=dropout, ff_dropout=dropout)
        self.text_norm = nn.LayerNorm(dim_text)
        self.to_text_latent = nn.Linear(dim_text, dim_latent, bias=False)

        self.to_visual_embedding = nn.Linear(channels * visual_patch_size**2, dim_image)
        self.visual_pos_emb = nn.Embedding(num_patches, dim_image)
        self.visual_transformer = Transformer(dim_image, visual_enc_depth, visual_heads, visual_dim_head,
                                              attn_dropout=dropout, ff_dropout=dropout)
        self.visual_norm = nn.LayerNorm(dim_image)
        self.to_visual_latent = nn.Linear(dim_image, dim_latent, bias=False)

        # logit scale = exp(temperature); shape (1,), not a 0-d scalar, which DeepSpeed's initial
        # weight broadcast cannot send (it views every parameter as bytes)
        self.temperature = nn.Parameter(torch.ones(1))

    def embed_text(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(b, n) token ids -> (b, dim_latent) unit vectors (mean over unmasked tokens)."""
        if text.ndim != 2 or text.shape[1] > self.text_seq_len:
            raise ValueError(f"CLIP expects text of shape (batch, <= {self.text_seq_len}), got {tuple(text.shape)}")
        if text.numel() and (text.min() < 0 or text.max() >= self.num_text_tokens):
            raise ValueError(f"text token ids must lie in [0, {self.num_text_tokens})")
        mask = text != 0 if text_mask is None else text_mask.bool()
        if mask.shape != text.shape:
            raise ValueError(f"text_mask shape {tuple(mask.shape)} does not match text shape {tuple(text.shape)}")
        mask = mask.clone()
        mask[:, 0] = True  # an empty caption still has one token to pool
        x = self.text_emb(text) + self.text_pos_emb.weight[: text.shape[1]]
        key_mask = mask[:, None, None, :]  # (b, 1, 1, n): attend to real tokens only

        def attend(q, k, v, dropout_p):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)

        x = self.text_norm(self.text_transformer(x, [attend] * len(self.text_transformer.blocks)))
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(self.to_text_latent(pooled), dim=-1)

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """(b, c, H, W) -> (b, dim_latent) unit vectors."""
        expected = (self.channels, self.image_size, self.image_size)
        if image.ndim != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(f"CLIP expects images of shape (batch, {', '.join(map(str, expected))}), "
                             f"got {tuple(image.shape)}")
        patches = rearrange(image, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.patch_size, p2=self.patch_size)
        x = self.to_visual_embedding(patches) + self.visual_pos_emb.weight

        def attend(q, k, v, dropout_p):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)

        x = self.visual_norm(self.visual_transformer(x, [attend] * len(self.visual_transformer.blocks)))
        return F.normalize(self.to_visual_latent(x.mean(dim=1)), dim=-1)

    def clip_score(self, text, images, text_mask=None) -> torch.Tensor:
        """CLIPScore (b,): 100 x the cosine similarity of one caption (1, n) with each of the
        images (b, c, H, W), the caption embedded once. Unlike ``forward``'s similarity (scaled
        by the learnt temperature, DALLE-pytorch's), it is comparable across models; ``generate``
        ranks and ``eval`` averages it."""
        return 100 * (self.embed_image(images) @ self.embed_text(text, text_mask)[0])

    def forward(self, text, image, text_mask=None, return_loss=False):
        """Per-pair similarity (b,): the cosine scaled by the learnt temperature, as in
        DALLE-pytorch; or, with ``return_loss``, the symmetric contrastive loss."""
        text_latents = self.embed_text(text, text_mask)
        image_latents = self.embed_image(image)
        if text_latents.shape[0] != image_latents.shape[0]:
            raise ValueError(f"got {text_latents.shape[0]} texts but {image_latents.shape[0]} images")
        scale = self.temperature.exp()
        if not return_loss:
            return (text_latents * image_latents).sum(-1) * scale
        sim = text_latents @ image_latents.t() * scale
        labels = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)) / 2
