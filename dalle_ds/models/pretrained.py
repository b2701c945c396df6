"""save_pretrained / from_pretrained for the model classes: config.json + model.safetensors.

Each model records the arguments its constructor was called with (``@records_config``); that
record is the config. A sub-model passed as an argument (DALLE's vae) is stored as its own
nested config, and its weights travel in the parent's safetensors file.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from ..files import atomic_write, atomic_write_bytes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_REGISTRY: dict[str, type] = {}


def records_config(init):
    """Decorates a model's ``__init__`` so that ``self.config`` holds its bound arguments."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        self.config = {k: v for k, v in bound.arguments.items() if k != "self"}

    return wrapper


def _to_json(value):
    if isinstance(value, PretrainedMixin):
        return {"model_class": type(value).__name__, "config": _to_json(value.config)}
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value):
    if isinstance(value, dict) and set(value) == {"model_class", "config"}:
        return model_from_config(value)
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value


def model_from_config(record: dict) -> torch.nn.Module:
    """Builds an untrained model from ``{"model_class": ..., "config": {...}}``."""
    name = record.get("model_class")
    if name not in _REGISTRY:
        raise ValueError(f"unknown model class {name!r} in config; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[name](**_from_json(record["config"]))


def holds(record: dict, cls: type) -> bool:
    """Whether a config record is of ``cls`` or of a subclass (a VQGAN is an ImageTokenizer)."""
    found = _REGISTRY.get(record.get("model_class"))
    return found is not None and issubclass(found, cls)


def load_strict(model: torch.nn.Module, weights: dict, source: str, into: str = "its config") -> None:
    """Strict load, or a ValueError that lists what does not fit (``source`` names the weights,
    ``into`` the model)."""
    expected = model.state_dict()
    problems = {
        "missing": sorted(set(expected) - set(weights)),
        "unexpected": sorted(set(weights) - set(expected)),
        "of another shape": sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape),
    }
    if any(problems.values()):
        found = "; ".join(f"{kind}: {', '.join(keys[:8])}{f' and {len(keys) - 8} more' if len(keys) > 8 else ''}"
                          for kind, keys in problems.items() if keys)
        raise ValueError(f"the weights of {source} do not fit {into} ({found})")
    model.load_state_dict(weights)


def model_fingerprint(model: "PretrainedMixin") -> str:
    """sha256 of a model's config and weights: names the exact model that made some data
    (token shards record the dVAE that encoded them)."""
    digest = hashlib.sha256(json.dumps(model.config_record(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class PretrainedMixin:
    """Adds save_pretrained / from_pretrained to an nn.Module whose __init__ is @records_config."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):  # a model class; an interface such as ImageTokenizer builds nothing
            _REGISTRY[cls.__name__] = cls

    def config_record(self) -> dict:
        return _to_json(self)

    def save_pretrained(self, directory) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.config_record(), indent=2)
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_model(self, str(p)))
        atomic_write_bytes(directory / CONFIG_FILE, text.encode())
        return directory

    @classmethod
    def from_pretrained(cls, directory, device: str | torch.device = "cpu"):
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise ValueError(
                f"{directory} is not a saved model: expected {CONFIG_FILE} and {WEIGHTS_FILE} "
                f"(written by save_pretrained)"
            )
        record = json.loads(config_path.read_text())
        if not holds(record, cls):
            raise ValueError(
                f"{directory} holds a {record.get('model_class')}, not a {cls.__name__}; "
                f"load it with {record.get('model_class')}.from_pretrained"
            )
        model = model_from_config(record)
        load_model(model, str(weights_path), strict=True, device=str(device))
        return model.to(device)
