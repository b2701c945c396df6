"""Tiny, randomly initialised reference image tokenizers saved in their own release formats:
taming-transformers' VQModel and GumbelVQ (a Lightning-style checkpoint and its YAML) and OpenAI's
dall_e Encoder and Decoder (whole modules, torch.save'd as encoder.pkl and decoder.pkl).

The references are the PyPI packages taming-transformers-rom1504 (the CompVis code with GumbelVQ;
taming-transformers 0.0.1 predates it) and DALL-E, installed without their dependencies (.ci/run).
A test skips only where a package is absent."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

TINY_DDCONFIG = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                     num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
# the discriminator stands in for taming's VQLPIPSWithDiscriminator (whose LPIPS needs torchvision):
# a real taming module whose weights become the checkpoint's loss.* keys, which import-vae drops
LOSS = {"target": "taming.modules.discriminator.model.NLayerDiscriminator", "params": {"ndf": 8, "n_layers": 1}}
TEMPERATURE = {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
               "params": dict(warm_up_steps=0, max_decay_steps=1000001, lr_start=0.9, lr_max=0.9, lr_min=1e-6)}


def _instantiate_from_config(config):
    """taming.main's: the class named by config["target"], built with config["params"]."""
    module, name = config["target"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**config.get("params", dict()))


@functools.cache
def taming_models() -> types.ModuleType:
    """taming.models.vqgan, for its VQModel and GumbelVQ. It imports pytorch_lightning only for its
    LightningModule base class (training hooks), and taming.main, a training script, only for
    instantiate_from_config; taming.main imports torchvision and Lightning 1.x APIs, which cannot
    be installed beside this torch. For the import, then, taming.main is its one function and,
    where Lightning is absent, the base class is a plain nn.Module. All the models compute is
    taming's own code."""
    pytest.importorskip("taming.modules.vqvae.quantize", reason="taming-transformers-rom1504 is not installed")
    stand_ins = {"taming.main": types.ModuleType("taming.main")}
    stand_ins["taming.main"].instantiate_from_config = _instantiate_from_config
    if importlib.util.find_spec("pytorch_lightning") is None:
        stand_ins["pytorch_lightning"] = types.ModuleType("pytorch_lightning")
        stand_ins["pytorch_lightning"].LightningModule = nn.Module
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("taming.models.vqgan")
    finally:  # only the stand-ins go: what the import loaded for real stays loaded
        for name in stand_ins:
            del sys.modules[name]


def taming_yaml(kind: str = "VQModel", **params) -> dict:
    """A taming config as its released YAMLs have it (model.target, model.params)."""
    defaults = dict(embed_dim=32 if kind == "GumbelVQ" else 16, n_embed=64, ddconfig=TINY_DDCONFIG, lossconfig=LOSS)
    if kind == "GumbelVQ":
        defaults.update(kl_weight=1e-8, temperature_scheduler_config=TEMPERATURE)
    return {"model": {"base_learning_rate": 4.5e-6, "target": f"taming.models.vqgan.{kind}",
                      "params": {**defaults, **params}}}


def codebook(reference) -> nn.Embedding:
    return reference.quantize.embed if hasattr(reference.quantize, "embed") else reference.quantize.embedding


@torch.no_grad()
def spread_codes(reference) -> None:
    """A random model maps most inputs to a handful of codes, which would make the comparison weak.
    As training would, bring the codebook near the encoder's outputs: VQModel's entries become
    outputs for random images; GumbelVQ's logits get the spread of a trained projection."""
    if hasattr(reference.quantize, "proj"):
        nn.init.normal_(reference.quantize.proj.weight)
        return
    outputs = reference.quant_conv(reference.encoder(torch.rand(4, 3, 32, 32) * 2 - 1))
    outputs = outputs.permute(0, 2, 3, 1).flatten(0, 2)
    entries = codebook(reference).weight
    entries.copy_(outputs[torch.randperm(len(outputs))[:len(entries)]])


def write_taming(folder: Path, kind: str = "VQModel", seed: int = 0, **extra) -> tuple[Path, Path, nn.Module]:
    """(model.ckpt, model.yaml, the reference model). ``extra``: more top-level checkpoint entries."""
    folder.mkdir(parents=True, exist_ok=True)
    config = taming_yaml(kind)
    torch.manual_seed(seed)
    reference = getattr(taming_models(), kind)(**config["model"]["params"]).eval()
    spread_codes(reference)
    checkpoint = {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.0.8",
                  "state_dict": reference.state_dict(), **extra}
    torch.save(checkpoint, folder / "model.ckpt")
    (folder / "model.yaml").write_text(yaml.safe_dump(config))
    return folder / "model.ckpt", folder / "model.yaml", reference


@contextlib.contextmanager
def lightning_extras():
    """What makes a real Lightning checkpoint unreadable with weights_only: pickled objects, among
    them callback states keyed by the callback's class. Its module exists only while the
    checkpoint is written, as Lightning is not installed where import-vae reads it."""
    module = types.ModuleType("lightning_callbacks_stand_in")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    sys.modules[module.__name__] = module
    try:
        yield {"callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25)}},
               "hyper_parameters": argparse.Namespace(lr=4.5e-6)}
    finally:
        del sys.modules[module.__name__]


def dall_e():
    return pytest.importorskip("dall_e", reason="DALL-E (OpenAI's dVAE package) is not installed")


def write_openai(folder: Path, seed: int = 0) -> tuple[Path, Path, nn.Module, nn.Module]:
    """(encoder.pkl, decoder.pkl, encoder, decoder) at the smallest sizes dall_e accepts."""
    package = dall_e()
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    encoder = package.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512).eval()
    decoder = package.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512).eval()
    with torch.no_grad():  # as spread_codes: each code's logits, the likeness to one (centred) feature
        features = encoder.blocks.output.relu(encoder.blocks[:-1](torch.rand(8, 3, 32, 32)))
        features = features.permute(0, 2, 3, 1).flatten(0, 2)
        mean = features.mean(0)  # the part all positions share: the logits leave it out
        weights = torch.nn.functional.normalize(features - mean, dim=1)[torch.randint(len(features), (512,))]
        encoder.blocks.output.conv.w.copy_(weights[..., None, None])
        encoder.blocks.output.conv.b.copy_(-weights @ mean)
    torch.save(encoder, folder / "encoder.pkl")
    torch.save(decoder, folder / "decoder.pkl")
    return folder / "encoder.pkl", folder / "decoder.pkl", encoder, decoder
