"""Run configuration: strict nested loading, YAML/JSON files, overrides, batch arithmetic."""

import re
from dataclasses import dataclass, field

import pytest
import yaml

from dalle_ds.config import batch_layout, load_config, write_resolved


@dataclass
class Optim:
    lr: float = 3e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100


@dataclass
class Model:
    dim: int = 64
    attn_types: list[str] = field(default_factory=lambda: ["full"])
    dropout: float | None = None


@dataclass
class Run:
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    seed: int = 0
    name: str = "run"


def test_defaults_file_and_overrides_compose(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  dim: 128\noptim:\n  lr: 1\n")
    config = load_config(Run, path, ["optim.warmup_steps=5", "optim.lr=3e-4", "model.attn_types=[full, axial_row]",
                                     "model.dropout=0.1", "name=big run"])
    assert config.model.dim == 128 and config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)
    assert config.optim.warmup_steps == 5 and config.model.attn_types == ["full", "axial_row"]
    assert config.model.dropout == 0.1 and config.name == "big run" and config.optim.betas == (0.9, 0.95)
    json_path = tmp_path / "run.json"
    json_path.write_text('{"seed": 7}')
    assert load_config(Run, json_path).seed == 7


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'; optim has: betas, lr, warmup_steps"),
    (["modle.dim=1"], "unknown config key 'modle'"),
    (["model.dim=big"], "config model.dim must be int, got 'big'"),
    (["seed"], "is not key=value"),
    (["seed.x=1"], "seed is not a section"),
    (["model.dim=true"], "config model.dim must be int, got True"),
    (["optim.lr=nan"], "config optim.lr must be a finite number"),
    (["optim.betas=[a,b]"], "config optim.betas[0] must be a finite number"),
    (["optim.betas=[0.9]"], "config optim.betas needs 2 values, got 1"),
    (["model.attn_types=[yes]"], "config model.attn_types[0] must be str, got True"),
])
def test_mistakes_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(Run, None, overrides)


def test_unknown_key_in_a_file_is_an_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown config key 'optim.learning_rate'"):
        load_config(Run, path)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(Run, tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = load_config(Run, None, ["model.dim=96"])
    path = write_resolved(config, tmp_path)
    assert load_config(Run, path) == config
    assert yaml.safe_load(path.read_text())["model"]["dim"] == 96


def test_batch_arithmetic():
    layout = batch_layout(micro_batch=4, data_parallel=8, global_batch=256)
    assert (layout.grad_accumulation, layout.global_batch) == (8, 256)
    assert batch_layout(4, 2, grad_accumulation=3).global_batch == 24
    with pytest.raises(ValueError, match="global batch 100 is not a multiple of micro batch 4 x 8 ranks = 32"):
        batch_layout(4, 8, global_batch=100)
    with pytest.raises(ValueError, match="does not hold; set only two of them"):
        batch_layout(4, 8, global_batch=256, grad_accumulation=2)
