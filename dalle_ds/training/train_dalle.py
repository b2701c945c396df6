"""train-dalle: DALL-E under DeepSpeed, streaming token shards (no dVAE in the loop).

    dalle-ds train-dalle --data TOKEN_DIR --tokenizer FILE.model --vae VAE --out RUN_DIR
                         [--config FILE] [--resume] [key=value ...]

Works the same as one process, under torchrun and under the deepspeed launcher
(``python -m dalle_ds.training.train_dalle ...``). The loop reads like its table of contents:
load, step, log, save.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import batch_layout, load_config, to_dict, write_resolved
from ..data.stream import StreamConfig, TokenStream
from ..data.tokenizer import CaptionTokenizer
from ..distributed import dist_env
from ..models.dalle import DALLE
from ..models.pretrained import model_fingerprint
from ..models.vae import DiscreteVAE
from . import checkpoint
from .engine import build_engine, init_distributed, load_ds_config
from .export import write_model_config
from .metrics import MetricsWriter, Throughput, dalle_flops_per_token, measure_peak_flops
from .optim import OptimConfig


@dataclass
class DalleModelConfig:
    """DALLE's architecture (its vae and text vocabulary come from --vae and --tokenizer)."""

    dim: int = 512  # model width
    depth: int = 12  # transformer layers
    heads: int = 8  # attention heads
    dim_head: int = 64  # width of each head
    ff_mult: int = 4  # feed-forward width multiple
    text_seq_len: int = 64  # caption tokens (longer captions are cut; counted)
    attn_types: list[str] = field(default_factory=lambda: ["full"])  # cycled over layers
    reversible: bool = False  # RevNet layers: activation memory flat in depth
    attn_dropout: float = 0.0  # dropout on attention weights
    ff_dropout: float = 0.0  # dropout inside the feed-forward
    loss_img_weight: float = 7.0  # loss = (text + w * image) / (w + 1)
    stable: bool = False  # PB-relax before the final LayerNorm
    sandwich_norm: bool = False  # LayerNorm after each branch too
    null_cond_prob: float = 0.1  # drop captions this often: trains classifier-free guidance
    conv_kernel_size: int = 5  # window of conv_like layers
    sparse_block_size: int = 16  # block-sparse layers: block size,
    sparse_local_blocks: int = 4  # local window in blocks,
    sparse_stride: int = 8  # and every stride-th block as a summary
    checkpoint_activations: bool = False  # recompute activations in backward: less memory, ~1/3 more compute


@dataclass
class DataConfig:
    shuffle_buffer: int = 2_000  # samples mixed across shards by each data worker
    num_workers: int = 2  # DataLoader workers per rank (0: read in the training process)
    resampled: bool = False  # draw shards with replacement, weighting sources (a::0.7,b::0.3)
    epoch_samples: int | None = None  # resampled mode: samples per epoch, all ranks together


@dataclass
class TrainConfig:
    steps: int = 10_000  # optimizer steps
    micro_batch: int = 8  # samples per rank per forward pass
    global_batch: int | None = None  # samples per optimizer step; None: micro_batch x ranks x grad_accumulation
    grad_accumulation: int | None = None  # derived from global_batch when that is set
    seed: int = 0  # model init, data order and dropout
    deepspeed_config: str = "ds_configs/zero2.json"  # engine settings: ZeRO stage, precision, offload
    max_bad_steps: int = 10  # stop after this many non-finite losses in a row


@dataclass
class CheckpointConfig:
    every_steps: int = 1_000  # also on SIGTERM / SIGUSR1 (preemption)
    keep_last: int = 3  # older checkpoints are deleted


@dataclass
class LoggingConfig:
    every_steps: int = 10  # TensorBoard and metrics.jsonl
    peak_flops: float | None = None  # per device, for MFU; None: measured at start (a matmul benchmark)
    sample_every_steps: int = 1_000  # a grid of generated images in TensorBoard (0: never)
    sample_prompts: list[str] = field(default_factory=list)  # captions to draw; empty: the first ones of the data
    sample_cond_scale: float = 3.0  # classifier-free guidance of the sample grid


