"""train-dalle: DALL-E under DeepSpeed, streaming token shards (no dVAE in the loop).

    dalle-ds train-dalle --data TOKEN_DIR --tokenizer FILE.model --vae VAE --out RUN_DIR
                         [--config FILE] [--resume] [key=value ...]

Also ``python -m dalle_ds.training.train_dalle ...`` for the deepspeed launcher.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from ..attention import flex
from ..config import constructor_defaults, to_dict
from ..data.stream import TokenStream
from ..data.tokenizer import CaptionTokenizer
from ..models.dalle import DALLE
from ..models.image_tokenizer import ImageTokenizer
from ..models.pretrained import model_fingerprint
from .compile import compile_blocks
from .engine import load_ds_config
from .export import load_trained, trained_record
from .metrics import dalle_flops_per_token
from .trainer import (LoggingConfig, PathsConfig, RunConfig, Trainer, TrainConfig, add_common_arguments,
                      stream_config)


_DALLE = constructor_defaults(DALLE)


@dataclass
class DalleModelConfig:
    """DALLE's architecture (its vae and text vocabulary come from --vae and --tokenizer); the
    defaults are DALLE's own, but for the sizes it requires."""

    dim: int = 512  # model width
    depth: int = 12  # transformer layers
    heads: int = _DALLE["heads"]  # attention heads
    dim_head: int = _DALLE["dim_head"]  # width of each head
    ff_mult: int = _DALLE["ff_mult"]  # feed-forward width multiple
    text_seq_len: int = _DALLE["text_seq_len"]  # caption tokens (longer captions are cut; counted)
    attn_types: list[str] = field(default_factory=lambda: ["full"])  # cycled over layers (DALLE's None)
    reversible: bool = _DALLE["reversible"]  # RevNet layers: activation memory flat in depth
    attn_dropout: float = _DALLE["attn_dropout"]  # dropout on attention weights
    ff_dropout: float = _DALLE["ff_dropout"]  # dropout inside the feed-forward
    loss_img_weight: float = _DALLE["loss_img_weight"]  # loss = (text + w * image) / (w + 1)
    stable: bool = _DALLE["stable"]  # PB-relax before the final LayerNorm
    sandwich_norm: bool = _DALLE["sandwich_norm"]  # LayerNorm after each branch too
    null_cond_prob: float = _DALLE["null_cond_prob"]  # drop captions this often: > 0 trains classifier-free guidance
    conv_kernel_size: int = _DALLE["conv_kernel_size"]  # window of conv_like layers
    sparse_block_size: int = _DALLE["sparse_block_size"]  # block-sparse layers: block size,
    sparse_local_blocks: int = _DALLE["sparse_local_blocks"]  # local window in blocks,
    sparse_stride: int = _DALLE["sparse_stride"]  # and every stride-th block as a summary
    # recompute activations in backward: less memory, ~1/3 more compute
    checkpoint_activations: bool = _DALLE["checkpoint_activations"]


@dataclass
class DalleLoggingConfig(LoggingConfig):
    sample_every_steps: int = 1_000  # a grid of generated images in TensorBoard (0: never)
    sample_prompts: list[str] = field(default_factory=list)  # captions to draw; empty: the first ones of the data
    sample_cond_scale: float = 3.0  # classifier-free guidance of the sample grid


@dataclass
class DallePathsConfig(PathsConfig):
    tokenizer: str = ""  # the sentencepiece .model the captions use
    vae: str = ""  # the dVAE the token shards were made with: an export or a train-vae run folder


@dataclass
class DalleTrainConfig(TrainConfig):
    # regional torch.compile of each transformer block (attention stays outside the graphs; plain
    # layers, ZeRO 0-2); off until measured on a GPU
    compile_blocks: bool = False


@dataclass
class DalleRunConfig(RunConfig):
    train: DalleTrainConfig = field(default_factory=DalleTrainConfig)
    paths: DallePathsConfig = field(default_factory=DallePathsConfig)
    model: DalleModelConfig = field(default_factory=DalleModelConfig)
    logging: DalleLoggingConfig = field(default_factory=DalleLoggingConfig)


