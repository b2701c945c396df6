"""train-clip: CLIP under DeepSpeed, streaming raw image-text shards; it ranks DALL-E's samples.

    dalle-ds train-clip --data SHARDS --tokenizer FILE.model --out RUN_DIR [--config FILE] [--resume] [key=value ...]

Also ``python -m dalle_ds.training.train_clip ...`` for the deepspeed launcher. The contrastive
loss contrasts each rank's micro-batch with itself. TensorBoard shows retrieval accuracy on
fixed samples: top-1 text->image and image->text, where a match with the same caption counts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import constructor_defaults, to_dict
from ..data.images import images_to_float
from ..data.stream import ImageTextStream
from ..data.tokenizer import CaptionTokenizer
from ..models.clip import CLIP
from .metrics import training_flops
from .trainer import LoggingConfig, PathsConfig, RunConfig, Trainer, add_common_arguments, stream_config


_CLIP = constructor_defaults(CLIP)


@dataclass
class ClipModelConfig:
    """CLIP's architecture (its text vocabulary comes from --tokenizer); the defaults are CLIP's own."""

    dim_text: int = _CLIP["dim_text"]  # text encoder width
    dim_image: int = _CLIP["dim_image"]  # image encoder (ViT) width
    dim_latent: int = _CLIP["dim_latent"]  # shared embedding space
    text_enc_depth: int = _CLIP["text_enc_depth"]  # text transformer layers
    text_seq_len: int = _CLIP["text_seq_len"]  # caption tokens (longer captions are cut; counted)
    text_heads: int = _CLIP["text_heads"]  # text attention heads
    text_dim_head: int = _CLIP["text_dim_head"]  # width of each text head
    visual_enc_depth: int = _CLIP["visual_enc_depth"]  # ViT layers
    visual_heads: int = _CLIP["visual_heads"]  # ViT attention heads
    visual_dim_head: int = _CLIP["visual_dim_head"]  # width of each ViT head
    visual_image_size: int = _CLIP["visual_image_size"]  # images are resized (shorter side) and centre-cropped to this
    visual_patch_size: int = _CLIP["visual_patch_size"]  # ViT patch side
    dropout: float = _CLIP["dropout"]  # attention and feed-forward dropout in both encoders


@dataclass
class ClipLoggingConfig(LoggingConfig):
    retrieval_every_steps: int = 100  # retrieval accuracy on fixed samples (0: never)
    retrieval_samples: int = 64  # how many: the first ones of the data


@dataclass
class ClipPathsConfig(PathsConfig):
    tokenizer: str = ""  # the sentencepiece .model for the captions


@dataclass
class ClipRunConfig(RunConfig):
    paths: ClipPathsConfig = field(default_factory=ClipPathsConfig)
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    logging: ClipLoggingConfig = field(default_factory=ClipLoggingConfig)


def retrieval_accuracy(text_latents: torch.Tensor, image_latents: torch.Tensor, captions: list[str]) -> dict:
    """Top-1 retrieval both ways among n pairs; a match with the same caption counts as a hit
    (a corpus may hold one caption for many images)."""
    sim = text_latents.float() @ image_latents.float().t()
    same = np.array([[a == b for b in captions] for a in captions])
    rows = np.arange(len(captions))
    return {"clip/text_to_image_top1": float(same[rows, sim.argmax(dim=1).cpu().numpy()].mean()),
            "clip/image_to_text_top1": float(same[sim.argmax(dim=0).cpu().numpy(), rows].mean())}


class ClipTrainer(Trainer):
    command = "train-clip"
    config_class = ClipRunConfig
    model_class = CLIP
    text_weights = ("text_emb.weight",)

    def check_config(self) -> None:
        super().check_config()
        logging = self.config.logging
        if logging.retrieval_every_steps < 0 or logging.retrieval_samples < 2:
            raise ValueError("config logging.retrieval_every_steps must be >= 0 (0: never) and "
                             "logging.retrieval_samples >= 2")

    def check_inputs(self) -> None:
        super().check_inputs()
        self.tokenizer = CaptionTokenizer(self.config.paths.tokenizer)  # checked here, used by build_model

    def build_model(self) -> CLIP:
        return CLIP(num_text_tokens=self.tokenizer.vocab_size, **to_dict(self.config.model))

    def measure_flops_per_token(self) -> float:
        m = self.config.model
        text = torch.randint(1, self.tokenizer.vocab_size, (2, m.text_seq_len))
        images = torch.rand(2, 3, m.visual_image_size, m.visual_image_size)
        flops = training_flops(self.model, lambda: self.model(text, images, return_loss=True))
        return flops / (2 * self._tokens_per_sample())

    def _tokens_per_sample(self) -> int:
        m = self.config.model
        return m.text_seq_len + (m.visual_image_size // m.visual_patch_size) ** 2

    def build_stream(self) -> ImageTextStream:
        return ImageTextStream(self.config.paths.data, self.config.model.visual_image_size, stream_config(self.config),
                               tokenizer_path=self.config.paths.tokenizer, text_seq_len=self.config.model.text_seq_len,
                               rank=self.env.rank, world_size=self.env.world_size)

    def prepare(self) -> None:
        fixed = self.stream.first_samples(self.config.logging.retrieval_samples)
        self.fixed_captions = [caption for _, caption in fixed]
        self.fixed_images = self.stream.as_tensor(fixed)
        self.fixed_text = self.tokenizer.encode(self.fixed_captions, self.config.model.text_seq_len)

    def losses(self, batch: dict) -> list[torch.Tensor]:
        images = images_to_float(batch["images"]).to(self.precision)
        return [self.engine(batch["text"], images, text_mask=batch["mask"], return_loss=True)]

    def tokens(self, batch: dict) -> int:
        return batch["images"].shape[0] * self._tokens_per_sample()

    def visual_every(self) -> int:
        return self.config.logging.retrieval_every_steps

    def visualise(self) -> None:
        device = self.engine.device
        text = self.model.embed_text(self.fixed_text.ids.to(device), self.fixed_text.mask.to(device))
        images = self.model.embed_image(images_to_float(self.fixed_images.to(device)).to(self.precision))
        self.metrics.write(self.progress.step, retrieval_accuracy(text, images, self.fixed_captions))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="raw image-text shards: a folder, glob or brace pattern (shards/{00000..00099}.tar), "
                                  "or a::0.7,b::0.3 with data.resampled=true (paths.data)")
    p.add_argument("--tokenizer", help="the sentencepiece .model for the captions (paths.tokenizer)")
    add_common_arguments(p)


if __name__ == "__main__":
    import sys

    from ..cli import main

    sys.exit(main(["train-clip", *sys.argv[1:]]))
