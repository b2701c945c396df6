"""train-vae: the discrete VAE under DeepSpeed, streaming raw image-text shards.

    dalle-ds train-vae --data SHARDS --out RUN_DIR [--config FILE] [--resume] [key=value ...]

Also ``python -m dalle_ds.training.train_vae ...`` for the deepspeed launcher. The Gumbel
temperature anneals with the step (so a resumed run anneals alike); TensorBoard shows codebook
usage and reconstructions of fixed images through the hard codes DALL-E will train on.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import constructor_defaults, to_dict
from ..data.images import images_to_float
from ..data.stream import ImageTextStream
from ..models.vae import DiscreteVAE
from .metrics import codebook_usage, training_flops
from .trainer import LoggingConfig, RunConfig, Trainer, add_common_arguments, stream_config


_VAE = constructor_defaults(DiscreteVAE)


@dataclass
class VaeModelConfig:
    """DiscreteVAE's architecture and loss; the defaults are DiscreteVAE's own."""

    image_size: int = _VAE["image_size"]  # images are resized (shorter side) and centre-cropped to this
    num_tokens: int = _VAE["num_tokens"]  # codebook size: DALL-E's image vocabulary (OpenAI's dVAE: 8192)
    codebook_dim: int = _VAE["codebook_dim"]  # width of each codebook vector
    num_layers: int = _VAE["num_layers"]  # stride-2 stages: the code grid is image_size / 2**num_layers
    num_resnet_blocks: int = _VAE["num_resnet_blocks"]  # residual blocks after the encoder and before the decoder
    hidden_dim: int = _VAE["hidden_dim"]  # conv channels
    smooth_l1_loss: bool = _VAE["smooth_l1_loss"]  # reconstruction loss smooth L1 instead of MSE
    temperature: float = _VAE["temperature"]  # Gumbel-softmax temperature at step 0 (annealed, see anneal.*)
    straight_through: bool = _VAE["straight_through"]  # hard one-hot samples forward, soft gradients
    kl_div_loss_weight: float = _VAE["kl_div_loss_weight"]  # weight of KL(q(z|x) || uniform): spreads codebook use


@dataclass
class AnnealConfig:
    temperature_min: float = 0.5  # the Gumbel temperature decays to this floor,
    rate: float = 1e-6  # as temperature x exp(-rate x step)


@dataclass
class VaeLoggingConfig(LoggingConfig):
    image_every_steps: int = 1_000  # originals and reconstructions of fixed images in TensorBoard (0: never)
    image_count: int = 8  # how many images


@dataclass
class VaeRunConfig(RunConfig):
    model: VaeModelConfig = field(default_factory=VaeModelConfig)
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    logging: VaeLoggingConfig = field(default_factory=VaeLoggingConfig)


class VaeTrainer(Trainer):
    command = "train-vae"
    config_class = VaeRunConfig
    model_class = DiscreteVAE

    def check_config(self) -> None:
        super().check_config()
        logging, anneal = self.config.logging, self.config.anneal
        if logging.image_every_steps < 0 or logging.image_count < 1:
            raise ValueError("config logging.image_every_steps must be >= 0 (0: never) and logging.image_count >= 1")
        if not 0 < anneal.temperature_min <= self.config.model.temperature or anneal.rate < 0:
            raise ValueError("config needs 0 < anneal.temperature_min <= model.temperature and anneal.rate >= 0")

    def build_model(self) -> DiscreteVAE:
        return DiscreteVAE(**to_dict(self.config.model))

    def measure_flops_per_token(self) -> float:
        size = self.model.image_size
        flops = training_flops(self.model, lambda: self.model(torch.rand(1, 3, size, size), return_loss=True))
        return flops / self.model.grid_size**2

    def build_stream(self) -> ImageTextStream:
        return ImageTextStream(self.config.paths.data, self.model.image_size, stream_config(self.config),
                               rank=self.env.rank, world_size=self.env.world_size)

    def prepare(self) -> None:
        fixed = self.stream.first_samples(self.config.logging.image_count)
        self.fixed_images = self.stream.as_tensor(fixed)
        self.code_counts = torch.zeros(self.model.num_tokens, dtype=torch.long, device=self.engine.device)
        self.model.encoder.register_forward_hook(self._count_codes)

    def _count_codes(self, module, inputs, logits) -> None:
        if module.training:  # the codes of training batches, not of the pictures
            self.code_counts += torch.bincount(logits.detach().argmax(dim=1).flatten(), minlength=len(self.code_counts))

    def temperature(self) -> float:
        anneal = self.config.anneal
        return max(self.config.model.temperature * math.exp(-anneal.rate * self.progress.step), anneal.temperature_min)

    def losses(self, batch: dict) -> list[torch.Tensor]:
        images = images_to_float(batch["images"]).to(self.precision)
        return [self.engine(images, return_loss=True, temp=self.temperature())]

    def tokens(self, batch: dict) -> int:
        return batch["images"].shape[0] * self.model.grid_size**2

    def extra_logs(self) -> dict:
        """Codebook use since the last log, over every rank's batches."""
        dist.all_reduce(self.code_counts)
        usage = codebook_usage(self.code_counts.cpu())
        self.code_counts.zero_()
        return {**usage, "vae/temperature": self.temperature()}

    def visual_every(self) -> int:
        return self.config.logging.image_every_steps

    def visualise(self) -> None:
        """Originals above their reconstructions from the hard codes (what DALL-E learns)."""
        images = images_to_float(self.fixed_images.to(self.engine.device))
        recons = self.model.decode(self.model.get_codebook_indices(images.to(self.precision)))
        n = len(images)
        self.metrics.image_grid(self.progress.step, "reconstructions", torch.cat([images, recons.float()]),
                                ["original"] * n + ["reconstruction"] * n, columns=n)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="raw image-text shards: a folder, glob or brace pattern (shards/{00000..00099}.tar), "
                                  "or a::0.7,b::0.3 with data.resampled=true (paths.data)")
    add_common_arguments(p)


if __name__ == "__main__":
    import sys

    from ..cli import main

    sys.exit(main(["train-vae", *sys.argv[1:]]))
