"""export: a run folder's latest (ZeRO-sharded) checkpoint -> one model folder
(``model.safetensors`` + ``config.json``) that ``from_pretrained`` loads without DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import atomic_write_bytes
from ..models.pretrained import model_from_config
from . import checkpoint

MODEL_CONFIG = "model_config.json"  # the model's config record, written by the trainer at start


def write_model_config(model, run_dir) -> None:
    atomic_write_bytes(Path(run_dir) / MODEL_CONFIG, json.dumps(model.config_record(), indent=2).encode())


def export_run(run_dir, out_dir) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / MODEL_CONFIG).is_file():
        raise ValueError(f"{run_dir} is not a training run folder (no {MODEL_CONFIG}); give the --out of a "
                         f"dalle-ds train-* run")
    tag = checkpoint.latest_tag(run_dir)
    if tag is None:
        raise ValueError(f"{run_dir} has no checkpoint yet; export after the run saved one")
    model = model_from_config(json.loads((run_dir / MODEL_CONFIG).read_text()))
    state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / checkpoint.CHECKPOINTS), tag=tag)
    model.load_state_dict({name: tensor.to(torch.float32) for name, tensor in state.items()}, strict=True)
    return model.save_pretrained(out_dir)
