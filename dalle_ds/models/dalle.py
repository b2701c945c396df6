"""DALL-E: an autoregressive transformer over [bos | caption | image codes], API-compatible with
DALLE-pytorch's DALLE.

Sequence (see attention.patterns.SequenceLayout): position 0 is bos (id 0), positions
1..T the caption (T = text_seq_len; padding 0 becomes a distinct pad id per position, so padded
captions need no key mask), then the image codes in raster order. The last code is never an
input. Hidden state at position p predicts token p + 1: positions 0..T-1 give text logits,
T..T+N-1 give image logits (separate heads, so no compute is spent on the other vocabulary).

einops legend: b batch, n sequence, v vocabulary.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.kernels import attend
from ..attention.patterns import SequenceLayout, build_pattern, pattern_default
from . import static_decode
from .kv_cache import KVCache
from .linear_cross_entropy import LinearCrossEntropy
from .pretrained import PretrainedMixin, records_config
from .sampling import sample
from .transformer import Transformer

_VAE_INTERFACE = ("num_tokens", "image_size", "channels", "grid_size", "get_codebook_indices", "decode")


class DALLE(PretrainedMixin, nn.Module):
    @records_config
    def __init__(
        self,
        *,
        dim: int,
        vae,
        num_text_tokens: int = 10000,
        text_seq_len: int = 256,
        depth: int,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        reversible: bool = False,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        attn_types=None,
        loss_img_weight: float = 7.0,
        stable: bool = False,
        sandwich_norm: bool = False,
        null_cond_prob: float = 0.0,
        conv_kernel_size: int = pattern_default("conv_kernel_size"),
        sparse_block_size: int = pattern_default("sparse_block_size"),
        sparse_local_blocks: int = pattern_default("sparse_local_blocks"),
        sparse_stride: int = pattern_default("sparse_stride"),
        checkpoint_activations: bool = False,
    ):
        """
        dim, depth, heads, dim_head, ff_mult: transformer shape.
        vae: a trained image tokenizer (DiscreteVAE, VQGAN, OpenAIDiscreteVAE); it fixes the image grid
            and vocabulary, and is frozen.
        num_text_tokens: text vocabulary size (id 0 is padding); text_seq_len: caption length.
        attn_types: attention per layer, cycled over depth: 'full', 'axial_row', 'axial_col',
            'conv_like', 'sparse' (a name or a sequence of names; default all 'full').
        conv_kernel_size: window side of 'conv_like'. sparse_block_size, sparse_local_blocks,
            sparse_stride: the block-sparse pattern (see attention.patterns.BlockSparsePattern).
        reversible: RevNet layers; activation memory flat in depth.
        attn_dropout, ff_dropout: dropout rates.
        loss_img_weight: loss = (text_loss + w * image_loss) / (w + 1).
        stable: DALLE-pytorch's flag: divide the final hidden state by its (detached) max
            before the last LayerNorm (CogView's PB-relax of LayerNorm inputs), so fp16 cannot
            overflow there. Attention softmax is always max-subtracted in fp32 in our kernels.
        sandwich_norm: LayerNorm after each attention and feed-forward branch too (CogView).
        null_cond_prob: in training, the caption of each sample is dropped with this
            probability, which teaches the unconditional model classifier-free guidance needs.
        checkpoint_activations: recompute each layer's activations in backward instead of
            storing them (plain layers; reversible layers never store them).
        """
        super().__init__()
        missing = [name for name in _VAE_INTERFACE if not hasattr(vae, name)]
        if missing:
            raise ValueError(f"DALLE needs a trained image tokenizer (DiscreteVAE, VQGAN, OpenAIDiscreteVAE) as "
                             f"`vae`; got {type(vae).__name__} without {', '.join(missing)}")
        if not 0.0 <= null_cond_prob < 1.0:
            raise ValueError(f"null_cond_prob must be in [0, 1), got {null_cond_prob}")
        self.vae = vae.eval().requires_grad_(False)  # frozen: encodes images, decodes samples
        grid = vae.grid_size
        self.layout = SequenceLayout(text_len=text_seq_len + 1, grid_h=grid, grid_w=grid)
        self.num_text_tokens, self.text_seq_len = num_text_tokens, text_seq_len
        self.num_image_tokens, self.image_seq_len = vae.num_tokens, grid * grid
        self.loss_img_weight, self.null_cond_prob, self.stable = loss_img_weight, null_cond_prob, stable

        if attn_types is None or isinstance(attn_types, str):
            attn_types = (attn_types or "full",)
        attn_types = tuple(attn_types)
        if not attn_types:
            raise ValueError("attn_types must name at least one attention type")
        options = dict(conv_kernel_size=conv_kernel_size, sparse_block_size=sparse_block_size,
                       sparse_local_blocks=sparse_local_blocks, sparse_stride=sparse_stride)
        shared = {name: build_pattern(name, self.layout, **options) for name in dict.fromkeys(attn_types)}
        self.patterns = [shared[attn_types[i % len(attn_types)]] for i in range(depth)]
        self._attends = {name: partial(attend, pattern) for name, pattern in shared.items()}

        num_text_total = num_text_tokens + text_seq_len  # + a distinct pad id per position
        self.text_emb = nn.Embedding(num_text_total, dim)
        self.text_pos_emb = nn.Embedding(self.layout.text_len, dim)
        self.image_emb = nn.Embedding(self.num_image_tokens, dim)
        self.image_row_emb = nn.Embedding(grid, dim)
        self.image_col_emb = nn.Embedding(grid, dim)
        self.transformer = Transformer(dim, depth, heads, dim_head, ff_mult, attn_dropout, ff_dropout,
                                       sandwich_norm, reversible, checkpoint_activations)
        self.norm = nn.LayerNorm(dim)
        self.to_text_logits = nn.Linear(dim, num_text_total)
        self.to_image_logits = LinearCrossEntropy(dim, self.num_image_tokens)  # its loss never holds all logits

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # the VAE stays frozen, in eval mode, whatever the parent does
        return self

    # ---- inputs -------------------------------------------------------------------------

    def prepare_text(self, text: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(b, <= T) ids, 0 = pad -> (b, T) ids with each pad replaced by its position's pad id."""
        if text.ndim != 2 or text.dtype.is_floating_point or text.shape[1] > self.text_seq_len:
            raise ValueError(f"text must be integer token ids of shape (batch, <= {self.text_seq_len}); "
                             f"got {text.dtype} {tuple(text.shape)}")
        if text.numel() and (text.min() < 0 or text.max() >= self.num_text_tokens):
            raise ValueError(f"text ids must lie in [0, num_text_tokens={self.num_text_tokens}); got "
                             f"[{text.min().item()}, {text.max().item()}]")
        if mask is not None:
            if mask.shape != text.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match text shape {tuple(text.shape)}")
            text = text.masked_fill(~mask.bool(), 0)
        text = F.pad(text.long(), (0, self.text_seq_len - text.shape[1]))
        pad_ids = torch.arange(self.text_seq_len, device=text.device) + self.num_text_tokens
        return torch.where(text == 0, pad_ids, text)

    def null_text(self, batch: int, device) -> torch.Tensor:
        """The empty caption, as ``prepare_text`` would give it."""
        return self.prepare_text(torch.zeros(batch, 0, dtype=torch.long, device=device))

    def prepare_image(self, image: torch.Tensor | None) -> torch.Tensor | None:
        """Pixels (b, c, H, W) are encoded by the frozen VAE; codes (b, <= N) are checked."""
        if image is None:
            return None
        if image.dtype.is_floating_point:
            if image.ndim != 4:
                raise ValueError(f"image must be pixels (batch, channels, height, width) or codes (batch, "
                                 f"<= {self.image_seq_len}); got shape {tuple(image.shape)}")
            codes = self.vae.get_codebook_indices(image)
            if codes.shape[1] != self.image_seq_len:
                raise ValueError(f"the VAE gave {codes.shape[1]} codes per image, but DALLE was built for a "
                                 f"{self.layout.grid_h}x{self.layout.grid_w} grid ({self.image_seq_len} codes)")
            return codes
        if image.ndim != 2 or image.shape[1] > self.image_seq_len:
            raise ValueError(f"image codes must have shape (batch, <= {self.image_seq_len}); got {tuple(image.shape)}")
        if image.numel() and (image.min() < 0 or image.max() >= self.num_image_tokens):
            raise ValueError(f"image codes must lie in [0, {self.num_image_tokens}) (the VAE's num_tokens); got "
                             f"[{image.min().item()}, {image.max().item()}]")
        return image.long()

    # ---- the network ----------------------------------------------------------------------

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """(b, T) prepared ids -> (b, T + 1, dim) with bos in front."""
        bos = F.pad(text_ids, (1, 0), value=0)
        return self.text_emb(bos) + self.text_pos_emb.weight[: bos.shape[1]]

    def embed_image(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(b, m) codes at image indices [start, start + m) -> (b, m, dim)."""
        return self.embed_image_at(codes, torch.arange(start, start + codes.shape[1], device=codes.device))

    def embed_image_at(self, codes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(b, m) codes at the image indices ``indices`` (m,) -> (b, m, dim)."""
        w = self.layout.grid_w
        return self.image_emb(codes) + self.image_row_emb(indices // w) + self.image_col_emb(indices % w)

    def hidden(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Transformer over embedded positions [cache.length, cache.length + n) -> normed (b, n, dim)."""
        start = cache.length if cache is not None else 0

        def attend_fn(layer):
            if cache is None:  # one function per pattern, not per layer (what torch.compile would guard on)
                return self._attends[self.patterns[layer].name]

            def fn(q, k, v, dropout_p):
                k, v = cache.append(layer, k, v)
                return attend(self.patterns[layer], q, k, v, start=start, dropout_p=dropout_p)
            return fn

        h = self.transformer(x, [attend_fn(i) for i in range(len(self.patterns))])
        if cache is not None:
            cache.length += x.shape[1]
        return self.finish_hidden(h)

    def finish_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The transformer's output -> the normed hidden state the heads read."""
        if self.stable:
            h = h / h.abs().amax(dim=-1, keepdim=True).detach().clamp(min=1e-6)
        return self.norm(h)

    def forward(self, text, image=None, mask=None, return_loss=False, return_loss_breakdown=False):
        """text (b, <= T) ids; image: pixels (b, c, H, W) or codes (b, <= N); mask (b, <= T) bool.

        Returns logits (b, n, text vocab + image vocab) (each position's other vocabulary is
        masked out), or with ``return_loss`` the weighted loss, or with
        ``return_loss_breakdown`` too the tuple (loss, text_loss, image_loss).
        """
        text_ids = self.prepare_text(text, mask)
        if self.training and self.null_cond_prob > 0:
            dropped = torch.rand(text_ids.shape[0], device=text_ids.device) < self.null_cond_prob
            text_ids = torch.where(dropped[:, None], self.null_text(text_ids.shape[0], text_ids.device), text_ids)
        codes = self.prepare_image(image)
        if return_loss and (codes is None or codes.shape[1] != self.image_seq_len):
            raise ValueError(f"return_loss needs the full image: pixels or {self.image_seq_len} codes per sample")

        x = self.embed_text(text_ids)
        if codes is not None:
            inputs = codes[:, :-1] if codes.shape[1] == self.image_seq_len else codes
            x = torch.cat([x, self.embed_image(inputs)], dim=1)
        h = self.hidden(x)
        t = self.text_seq_len
        text_logits = self.to_text_logits(h[:, :t])
        if not return_loss:
            return self._joint_logits(text_logits, self.to_image_logits(h[:, t:]))
        text_loss = F.cross_entropy(text_logits.flatten(0, 1).float(), text_ids.flatten())
        image_loss = self.to_image_logits(h[:, t:], codes)
        loss = (text_loss + self.loss_img_weight * image_loss) / (self.loss_img_weight + 1)
        return (loss, text_loss, image_loss) if return_loss_breakdown else loss

    def _joint_logits(self, text_logits, image_logits):
        b, t, vt = text_logits.shape
        n, vi = t + image_logits.shape[1], image_logits.shape[2]
        logits = text_logits.new_full((b, n, vt + vi), torch.finfo(text_logits.dtype).min)
        logits[:, :t, :vt] = text_logits
        logits[:, t:, vt:] = image_logits
        return logits

    # ---- generation -------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_codes(self, text, *, mask=None, filter_thres=0.5, temperature=1.0, top_p=None, cond_scale=1.0,
                       img=None, num_init_img_tokens=None, use_cache=True, seed=None,
                       cuda_graph=False) -> torch.Tensor:
        """Samples image codes (b, N) for each caption in ``text`` (see ``generate_images``)."""
        if cuda_graph and (not use_cache or text.device.type not in static_decode.GRAPH_DEVICES):
            raise ValueError(f"cuda_graph=True replays the cached decoding step as a CUDA graph: it needs "
                             f"use_cache=True and the model on a CUDA device (got use_cache={use_cache}, "
                             f"text on {text.device})")
        was_training = self.training
        self.eval()
        try:
            text_ids = self.prepare_text(text, mask)
            b, device = text_ids.shape[0], text_ids.device
            guided = cond_scale != 1.0
            if guided:  # one batch: conditional rows, then unconditional rows
                text_ids = torch.cat([text_ids, self.null_text(b, device)])
            codes = torch.zeros(b, 0, dtype=torch.long, device=device)
            if img is not None:
                codes = self._priming_codes(img, b, num_init_img_tokens)
            generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
            cache = KVCache(len(self.patterns), self.layout.total_len) if use_cache else None
            step = None
            if cuda_graph:  # recorded on CUDA; elsewhere (the tests) the same step runs unrecorded
                step = static_decode.StaticDecodeStep(self, cache, text_ids.shape[0], device,
                                                      record=device.type == "cuda")
            for j in range(codes.shape[1], self.image_seq_len):
                both = codes.repeat(2, 1) if guided else codes
                if cache is None or cache.length == 0:
                    x = torch.cat([self.embed_text(text_ids), self.embed_image(both)], dim=1)
                    h = self.hidden(x, cache)[:, -1]
                    logits = self.to_image_logits(h)
                elif step is not None:
                    logits = step(both[:, -1:], j - 1)
                else:  # only the newest code goes through the network
                    h = self.hidden(self.embed_image(both[:, -1:], j - 1), cache)[:, -1]
                    logits = self.to_image_logits(h)
                if guided:
                    cond, uncond = logits.chunk(2)
                    logits = uncond + (cond - uncond) * cond_scale
                nxt = sample(logits, temperature=temperature, filter_thres=filter_thres, top_p=top_p,
                             generator=generator)
                codes = torch.cat([codes, nxt[:, None]], dim=1)
            return codes
        finally:
            self.train(was_training)

    def _priming_codes(self, img, batch: int, num_init: int | None) -> torch.Tensor:
        primed = self.prepare_image(img)
        num_init = int(0.4375 * self.image_seq_len) if num_init is None else num_init
        if primed.shape[0] != batch:
            raise ValueError(f"img has {primed.shape[0]} images to prime {batch} captions; give one per caption")
        if not 0 <= num_init <= primed.shape[1]:
            raise ValueError(f"num_init_img_tokens must be in [0, {primed.shape[1]}] (the codes given), got {num_init}")
        return primed[:, :num_init]

    @torch.inference_mode()
    def generate_images(self, text, *, mask=None, clip=None, filter_thres=0.5, temperature=1.0, top_p=None,
                        cond_scale=1.0, img=None, num_init_img_tokens=None, use_cache=True, seed=None,
                        cuda_graph=False):
        """Generates one image per caption: (b, c, H, W) in [0, 1] space.

        filter_thres: top-k keeping the top (1 - filter_thres) of the image vocabulary;
        top_p: nucleus sampling; temperature 0: greedy. cond_scale != 1: classifier-free
        guidance (train with null_cond_prob > 0). img (pixels or codes) primes the first
        num_init_img_tokens codes (default 43.75%, as DALLE-pytorch). seed: reproducible.
        cuda_graph (CUDA, with the cache): each token's step replays one recorded CUDA graph
        instead of launching its kernels from Python (``static_decode.py``).
        With ``clip``, returns (images, scores): image i for caption i, as without it, and
        scores[i] its CLIP score against caption i (rank them with ``scores.argsort``; ``dalle-ds
        generate`` keeps the best).
        """
        codes = self.generate_codes(text, mask=mask, filter_thres=filter_thres, temperature=temperature,
                                    top_p=top_p, cond_scale=cond_scale, img=img,
                                    num_init_img_tokens=num_init_img_tokens, use_cache=use_cache, seed=seed,
                                    cuda_graph=cuda_graph)
        images = self.vae.decode(codes)
        if clip is None:
            return images
        return images, clip(text, images, text_mask=mask)
