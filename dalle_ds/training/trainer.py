"""What train-vae, train-dalle and train-clip share: the run config's common components and the
loop. A trainer says what model and stream to build and how a batch becomes its losses; the
loop reads like its table of contents: load, step, log, visualise, save.

Works the same as one process, under torchrun and under the deepspeed launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import batch_layout, load_config, to_dict, write_resolved
from ..data.shards import parse_sources
from ..data.stream import ShardStream, StreamConfig
from ..distributed import dist_env
from . import checkpoint
from .engine import build_engine, init_distributed, load_ds_config, whole_weights
from .export import write_model_config
from .init_from import check_init_from, init_from
from .metrics import MetricsWriter, Throughput, measure_peak_flops
from .optim import OptimConfig
from .profiling import StepProfiler


@dataclass
class DataConfig:
    """The stream's settings a run chooses (batch size and seed come from ``train``); the defaults
    are StreamConfig's."""

    shuffle_buffer: int = StreamConfig.shuffle_buffer  # samples mixed across shards by each data worker
    num_workers: int = StreamConfig.num_workers  # DataLoader workers per rank (0: read in the training process)
    resampled: bool = StreamConfig.resampled  # draw shards with replacement, weighting sources (a::0.7,b::0.3)
    epoch_samples: int | None = StreamConfig.epoch_samples  # resampled mode: samples per epoch, all ranks together


@dataclass
class TrainConfig:
    steps: int = 10_000  # optimizer steps
    micro_batch: int = 8  # samples per rank per forward pass
    global_batch: int | None = None  # samples per optimizer step; None: micro_batch x ranks x grad_accumulation
    grad_accumulation: int | None = None  # derived from global_batch when that is set
    seed: int = 0  # model init, data order and dropout
    deepspeed_config: str = "ds_configs/zero2.json"  # engine settings: ZeRO stage, precision, offload
    max_bad_steps: int = 10  # stop after this many non-finite losses (or skipped non-finite-gradient steps) in a row
    # ZeRO-1/2's overflow and norm checks as one multi-tensor operation each (training/grad_checks.py);
    # false: DeepSpeed's own, a few operations per parameter tensor
    fused_grad_checks: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = 1_000  # also on SIGTERM / SIGUSR1 (preemption)
    keep_last: int = 3  # older checkpoints are deleted
    resume: bool = False  # continue from the run folder's latest checkpoint (--resume)
    # fine-tuning: a new run starts from this model's weights (an export or a run folder; --init-from),
    # with a fresh optimizer, schedule and data position; ignored once the run has a checkpoint to resume
    init_from: str = ""
    resize_text_vocab: bool = False  # with init_from, another tokenizer: pieces both share keep their rows


@dataclass
class LoggingConfig:
    every_steps: int = 10  # TensorBoard and metrics.jsonl
    peak_flops: float | None = None  # per device, for MFU; None: measured at start (a matmul benchmark)
    # torch.profiler over optimizer steps [profile_at_step, + profile_steps): a trace and a summary
    # per rank in the run folder's profile/ (training/profiling.py); 0: off
    profile_at_step: int = 0
    profile_steps: int = 3


@dataclass
class PathsConfig:
    """What a run reads and where it writes (the command line's --data and --out set them)."""

    data: str = ""  # shards: a folder, glob or brace pattern, or weighted sources a::0.7,b::0.3
    out: str = ""  # the run folder: resolved config, checkpoints, TensorBoard logs