class DalleTrainer(Trainer):
    command = "train-dalle"
    config_class = DalleRunConfig
    model_class = DALLE
    text_weights = ("text_emb.weight", "to_text_logits.weight", "to_text_logits.bias")
    loss_names = ("loss/total", "loss/text", "loss/image")

    def check_config(self) -> None:
        super().check_config()
        if self.config.logging.sample_every_steps < 0:
            raise ValueError("config logging.sample_every_steps must be >= 0 (0: never sample)")

    def check_inputs(self) -> None:
        super().check_inputs()
        self.tokenizer = CaptionTokenizer(self.config.paths.tokenizer)  # checked here, used by build_model
        trained_record(self.config.paths.vae, ImageTokenizer)
        train = self.config.train
        stage = load_ds_config(train.deepspeed_config).get("zero_optimization", {}).get("stage", 0)
        if train.compile_blocks and stage == 3:
            raise ValueError("train.compile_blocks does not go with ZeRO-3, which gathers each layer's weights in "
                             "hooks around its forward: use a ZeRO 0-2 ds_config or train.compile_blocks=false")

    def build_model(self) -> DALLE:
        vae = load_trained(self.config.paths.vae, ImageTokenizer)[0]
        self.vae_fingerprint = model_fingerprint(vae)
        model = DALLE(vae=vae, num_text_tokens=self.tokenizer.vocab_size, **to_dict(self.config.model))
        if self.config.train.compile_blocks:
            compile_blocks(model.transformer)
        return model

    def measure_flops_per_token(self) -> float:
        return dalle_flops_per_token(self.model)

    def build_stream(self) -> TokenStream:
        return TokenStream(self.config.paths.data, self.config.paths.tokenizer, self.config.model.text_seq_len,
                           stream_config(self.config), rank=self.env.rank, world_size=self.env.world_size,
                           vae_fingerprint=self.vae_fingerprint)

    def prepare(self) -> None:
        self.sample_prompts = (self.config.logging.sample_prompts
                               or [caption for _, caption in self.stream.first_samples(4)])

    def losses(self, batch: dict) -> list[torch.Tensor]:
        return list(self.engine(batch["text"], batch["codes"], mask=batch["mask"], return_loss=True,
                                return_loss_breakdown=True))

    def tokens(self, batch: dict) -> int:
        return batch["text"].shape[0] * (batch["text"].shape[1] + batch["codes"].shape[1])

    def extra_logs(self) -> dict:
        """This rank's FlexAttention compiles and sparse calls that could not use it (see attention/flex.py)."""
        return {"attention/flex_compiles": flex.COUNTS["compiles"],
                "attention/unfused_calls": flex.COUNTS["unfused_calls"]}

    def stability_hint(self) -> str:
        return ", or model.stable=true"

    def visual_every(self) -> int:
        return self.config.logging.sample_every_steps

    def visualise(self) -> None:
        """Generated images for fixed captions, with the frozen dVAE; every rank generates the
        same grid (ZeRO-3 gathers the weights collectively)."""
        text = self.tokenizer.encode(self.sample_prompts, self.config.model.text_seq_len)
        images = self.model.generate_images(text.ids.to(self.engine.device), mask=text.mask.to(self.engine.device),
                                            cond_scale=self.config.logging.sample_cond_scale,
                                            seed=self.config.train.seed)
        self.metrics.image_grid(self.progress.step, "samples", images, self.sample_prompts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="token-shard folder (from pretokenize), or a::0.7,b::0.3 with "
                                  "data.resampled=true (paths.data)")
    p.add_argument("--tokenizer", help="the sentencepiece .model the captions use (paths.tokenizer)")
    p.add_argument("--vae", help="the dVAE the token shards were made with (export or train-vae run folder; paths.vae)")
    add_common_arguments(p)


if __name__ == "__main__":
    import sys

    from ..cli import main

    sys.exit(main(["train-dalle", *sys.argv[1:]]))
