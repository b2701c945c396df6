"""export: a run folder's latest (ZeRO-sharded) checkpoint -> one model folder
(``model.safetensors`` + ``config.json``, and the captions' ``tokenizer.model``) that
``from_pretrained`` loads without DeepSpeed; and ``load_trained``, which takes either."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

from ..files import atomic_write_bytes
from ..models.image_tokenizer import ImageTokenizer
from ..models.pretrained import CONFIG_FILE, holds, model_from_config
from . import checkpoint

MODEL_CONFIG = "model_config.json"  # the model's config record, written by the trainer at start
FROZEN_VAE = "vae"  # the frozen dVAE as given, in fp32: checkpoints may round it (bf16) or omit it
TOKENIZER = "tokenizer.model"  # the captions' sentencepiece model travels with the weights


def write_model_config(model, run_dir, tokenizer=None) -> None:
    """At a run's start: what export needs besides the weights."""
    atomic_write_bytes(Path(run_dir) / MODEL_CONFIG, json.dumps(model.config_record(), indent=2).encode())
    if hasattr(model, "vae"):
        model.vae.save_pretrained(Path(run_dir) / FROZEN_VAE)
    if tokenizer is not None:
        atomic_write_bytes(Path(run_dir) / TOKENIZER, Path(tokenizer).read_bytes())


def _trained_weights(folder: Path, tag: str) -> dict:
    """fp32 weights of the latest checkpoint: with ZeRO, the optimizer's fp32 master shards
    consolidated by DeepSpeed's zero_to_fp32; without (stage 0), the module state itself."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    states = sorted((folder / tag).glob("*model_states.pt"))
    module = torch.load(states[0], map_location="cpu", weights_only=False)  # our own run's checkpoint
    if module.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) >= 1:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints would mix into our commands' output
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    return module["module"]


def consolidate(run_dir) -> torch.nn.Module:
    """The model of a run folder's latest checkpoint, in fp32, without an engine."""
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
        model.vae = ImageTokenizer.from_pretrained(run_dir / FROZEN_VAE).eval().requires_grad_(False)
        state.update({f"vae.{k}": v for k, v in model.vae.state_dict().items()})
    model.load_state_dict(state, strict=True)
    return model


def export_run(run_dir, out_dir) -> Path:
    out = consolidate(run_dir).save_pretrained(out_dir)
    if (Path(run_dir) / TOKENIZER).is_file():
        atomic_write_bytes(out / TOKENIZER, (Path(run_dir) / TOKENIZER).read_bytes())
    return out


def load_trained(path, kind: type):
    """(model, its tokenizer or None) from an exported model folder or a run folder (its latest
    checkpoint); ValueError unless it holds a ``kind``."""
    path = Path(path)
    record_file = trained_record(path, kind)
    model = kind.from_pretrained(path) if record_file.name == CONFIG_FILE else consolidate(path)
    tokenizer = path / TOKENIZER
    return model.eval(), (tokenizer if tokenizer.is_file() else None)


def load_with_tokenizer(path, kind: type, what: str):
    """(model, its CaptionTokenizer) from an export or a run folder; ``what`` names it in errors."""
    from ..data.tokenizer import CaptionTokenizer

    model, tokenizer = load_trained(path, kind)
    if tokenizer is None:
        raise ValueError(f"{what} {path} has no tokenizer.model: export it from its run folder again, or copy the "
                         f"run's sentencepiece model there as tokenizer.model")
    return model, CaptionTokenizer(tokenizer)


def trained_record(path, kind: type) -> Path:
    """The config record of the ``kind`` model in an export or run folder, without loading any
    weights (a quick check before heavy start-up); ValueError for any other folder."""
    path = Path(path)
    record_file = next((path / name for name in (CONFIG_FILE, MODEL_CONFIG) if (path / name).is_file()), None)
    if record_file is None:
        raise ValueError(f"{path} is neither a model folder (dalle-ds export writes one) nor a training run folder "
                         f"(the --out of dalle-ds train-*)")
    record = json.loads(record_file.read_text())
    if not holds(record, kind):
        raise ValueError(f"{path} holds a {record.get('model_class')}, not a {kind.__name__}: give the folder of "
                         f"{_MADE_BY.get(kind.__name__, 'a training run or of its export')}")
    return record_file


_MADE_BY = {"DALLE": "a train-dalle run or of its export", "CLIP": "a train-clip run or of its export",
            "DiscreteVAE": "a train-vae run or of its export",
            "ImageTokenizer": "a train-vae run, of its export or of dalle-ds import-vae"}