@dataclass
class RunConfig:
    """The components every trainer shares; a trainer's run config adds ``model`` (and its own
    sections) and may widen ``logging`` and ``paths``. A trainer is built from one: from Python,
    from a YAML file alone, or from the command line (``config_from_args``)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    samples: int = 0  # samples seen, all ranks
    skipped_micro_batches: int = 0  # micro-batches dropped for a non-finite loss


def stream_config(config) -> StreamConfig:
    return StreamConfig(batch_size=config.train.micro_batch, seed=config.train.seed, **asdict(config.data))


def _same_on_every_rank(value, what: str) -> None:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise ValueError(f"ranks disagree on {what}; start them on the same, finished data")


@dataclass
class _BadSteps:
    """What went wrong in a row; train.max_bad_steps of either stops the run."""

    losses: int = 0  # micro-batches with a non-finite loss
    gradients: int = 0  # optimizer steps DeepSpeed skipped for non-finite gradients


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


class _Console:
    """Rank 0's progress: a tqdm bar with loss and tokens/s on a terminal; elsewhere (a SLURM
    log, a pipe) one plain line per logging interval, with the ETA from this run's pace."""

    def __init__(self, command: str, first_step: int, steps: int, enabled: bool):
        self.command, self.first_step, self.steps = command, first_step, steps
        self.enabled, self.start = enabled, time.perf_counter()
        self.bar = tqdm(total=steps, initial=first_step, desc=command, unit="step",
                        disable=not (enabled and sys.stderr.isatty()))

    def step(self) -> None:
        self.bar.update(1)

    def report(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.bar.disable:
            self.bar.set_postfix(loss=f"{loss:.4f}", tokens_s=f"{tokens_per_s:,.0f}")
        elif self.enabled:
            per_step = (time.perf_counter() - self.start) / max(step - self.first_step, 1)
            eta = datetime.timedelta(seconds=round(per_step * (self.steps - step)))
            print(f"{self.command} step {step}/{self.steps}: loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s, "
                  f"ETA {eta}", flush=True)

    def close(self) -> None:
        self.bar.close()


# DeepSpeed and torch warnings that every rank repeats and that need no action from a user
_NOISE = [(FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated")]


class Trainer:
    """Subclasses set ``command``, ``config_class``, ``model_class``, ``loss_names`` (the first
    is the one trained on) and ``text_weights``, and implement the hooks below the loop."""

    command: str
    config_class: type
    model_class: type  # what the trainer builds, and what --init-from must hold
    loss_names: tuple[str, ...] = ("loss/total",)
    text_weights: tuple[str, ...] = ()  # the model's weights with a row per text token (--init-from maps them)

    def __init__(self, config):
        self.config, self.env = config, dist_env()
        for category, message in _NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        # every check that reads only the config and files comes before the heavy start-up
        self.check_config()
        self.check_inputs()
        if config.checkpoint.init_from and not self._will_resume():
            check_init_from(config.checkpoint.init_from, self.model_class, getattr(self, "tokenizer", None),
                            config.checkpoint.resize_text_vocab)
        init_distributed(self.env)
        self.run_dir = Path(config.paths.out)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_resolved(self.config, self.run_dir)
        dist.barrier()
        train = self.config.train
        torch.manual_seed(train.seed)  # the same initial weights on every rank
        self.model = self.build_model()
        if self.env.is_main:
            write_model_config(self.model, self.run_dir, getattr(self.config.paths, "tokenizer", None))
        self.flops_per_token = self.measure_flops_per_token()  # reads the full weights: before ZeRO-3 splits them
        self.batch = batch_layout(train.micro_batch, self.env.world_size, train.global_batch, train.grad_accumulation)
        source = checkpoint.resume_source(self.run_dir) if self.config.checkpoint.resume else None
        if config.checkpoint.init_from and source is None:  # a resumed fine-tuning run has its own weights
            init_from(self.model, config.checkpoint.init_from, self.model_class, getattr(self, "tokenizer", None),
                      self.text_weights)
        self._build_engine(load_universal=source is not None and source.universal)
        self.peak_flops = self.config.logging.peak_flops or measure_peak_flops(self.precision)
        torch.manual_seed(train.seed + 1 + self.env.rank)  # per-rank dropout, caption drops, Gumbel noise
        self.stream = self.build_stream()
        _same_on_every_rank(self.stream.identity(), "the shards they read (a job still adding shards?) or their "
                            "data settings")
        self.progress = Progress()
        self.prepare()
        if source is not None:
            self._resume(source)
        self.metrics = MetricsWriter(self.run_dir, self.env.is_main)
        self.preemption = _Preemption()

    def _will_resume(self) -> bool:
        """--resume with a checkpoint to resume from (then --init-from is ignored)."""
        return self.config.checkpoint.resume and checkpoint.latest_tag(Path(self.config.paths.out)) is not None

    def _build_engine(self, load_universal: bool) -> None:
        """The DeepSpeed engine and its schedule; ``precision``: the dtype the engine computes in.
        ``load_universal``: it will load a checkpoint saved by another number of ranks."""
        train, optim = self.config.train, self.config.optim
        if optim.total_steps is None:  # decay over the whole run
            optim = dataclasses.replace(optim, total_steps=train.steps)
        settings = load_ds_config(train.deepspeed_config)
        if load_universal:
            settings = {**settings, "checkpoint": {**settings.get("checkpoint", {}), "load_universal": True}}
        self.engine, self.scheduler = build_engine(self.model, settings, self.batch, optim, train.fused_grad_checks)
        self.precision = next((dtype for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))
                               if settings.get(name, {}).get("enabled")), torch.float32)

    def _resume(self, source: checkpoint.Source) -> None:
        """Weights, optimizer and schedule from the checkpoint (DeepSpeed re-partitions them for
        another number of ranks), then the training position, and the data position: exact on
        the same layout, the rest of the epoch dealt afresh on another (see the stream)."""
        client, stream_states = checkpoint.load(self.engine, source)
        progress = dict(client["progress"])
        if "skipped_steps" in progress:  # checkpoints written before the field said its unit
            progress["skipped_micro_batches"] = progress.pop("skipped_steps")
        self.progress = Progress(**progress)
        if len(stream_states) != self.env.world_size:  # no saved RNG state is this rank's: seed anew
            torch.manual_seed(self.config.train.seed + 1 + self.env.rank + 1_000_003 * self.progress.step)
        self.stream.load_state_dicts(stream_states)

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> Progress:
        batches = iter(self.stream)
        throughput, bad = Throughput(), _BadSteps()
        console = _Console(self.command, self.progress.step, self.config.train.steps, self.env.is_main)
        profiler = StepProfiler(self.config.logging.profile_at_step, self.config.logging.profile_steps,
                                self.run_dir / "profile", self.env.rank, self.engine.device)
        while self.progress.step < self.config.train.steps:
            profiler.starting(self.progress.step + 1)
            logs = self._optimizer_step(batches, throughput, bad)
            self._report_profile(profiler.finished(self.progress.step))
            console.step()
            if self.progress.step % self.config.logging.every_steps == 0:
                self._log(logs, throughput)
                console.report(self.progress.step, logs[self.loss_names[0]], logs["perf/tokens_per_s"])
            preempted = self.preemption.agreed(self.engine.device)  # then save at once, no pictures
            every = self.visual_every()
            if not preempted and every and self.progress.step % every == 0:
                with self.evaluating():
                    self.visualise()
            last = self.progress.step == self.config.train.steps
            if preempted or last or self.progress.step % self.config.checkpoint.every_steps == 0:
                self._save()
            if preempted:
                break
        self._report_profile(profiler.finished(self.progress.step, run_ended=True))  # preempted inside the window
        console.close()
        self.metrics.close()
        return self.progress

    def _report_profile(self, line: str | None) -> None:
        if line and self.env.is_main:
            print(f"{self.command}: {line}", flush=True)

    def _optimizer_step(self, batches, throughput: Throughput, bad: "_BadSteps") -> dict:
        """One optimizer step: grad_accumulation micro-batches through the engine. Micro-batches
        whose loss is non-finite on any rank are dropped on every rank."""
        micro, lr, totals = 0, self.scheduler.get_last_lr()[0], torch.zeros(len(self.loss_names))
        skipped_before = self.engine.skipped_steps
        while micro < self.batch.grad_accumulation:
            waited = time.perf_counter()
            batch = {k: v.to(self.engine.device, non_blocking=True) for k, v in next(batches).items()}
            data_wait = time.perf_counter() - waited
            losses = self.losses(batch)
            if not self._finite_everywhere(losses[0]):
                self.progress.skipped_micro_batches += 1
                bad.losses += 1
                self._stop_after(bad.losses, "non-finite losses")
                continue
            bad.losses = 0
            self.engine.backward(losses[0])
            self.engine.step()
            micro += 1
            totals += torch.stack(losses).detach().float().cpu()
            samples = next(iter(batch.values())).shape[0]
            throughput.add(samples, self.tokens(batch), data_wait)
        # DeepSpeed skipped the step for non-finite gradients; fp16 loss scaling does so by design
        if self.engine.skipped_steps > skipped_before and not self.engine.fp16_enabled():
            bad.gradients += 1
            self._stop_after(bad.gradients, "optimizer steps with non-finite gradients (skipped by DeepSpeed)")
        else:
            bad.gradients = 0
        self.progress.step += 1
        self.progress.samples += self.batch.global_batch
        means = (totals / self.batch.grad_accumulation).tolist()
        return {**dict(zip(self.loss_names, means)), "train/lr": lr}

    def _stop_after(self, in_row: int, what: str) -> None:
        if in_row >= self.config.train.max_bad_steps:
            raise RuntimeError(f"{in_row} {what} in a row at step {self.progress.step}: stopping; the last good "
                               f"checkpoint in {self.run_dir} is intact (lower optim.lr, or try a bf16 "
                               f"ds_config{self.stability_hint()})")

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)  # on the engine's device: nccl needs it
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def _log(self, logs: dict, throughput: Throughput) -> None:
        losses = torch.tensor([logs[k] for k in self.loss_names], device=self.engine.device)
        dist.all_reduce(losses)  # the mean over ranks, not rank 0's batch alone
        logs.update(zip(self.loss_names, (losses / self.env.world_size).tolist()))
        norm = self.engine.get_global_grad_norm()
        logs.update({"train/skipped_micro_batches": self.progress.skipped_micro_batches,
                     "train/samples": self.progress.samples,
                     **throughput.read(self.env.world_size, self.flops_per_token, self.peak_flops)})
        if norm is not None and math.isfinite(float(norm)):
            logs["train/grad_norm"] = float(norm)
        if self.engine.fp16_enabled():  # ZeRO's optimizers call it cur_scale, stage 0's loss_scale
            optimizer = self.engine.optimizer
            logs["train/loss_scale"] = float(getattr(optimizer, "cur_scale", getattr(optimizer, "loss_scale", 0.0)))
        # steps DeepSpeed skipped for non-finite gradients (a finite loss can still have them):
        # fp16 at every stage, fp32 and bf16 at ZeRO-1/2
        logs["train/skipped_optimizer_steps"] = self.engine.skipped_steps
        logs["data/truncated_captions"] = self.stream.truncated_captions
        logs.update({f"data/rejects/{reason}": n for reason, n in self.stream.rejects.counts.items()})
        logs.update(self.extra_logs())  # collective: every rank calls it
        self.metrics.write(self.progress.step, logs)

    def _save(self) -> None:
        client = {"progress": asdict(self.progress), "config": to_dict(self.config)}
        checkpoint.save(self.engine, self.run_dir, self.progress.step, client, self.stream.state_dict(),
                        self.config.checkpoint.keep_last)

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode, no gradients and whole weights for work outside the engine's forward
        (generation, decoding, retrieval): ZeRO-3 keeps a slice per rank, so every rank must take
        part; the gathering is a no-op at other stages."""
        self.engine.eval()
        try:
            with torch.no_grad(), whole_weights(self.engine, self.model):
                yield
        finally:
            self.engine.train()

    def summary(self) -> str:
        return (f"{self.command}: {self.progress.step} steps, {self.progress.samples} samples, "
                f"{self.progress.skipped_micro_batches} micro-batches skipped; checkpoints in "
                f"{self.run_dir / checkpoint.CHECKPOINTS}, "
                f"TensorBoard: tensorboard --logdir {self.run_dir / 'tensorboard'}")

    # ---- what each trainer says -------------------------------------------------------------

    def check_config(self) -> None:
        """ValueError for settings no run can use (each trainer adds its own)."""
        c = self.config
        unset = [f"paths.{name} (--{name})" for name, value in vars(c.paths).items() if not value]
        if unset:
            raise ValueError(f"{', '.join(unset)} not set: give them on the command line or in the config")
        counts = {"train.steps": c.train.steps, "train.max_bad_steps": c.train.max_bad_steps,
                  "logging.every_steps": c.logging.every_steps, "logging.profile_steps": c.logging.profile_steps,
                  "checkpoint.every_steps": c.checkpoint.every_steps, "checkpoint.keep_last": c.checkpoint.keep_last}
        bad = [key for key, value in counts.items() if value < 1]
        if bad:
            raise ValueError(f"config {', '.join(bad)} must be >= 1")
        first, last = c.logging.profile_at_step, c.logging.profile_at_step + c.logging.profile_steps - 1
        if first < 0 or (first and last > c.train.steps):
            raise ValueError(f"config logging.profile_at_step={first} with logging.profile_steps="
                             f"{c.logging.profile_steps} profiles steps {first}-{last}: the window must lie in the "
                             f"run's steps 1-{c.train.steps} (profile_at_step 0: no profile)")

    def check_inputs(self) -> None:
        """ValueError for an input path that cannot be used (each trainer checks its own), before
        the process group, DeepSpeed or any model starts. Here: the data patterns match shards."""
        parse_sources(self.config.paths.data)

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def measure_flops_per_token(self) -> float:
        raise NotImplementedError

    def build_stream(self) -> ShardStream:
        raise NotImplementedError

    def prepare(self) -> None:
        """After the stream exists, before resuming: fixed inputs for pictures, hooks."""

    def losses(self, batch: dict) -> list[torch.Tensor]:
        """The engine's forward on a micro-batch: one scalar per ``loss_names``."""
        raise NotImplementedError

    def tokens(self, batch: dict) -> int:
        raise NotImplementedError

    def extra_logs(self) -> dict:
        return {}

    def visual_every(self) -> int:
        """Steps between calls of ``visualise`` (0: never)."""
        return 0

    def visualise(self) -> None:
        """Pictures or scores on fixed samples, every ``visual_every`` steps, inside
        ``evaluating()`` (collective under ZeRO-3)."""

    def stability_hint(self) -> str:
        return ""


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="run folder: resolved config, checkpoints, TensorBoard logs (paths.out)")
    p.add_argument("--config", default=None, help="YAML or JSON run config (keys: docs/configuration.md)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's latest checkpoint (checkpoint.resume)")
    p.add_argument("--init-from", metavar="MODEL_DIR",
                   help="fine-tune: start from this model's weights (an export or a run folder), with a fresh "
                        "optimizer, schedule and data position (checkpoint.init_from)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")


def config_from_args(trainer_class: type[Trainer], args: argparse.Namespace):
    """The run config of a command line: --config, then key=value overrides, then the path flags
    given (each sets its ``paths.*``), --resume and --init-from."""
    config = load_config(trainer_class.config_class, args.config, args.overrides)
    for name in vars(config.paths):
        if getattr(args, name, None) is not None:
            setattr(config.paths, name, getattr(args, name))
    if args.resume:
        config.checkpoint.resume = True
    if args.init_from is not None:
        config.checkpoint.init_from = args.init_from
    return config


def run(trainer_class: type[Trainer], args: argparse.Namespace) -> str:
    trainer = trainer_class(config_from_args(trainer_class, args))
    trainer.train()
    return trainer.summary() if trainer.env.is_main else ""  # one summary per run, not per rank
