"""Run configuration: nested dataclasses, loaded from YAML or JSON plus ``key.sub=value``
overrides, resolved once and written to the run folder.

Each component owns its dataclass (fields documented where they are defined); a trainer's root
config composes them. Loading is strict: an unknown key anywhere is an error naming the key and
the keys that exist, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import TypeVar

import yaml

from .files import atomic_write_bytes

T = TypeVar("T")
RESOLVED_CONFIG = "config.yaml"


def constructor_defaults(cls: type) -> dict:
    """The default of each parameter of ``cls``'s constructor that has one: a model config takes
    its defaults from here, so that each default lives in one place, the model's signature."""
    import inspect

    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Builds dataclass ``cls`` from plain data, recursively; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ValueError(f"config {where or 'root'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key {_join(where, unknown[0])!r}; "
                         f"{where or 'the root'} has: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], value, _join(where, name)) for name, value in data.items()}
    return cls(**values)


def _convert(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    sequence = origin or hint
    if sequence in (list, tuple) and isinstance(value, (list, tuple)):  # YAML has lists only
        items = [_convert(args[0] if args else typing.Any, v, f"{where}[{i}]") for i, v in enumerate(value)]
        if sequence is tuple and len(args) > 1 and args[-1] is not Ellipsis and len(items) != len(args):
            raise ValueError(f"config {where} needs {len(args)} values, got {len(items)}")
        return sequence(items)
    if hint is float:
        return _float(value, where)
    if hint is int and isinstance(value, bool):
        raise ValueError(f"config {where} must be int, got {value!r}")
    expected = origin or hint
    if isinstance(expected, type) and expected is not typing.Any and not isinstance(value, expected):
        raise ValueError(f"config {where} must be {getattr(expected, '__name__', expected)}, "
                         f"got {value!r} ({type(value).__name__})")
    return value


def _float(value, where: str) -> float:
    """Numbers, and strings such as 3e-4 (YAML 1.1 reads a mantissa without a dot as text);
    never booleans, nan or infinities."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise ValueError(f"config {where} must be a finite number, got {value!r}")
    return number


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["optim.lr=1e-4", "model.attn_types=[full,axial_row]"]`` applied to nested ``data``;
    values are parsed as YAML (numbers, booleans, lists), else kept as strings."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """The defaults of ``cls``, updated by the YAML/JSON file at ``path``, then by overrides."""
    data = to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}  # YAML is a superset of JSON
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top")
        _merge(data, loaded)
    return from_dict(cls, apply_overrides(data, list(overrides)))


def _merge(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def write_resolved(config, run_dir) -> Path:
    """Writes the resolved config to ``run_dir/config.yaml``: what this run really used."""
    text = yaml.safe_dump(json.loads(json.dumps(to_dict(config))), sort_keys=False)
    return atomic_write_bytes(Path(run_dir) / RESOLVED_CONFIG, text.encode())


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """DeepSpeed's batch arithmetic, derived and checked in one place:
    micro_batch x grad_accumulation x data_parallel = global_batch."""

    micro_batch: int  # samples per rank per forward pass
    grad_accumulation: int  # forward passes per optimizer step
    data_parallel: int  # ranks that see different data

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accumulation * self.data_parallel


def batch_layout(micro_batch: int, data_parallel: int, global_batch: int | None = None,
                 grad_accumulation: int | None = None) -> BatchLayout:
    """Derives the missing one of global batch / accumulation; checks they agree."""
    if micro_batch < 1 or data_parallel < 1:
        raise ValueError(f"micro_batch and data_parallel must be >= 1, got {micro_batch}, {data_parallel}")
    per_step = micro_batch * data_parallel
    if global_batch is None:
        return BatchLayout(micro_batch, grad_accumulation or 1, data_parallel)
    if global_batch % per_step:
        raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} x "
                         f"{data_parallel} ranks = {per_step}; change the global or micro batch")
    layout = BatchLayout(micro_batch, global_batch // per_step, data_parallel)
    if grad_accumulation is not None and grad_accumulation != layout.grad_accumulation:
        raise ValueError(f"global batch {global_batch} = micro batch {micro_batch} x accumulation "
                         f"{grad_accumulation} x {data_parallel} ranks does not hold; set only two of them")
    return layout