@dataclass
class DalleRunConfig:
    model: DalleModelConfig = field(default_factory=DalleModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    samples: int = 0  # samples seen, all ranks
    skipped_steps: int = 0  # micro-batches dropped for a non-finite loss


_LOSSES = ("loss/total", "loss/text", "loss/image")


def _check_counts(config: DalleRunConfig) -> None:
    counts = {"train.steps": config.train.steps, "train.max_bad_steps": config.train.max_bad_steps,
              "logging.every_steps": config.logging.every_steps,
              "checkpoint.every_steps": config.checkpoint.every_steps, "checkpoint.keep_last": config.checkpoint.keep_last,
              "logging.sample_every_steps": config.logging.sample_every_steps + 1}  # 0 = never
    bad = [key for key, value in counts.items() if value < 1]
    if bad:
        raise ValueError(f"config {', '.join(bad)} must be >= 1 (logging.sample_every_steps >= 0: 0 never samples)")


def _same_on_every_rank(value, what: str) -> None:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise ValueError(f"ranks disagree on {what}; start them on the same, finished data")


class _Preemption:
    """SIGTERM / SIGUSR1 (SLURM's warning before preemption) ask for a checkpoint and an exit."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, device) -> bool:
        """True on every rank if any rank was signalled (the save is collective)."""
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class DalleTrainer:
    def __init__(self, args: argparse.Namespace):
        self.env = dist_env()
        init_distributed(self.env)
        self.config = load_config(DalleRunConfig, args.config, args.overrides)
        _check_counts(self.config)
        self.run_dir = Path(args.out)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_resolved(self.config, self.run_dir)
        dist.barrier()
        self.tokenizer = CaptionTokenizer(args.tokenizer)
        self.model = self._build_model(args)
        if self.env.is_main:
            write_model_config(self.model, self.run_dir)
        # both read the full weights: before ZeRO-3 partitions them
        vae_fingerprint, self.flops_per_token = model_fingerprint(self.model.vae), dalle_flops_per_token(self.model)
        train = self.config.train
        self.batch = batch_layout(train.micro_batch, self.env.world_size, train.global_batch, train.grad_accumulation)
        optim = self.config.optim
        if optim.total_steps is None:  # decay over the whole run
            optim = dataclasses.replace(optim, total_steps=train.steps)
        engine_settings = load_ds_config(train.deepspeed_config)
        self.engine, self.scheduler = build_engine(self.model, engine_settings, self.batch, optim)
        precision = next((d for name, d in (("bf16", torch.bfloat16), ("fp16", torch.float16))
                          if engine_settings.get(name, {}).get("enabled")), torch.float32)
        self.peak_flops = self.config.logging.peak_flops or measure_peak_flops(precision)
        torch.manual_seed(train.seed + 1 + self.env.rank)  # per-rank dropout and caption drops
        data = self.config.data
        self.stream = TokenStream(args.data, args.tokenizer, self.config.model.text_seq_len,
                                  StreamConfig(batch_size=train.micro_batch, seed=train.seed, **asdict(data)),
                                  rank=self.env.rank, world_size=self.env.world_size,
                                  vae_fingerprint=vae_fingerprint)
        _same_on_every_rank(self.stream.identity(), "the token shards they read (a pretokenize job still adding "
                            "shards?) or their data settings")
        self.sample_prompts = self.config.logging.sample_prompts or [c for _, c in self.stream.first_samples(4)]
        self.progress = Progress()
        if args.resume:
            self._resume()
        self.metrics = MetricsWriter(self.run_dir, self.env.is_main)
        self.preemption = _Preemption()

    def _build_model(self, args) -> DALLE:
        torch.manual_seed(self.config.train.seed)  # the same initial weights on every rank
        vae = DiscreteVAE.from_pretrained(args.vae)
        return DALLE(vae=vae, num_text_tokens=self.tokenizer.vocab_size, **to_dict(self.config.model))

    def _resume(self) -> None:
        loaded = checkpoint.load(self.engine, self.run_dir)
        if loaded is None:
            return
        client, stream_state = loaded
        self.progress = Progress(**client["progress"])
        self.stream.load_state_dict(stream_state)

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> Progress:
        batches = iter(self.stream)
        throughput, bad_in_row = Throughput(), 0
        while self.progress.step < self.config.train.steps:
            logs, bad_in_row = self._optimizer_step(batches, throughput, bad_in_row)
            if self.progress.step % self.config.logging.every_steps == 0:
                self._log(logs, throughput)
            preempted = self.preemption.agreed(self.engine.device)  # then save at once, no sample grid
            sample_every = self.config.logging.sample_every_steps
            if not preempted and sample_every and self.progress.step % sample_every == 0:
                self._sample_grid()
            last = self.progress.step == self.config.train.steps
            if preempted or last or self.progress.step % self.config.checkpoint.every_steps == 0:
                self._save()
            if preempted:
                break
        self.metrics.close()
        return self.progress

    def _optimizer_step(self, batches, throughput: Throughput, bad_in_row: int):
        """One optimizer step: grad_accumulation micro-batches through the engine. Micro-batches
        whose loss is non-finite on any rank are dropped on every rank."""
        micro, lr, totals = 0, self.scheduler.get_last_lr()[0], torch.zeros(3)
        while micro < self.batch.grad_accumulation:
            waited = time.perf_counter()
            batch = {k: v.to(self.engine.device, non_blocking=True) for k, v in next(batches).items()}
            data_wait = time.perf_counter() - waited
            loss, text_loss, image_loss = self.engine(batch["text"], batch["codes"], mask=batch["mask"],
                                                      return_loss=True, return_loss_breakdown=True)
            if not self._finite_everywhere(loss):
                self.progress.skipped_steps += 1
                bad_in_row += 1
                if bad_in_row >= self.config.train.max_bad_steps:
                    raise RuntimeError(f"{bad_in_row} non-finite losses in a row at step {self.progress.step}: "
                                       f"stopping; the last good checkpoint in {self.run_dir} is intact (lower "
                                       f"optim.lr, or try model.stable=true / a bf16 ds_config)")
                continue
            bad_in_row = 0
            self.engine.backward(loss)
            self.engine.step()
            micro += 1
            totals += torch.stack([loss, text_loss, image_loss]).detach().float().cpu()
            tokens = batch["text"].shape[0] * (batch["text"].shape[1] + batch["codes"].shape[1])
            throughput.add(batch["text"].shape[0], tokens, data_wait)
        self.progress.step += 1
        self.progress.samples += self.batch.global_batch
        means = (totals / self.batch.grad_accumulation).tolist()
        return {**dict(zip(_LOSSES, means)), "train/lr": lr}, bad_in_row

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)  # on the engine's device: nccl needs it
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def _log(self, logs: dict, throughput: Throughput) -> None:
        losses = torch.tensor([logs[k] for k in _LOSSES], device=self.engine.device)
        dist.all_reduce(losses)  # the mean over ranks, not rank 0's batch alone
        logs.update(zip(_LOSSES, (losses / self.env.world_size).tolist()))
        norm = self.engine.get_global_grad_norm()
        logs.update({"train/skipped_steps": self.progress.skipped_steps,
                     "train/samples": self.progress.samples,
                     **throughput.read(self.env.world_size, self.flops_per_token, self.peak_flops)})
        if norm is not None and math.isfinite(float(norm)):
            logs["train/grad_norm"] = float(norm)
        if self.engine.fp16_enabled():  # ZeRO's optimizers call it cur_scale, stage 0's loss_scale
            optimizer = self.engine.optimizer
            logs["train/loss_scale"] = float(getattr(optimizer, "cur_scale", getattr(optimizer, "loss_scale", 0.0)))
            logs["train/overflow_skipped_steps"] = self.engine.skipped_steps
        logs["data/truncated_captions"] = self.stream.truncated_captions
        logs.update({f"data/rejects/{reason}": n for reason, n in self.stream.rejects.counts.items()})
        self.metrics.write(self.progress.step, logs)

    def _sample_grid(self) -> None:
        """Generated images for fixed captions, with the frozen dVAE. Collective: under ZeRO-3
        every rank takes part in gathering the weights, so every rank generates the same grid."""
        import deepspeed

        self.engine.eval()
        text = self.tokenizer.encode(self.sample_prompts, self.config.model.text_seq_len)
        # ZeRO-3 keeps each rank's slice of the weights only; generation reads them outside the
        # engine's forward, so gather them whole for its duration (a no-op at other stages)
        with deepspeed.zero.GatheredParameters(list(self.model.parameters()),
                                               enabled=self.engine.zero_optimization_stage() == 3):
            images = self.model.generate_images(text.ids.to(self.engine.device), mask=text.mask.to(self.engine.device),
                                                cond_scale=self.config.logging.sample_cond_scale,
                                                seed=self.config.train.seed)
        self.engine.train()
        self.metrics.image_grid(self.progress.step, "samples", images, self.sample_prompts)

    def _save(self) -> None:
        client = {"progress": asdict(self.progress), "config": to_dict(self.config)}
        checkpoint.save(self.engine, self.run_dir, self.progress.step, client, self.stream.state_dict(),
                        self.config.checkpoint.keep_last)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="token-shard folder (from pretokenize), or a::0.7,b::0.3 with "
                                                 "data.resampled=true")
    p.add_argument("--tokenizer", required=True, help="the sentencepiece .model the captions use")
    p.add_argument("--vae", required=True, help="the DiscreteVAE folder the token shards were made with")
    p.add_argument("--out", required=True, help="run folder: resolved config, checkpoints, TensorBoard logs")
    p.add_argument("--config", default=None, help="YAML or JSON run config (see the README's config reference)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")


def run(args: argparse.Namespace) -> str:
    trainer = DalleTrainer(args)
    progress = trainer.train()
    if not trainer.env.is_main:
        return ""  # one summary per run, not per rank
    return (f"train-dalle: {progress.step} steps, {progress.samples} samples, {progress.skipped_steps} skipped; "
            f"checkpoints in {Path(args.out) / checkpoint.CHECKPOINTS}, TensorBoard: tensorboard --logdir "
            f"{Path(args.out) / 'tensorboard'}")


if __name__ == "__main__":
    import sys

    from ..cli import main

    sys.exit(main(["train-dalle", *sys.argv[1:]]))
