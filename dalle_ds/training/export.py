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
FROZEN_VAE = "vae"  # the frozen dVAE as given, in fp32: checkpoints may round it (bf16) or omit it


def write_model_config(model, run_dir) -> None:
    atomic_write_bytes(Path(run_dir) / MODEL_CONFIG, json.dumps(model.config_record(), indent=2).encode())
    if hasattr(model, "vae"):
        model.vae.save_pretrained(Path(run_dir) / FROZEN_VAE)


def _trained_weights(folder: Path, tag: str) -> dict:
    """fp32 weights of the latest checkpoint: with ZeRO, the optimizer's fp32 master shards
    consolidated by DeepSpeed's zero_to_fp32; without (stage 0), the module state itself."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    states = sorted((folder / tag).glob("*model_states.pt"))
    module = torch.load(states[0], map_location="cpu", weights_only=False)  # our own run's checkpoint
    if module.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) >= 1:
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    return module["module"]


def export_run(run_dir, out_dir) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_CONFIG).is_file():
        raise ValueError(f"{run_dir} is not a training run folder (no {MODEL_CONFIG}); give the --out of a "
                         f"dalle-ds train-* run")
    tag = checkpoint.latest_tag(run_dir)
    if tag is None:
        raise ValueError(f"{run_dir} has no checkpoint yet; export after the run saved one")
    model = model_from_config(json.loads((run_dir / MODEL_CONFIG).read_text()))
    state = _trained_weights(run_dir / checkpoint.CHECKPOINTS, tag)
    state = {name: tensor.to(torch.float32) for name, tensor in state.items() if not name.startswith("vae.")}
    if hasattr(model, "vae"):
        from ..models.vae import DiscreteVAE

        model.vae = DiscreteVAE.from_pretrained(run_dir / FROZEN_VAE).eval().requires_grad_(False)
        state.update({f"vae.{k}": v for k, v in model.vae.state_dict().items()})
    model.load_state_dict(state, strict=True)
    return model.save_pretrained(out_dir)
