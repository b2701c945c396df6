"""import-vae: a pretrained image tokenizer in its own release format -> one model folder
(``model.safetensors`` + ``config.json``) that pretokenize, train-dalle and the Python API load
like a trained dVAE.

- taming-transformers' VQGAN: a Lightning checkpoint (weights under ``state_dict``; the loss's
  discriminator and perceptual weights, ``loss.*``, are training-only and dropped) and its YAML
  (``model.target`` VQModel or GumbelVQ, ``model.params``: embed_dim, n_embed, ddconfig).
- OpenAI's dVAE: ``encoder.pkl`` and ``decoder.pkl``, whole pickled modules of the ``dall_e``
  package, so that unpickling them needs that package and the user's explicit trust.
"""

from __future__ import annotations

import pickle
import types
from pathlib import Path

import torch
import yaml

from .models.openai_dvae import OpenAIDiscreteVAE
from .models.pretrained import load_strict
from .models.vqgan import VQGAN

TAMING_MODELS = {"VQModel": "vq", "GumbelVQ": "gumbel"}  # model.target's class -> VQGAN's quantizer
_DDCONFIG_KEYS = ("resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                  "z_channels")
DALL_E_INSTALL = "pip install --no-deps DALL-E==0.1 attrs requests"  # dall_e/__init__ imports requests
_DALL_E_PARAMS = {"w": "weight", "b": "bias"}  # dall_e's Conv2d names its parameters w and b


def taming_config(config_path) -> dict:
    """VQGAN's arguments from a taming YAML; ValueError for what VQGAN cannot hold."""
    config = yaml.safe_load(Path(config_path).read_text()) or {}
    model = config.get("model") if isinstance(config, dict) else None
    target = str((model or {}).get("target", ""))
    quantizer = TAMING_MODELS.get(target.rsplit(".", 1)[-1])
    if quantizer is None:
        raise ValueError(f"{config_path}: model.target is {target or 'missing'!r}; import-vae --format taming "
                         f"converts taming.models.vqgan.VQModel or GumbelVQ")
    params = model.get("params") or {}
    dd = params.get("ddconfig") or {}
    missing = [f"model.params.{k}" for k in ("embed_dim", "n_embed") if k not in params]
    missing += [f"model.params.ddconfig.{k}" for k in _DDCONFIG_KEYS if k not in dd]
    if missing:
        raise ValueError(f"{config_path} lacks {', '.join(missing)}: give the YAML the checkpoint was trained with")
    unsupported = {"double_z": dd.get("double_z", False), "resamp_with_conv": not dd.get("resamp_with_conv", True),
                   "remap": params.get("remap"), "in_channels != out_ch": dd["in_channels"] != dd["out_ch"],
                   "embed_dim != z_channels": quantizer == "gumbel" and params["embed_dim"] != dd["z_channels"]}
    if any(unsupported.values()):
        raise ValueError(f"{config_path}: {', '.join(k for k, v in unsupported.items() if v)} is not a VQGAN "
                         f"image tokenizer's config (VQModel and GumbelVQ use double_z: false, resamp_with_conv: "
                         f"true, no remap, in_channels = out_ch; GumbelVQ embed_dim = z_channels)")
    return dict(image_size=dd["resolution"], num_tokens=params["n_embed"], embed_dim=params["embed_dim"],
                z_channels=dd["z_channels"], hidden_dim=dd["ch"], ch_mult=list(dd["ch_mult"]),
                num_res_blocks=dd["num_res_blocks"], attn_resolutions=list(dd["attn_resolutions"]),
                channels=dd["in_channels"], quantizer=quantizer)


class _StandInUnpickler(pickle.Unpickler):
    """Unpickles in full, but reads a class whose module is not installed (Lightning's callbacks,
    which Lightning checkpoints hold besides the weights) as an empty stand-in: only the weights
    are used, and taming's checkpoints then need no Lightning."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ModuleNotFoundError, AttributeError):
            return type(name, (), {"__module__": module, "__init__": lambda self, *args, **kwargs: None,
                                   "__setstate__": lambda self, state: None})


_STAND_IN_PICKLE = types.SimpleNamespace(Unpickler=_StandInUnpickler, load=pickle.load, __name__="pickle")


def read_checkpoint(path, trust_pickle: bool):
    """torch.load of a checkpoint: tensors and plain containers only, unless the user trusts it."""
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_STAND_IN_PICKLE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds pickled objects besides weights (Lightning checkpoints may), which safe "
                         f"loading refuses; if you trust the file, add --trust-pickle to unpickle it") from error


def import_taming(ckpt, config, out_dir, trust_pickle: bool = False) -> VQGAN:
    model = VQGAN(**taming_config(config))
    checkpoint = read_checkpoint(ckpt, trust_pickle)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{ckpt} has no state_dict: give a taming-transformers (Lightning) checkpoint")
    load_strict(model, {k: v for k, v in state.items() if not k.startswith("loss.")}, f"{ckpt} and {config}")
    model.eval().save_pretrained(out_dir)
    return model


def _unpickle_dall_e(path, part: str) -> torch.nn.Module:
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as error:
        raise ValueError(f"{path} holds pickled classes of OpenAI's dall_e package, which must be importable to "
                         f"unpickle it ({error}): {DALL_E_INSTALL}") from error
    if type(module).__module__ != f"dall_e.{part.lower()}" or type(module).__name__ != part:
        raise ValueError(f"{path} holds a {type(module).__module__}.{type(module).__name__}, not dall_e's {part}")
    return module


def _dall_e_weights(module: torch.nn.Module, prefix: str) -> dict:
    """dall_e's ``blocks.X.w`` / ``blocks.X.b`` -> our ``prefix.X.weight`` / ``prefix.X.bias``."""
    renamed = {}
    for key, tensor in module.state_dict().items():
        path, _, leaf = key.removeprefix("blocks.").rpartition(".")
        renamed[f"{prefix}.{path}.{_DALL_E_PARAMS.get(leaf, leaf)}"] = tensor.float()
    return renamed


def import_openai(encoder, decoder, out_dir, trust_pickle: bool = False,
                  image_size: int | None = None) -> OpenAIDiscreteVAE:
    """``image_size``: of the images to tokenize (None: OpenAIDiscreteVAE's default, the size OpenAI trained at)."""
    if not trust_pickle:
        raise ValueError(f"{encoder} and {decoder} are whole pickled modules, and unpickling runs code from "
                         f"the file: add --trust-pickle if you trust them")
    enc, dec = _unpickle_dall_e(encoder, "Encoder"), _unpickle_dall_e(decoder, "Decoder")
    pairs = {"vocab_size": (enc.vocab_size, dec.vocab_size), "n_hid": (enc.n_hid, dec.n_hid),
             "n_blk_per_group": (enc.n_blk_per_group, dec.n_blk_per_group),
             "channels": (enc.input_channels, dec.output_channels)}
    mismatched = [f"{name} {a} vs {b}" for name, (a, b) in pairs.items() if a != b]
    if mismatched:
        raise ValueError(f"{encoder} and {decoder} are not one dVAE: {', '.join(mismatched)}")
    size = {} if image_size is None else {"image_size": image_size}
    model = OpenAIDiscreteVAE(**size, num_tokens=enc.vocab_size, hidden_dim=enc.n_hid,
                              blocks_per_group=enc.n_blk_per_group, init_dim=dec.n_init, channels=enc.input_channels)
    weights = {**_dall_e_weights(enc, "encoder"), **_dall_e_weights(dec, "decoder")}
    load_strict(model, weights, f"{encoder} and {decoder}")
    model.eval().save_pretrained(out_dir)
    return model
