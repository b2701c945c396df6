"""One home for each default: the trainers' model configs take the model constructors' defaults,
the data config the stream's, the patterns' options their constructors', and the README's config
reference (docs/configuration.md) shows what the code holds."""

import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest
import yaml

from dalle_ds import CLIP, DALLE, DiscreteVAE
from dalle_ds.attention.patterns import SequenceLayout, build_pattern
from dalle_ds.config import to_dict
from dalle_ds.data.stream import StreamConfig
from dalle_ds.training.train_clip import ClipModelConfig, ClipRunConfig
from dalle_ds.training.train_dalle import DalleModelConfig, DalleRunConfig
from dalle_ds.training.train_vae import VaeModelConfig, VaeRunConfig
from dalle_ds.training.trainer import DataConfig, RunConfig

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
# sizes DALLE requires (no default there) and a list the constructor spells None
OWN_DEFAULTS = {"dim", "depth", "attn_types"}


@pytest.mark.parametrize("config, model", [(DalleModelConfig, DALLE), (VaeModelConfig, DiscreteVAE),
                                           (ClipModelConfig, CLIP)])
def test_model_configs_take_the_constructors_defaults(config, model):
    parameters = inspect.signature(model.__init__).parameters
    for f in dataclasses.fields(config):
        assert f.name in parameters, f"{config.__name__}.{f.name} is no parameter of {model.__name__}"
        if f.name not in OWN_DEFAULTS:
            assert f.default == parameters[f.name].default, f"{config.__name__}.{f.name}"


def test_the_data_config_takes_the_streams_defaults():
    for f in dataclasses.fields(DataConfig):
        assert f.default == getattr(StreamConfig, f.name), f.name


def test_dalle_pattern_options_are_the_patterns_defaults():
    """DALLE's conv/sparse keywords default to what the patterns take when they are left out."""
    layout, parameters = SequenceLayout(3, 4, 4), inspect.signature(DALLE.__init__).parameters
    conv, sparse = build_pattern("conv_like", layout), build_pattern("sparse", layout)
    assert parameters["conv_kernel_size"].default == conv.kernel_size
    assert (parameters["sparse_block_size"].default, parameters["sparse_local_blocks"].default,
            parameters["sparse_stride"].default) == (sparse.block_size, sparse.local_blocks, sparse.stride)


def reference_tables() -> dict[str, dict[str, object]]:
    """The config reference's tables: heading -> {key: default}."""
    tables = {}
    for heading, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", REFERENCE.read_text(), flags=re.S | re.M):
        rows = re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", body, flags=re.M)
        tables[heading.strip()] = {key: _value(text) for key, text in rows}
    return tables


def _value(text: str):
    value = yaml.safe_load(text)
    try:  # YAML 1.1 reads 1e-08 as a string
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def flat_defaults(config) -> dict[str, object]:
    data = json.loads(json.dumps(to_dict(config)))  # tuples as lists, as the README writes them
    return {f"{section}.{key}": value for section, values in data.items() for key, value in values.items()}


def test_the_config_reference_shows_every_key_and_its_default():
    tables, shared = reference_tables(), flat_defaults(RunConfig())
    assert tables["Shared by every trainer"] == shared
    for heading, config in (("train-dalle", DalleRunConfig), ("train-vae", VaeRunConfig), ("train-clip", ClipRunConfig)):
        own = {key: value for key, value in flat_defaults(config()).items() if shared.get(key, object()) != value}
        assert tables[heading] == own, heading
