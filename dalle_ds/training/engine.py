"""The DeepSpeed engine around a plain model: the process group, the engine, and gathering its
weights. Elsewhere DeepSpeed is used only as a library of tools: optim.py takes its CPU Adam
for ZeRO-Offload, export.py its consolidation of ZeRO checkpoints, and checkpoint.py calls the
engine's own save and load; grad_checks.py replaces two per-tensor gradient checks of its ZeRO-1/2
optimizer with fused ones.

ds_configs/*.json hold engine settings only (ZeRO stage, precision, offload); batch sizes,
gradient clipping and the optimizer come from the run config and are merged in here, so one
number never lives in two files.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from ..config import BatchLayout
from ..distributed import DistEnv
from . import grad_checks
from .optim import OptimConfig, build_optimizer, build_scheduler

# Keys a ds_config must not set: the run config owns them.
_RUN_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "optimizer", "scheduler")


def load_ds_config(path) -> dict:
    """A JSON file; a relative path is looked up from the working directory, then beside this
    checkout's ds_configs/, then in the installed copy (so ``ds_configs/zero2.json`` works
    from anywhere)."""
    path = Path(path)
    if not path.is_absolute() and not path.is_file():
        candidates = [Path(__file__).resolve().parents[2] / path, Path(sys.prefix) / "share" / "dalle_ds" / path]
        path = next((c for c in candidates if c.is_file()), path)
    if not path.is_file():
        raise ValueError(f"DeepSpeed config {path} does not exist; see ds_configs/ for the ones we ship")
    config = json.loads(path.read_text())
    owned = [key for key in _RUN_OWNED if key in config]
    if owned:
        raise ValueError(f"{path} sets {', '.join(owned)}: batch sizes, clipping and the optimizer come from the "
                         f"run config (train.*, optim.*); keep ds_configs to engine settings")
    return config


def ds_config(engine_settings: dict, batch: BatchLayout, optim: OptimConfig) -> dict:
    """The full DeepSpeed config: engine settings + the run's batch arithmetic and clipping."""
    return {**engine_settings,
            "train_batch_size": batch.global_batch,
            "train_micro_batch_size_per_gpu": batch.micro_batch,
            "gradient_accumulation_steps": batch.grad_accumulation,
            "gradient_clipping": optim.grad_clip,
            "steps_per_print": 10**9,  # we log ourselves
            "wall_clock_breakdown": False}


def init_distributed(env: DistEnv) -> None:
    """Process group for this launcher (gloo on CPU, nccl on GPU); a lone process gets a group
    of one, so the same code path runs everywhere."""
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()) if env.world_size == 1 else "29500")
    for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
        os.environ.setdefault(name, str(value))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_engine(model: nn.Module, engine_settings: dict, batch: BatchLayout, optim: OptimConfig,
                 fused_grad_checks: bool):
    """deepspeed.initialize for real: DeepSpeed owns the optimizer step, ZeRO partitioning,
    precision and gradient accumulation; ``fused_grad_checks``: see grad_checks.py. Returns
    (engine, scheduler)."""
    import deepspeed

    config = ds_config(engine_settings, batch, optim)
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    optimizer = build_optimizer(model, optim, cpu_offload=offload)
    scheduler = build_scheduler(optimizer, optim)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    if fused_grad_checks:
        grad_checks.fuse(engine)
    return engine, scheduler


@contextlib.contextmanager
def whole_weights(engine, model: nn.Module):
    """Every parameter whole on every rank while inside: ZeRO-3 keeps a slice per rank, so every
    rank must enter (a no-op at other stages)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=engine.zero_optimization_stage() == 3):
        yield
