"""VQGAN and OpenAI's dVAE as image tokenizers: the presets are taming's released configs, DALLE
takes either (train, generate, save and load), and a converted VQGAN goes wherever a dVAE goes:
pretokenize, decode-check, train-dalle, export, generate and eval."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import tiny_dalle
from data_fixtures import write_corpus
from dalle_ds import DALLE, VQGAN, ImageTokenizer, OpenAIDiscreteVAE
from dalle_ds.cli import main
from dalle_ds.data.manifest import Manifest
from dalle_ds.data.tokenizer import train_tokenizer
from dalle_ds.import_vae import taming_config
from dalle_ds.models.pretrained import model_fingerprint
from dalle_ds.models.vqgan import PRESETS
from reference_tokenizers import taming_models, taming_yaml, write_taming

F16 = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4],
           num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
RELEASED = {  # model.params of taming-transformers' released YAMLs (their loss config aside)
    "imagenet_f16_1024": ("VQModel", dict(embed_dim=256, n_embed=1024, ddconfig=F16)),
    "imagenet_f16_16384": ("VQModel", dict(embed_dim=256, n_embed=16384, ddconfig=F16)),
    "gumbel_f8_8192": ("GumbelVQ", dict(embed_dim=256, n_embed=8192, kl_weight=1e-8,
                                         ddconfig={**F16, "ch_mult": [1, 1, 2, 4], "attn_resolutions": [32]})),
}


TINY_RUN = ["train.deepspeed_config=ds_configs/zero2.json", "train.steps=2", "train.micro_batch=4",
            "optim.total_steps=2", "checkpoint.every_steps=2", "logging.sample_every_steps=2", "model.dim=32",
            "model.depth=1", "model.heads=2", "model.dim_head=8", "model.text_seq_len=8", "data.num_workers=1",
            "data.shuffle_buffer=8"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_the_released_configs_with_tamings_weight_shapes(name, tmp_path):
    kind, params = RELEASED[name]
    config = taming_yaml(kind, **params)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    with torch.device("meta"):  # full-size models, without allocating their weights
        ours = VQGAN.preset(name)
        reference = getattr(taming_models(), kind)(**config["model"]["params"])
    assert ours.config_record() == VQGAN(**taming_config(tmp_path / "model.yaml")).config_record()
    theirs = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("loss.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    assert ours.grid_size == reference.decoder.z_shape[-1] and ours.num_tokens == params["n_embed"]


def tiny_tokenizers():
    return [VQGAN(image_size=16, num_tokens=48, embed_dim=8, z_channels=32, hidden_dim=32, ch_mult=(1, 2),
                  num_res_blocks=1, attn_resolutions=(8,)),
            OpenAIDiscreteVAE(image_size=64, num_tokens=48, hidden_dim=8, blocks_per_group=1, init_dim=8)]


@pytest.mark.parametrize("vae", tiny_tokenizers(), ids=lambda vae: type(vae).__name__)
def test_dalle_trains_generates_and_round_trips_with_either_tokenizer(vae, tmp_path):
    dalle = tiny_dalle(vae=vae.eval())
    images, text = torch.rand(4, 3, vae.image_size, vae.image_size), torch.randint(1, 50, (4, 6))
    codes = vae.get_codebook_indices(images)
    assert codes.shape == (4, 64) and 0 <= codes.min() and codes.max() < 48
    optimizer = torch.optim.Adam(dalle.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = dalle(text, images, return_loss=True)  # pixels in: the tokenizer encodes them
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in dalle.vae.parameters())  # frozen

    dalle.save_pretrained(tmp_path)
    loaded = DALLE.from_pretrained(tmp_path).eval()
    assert type(loaded.vae) is type(vae) and model_fingerprint(loaded.vae) == model_fingerprint(vae)
    dalle.eval()
    torch.testing.assert_close(loaded(text, codes), dalle(text, codes), rtol=0, atol=0)
    generated = loaded.generate_images(text[:2], seed=0)
    assert generated.shape == (2, 3, vae.image_size, vae.image_size) and 0 <= generated.min() and generated.max() <= 1


@pytest.mark.parametrize("vae", tiny_tokenizers(), ids=lambda vae: type(vae).__name__)
def test_bad_images_and_codes_are_named(vae):
    size = vae.image_size
    with pytest.raises(ValueError, match=rf"{type(vae).__name__} expects images of shape \(batch, 3, {size}, {size}\)"):
        vae.get_codebook_indices(torch.rand(2, 3, size * 2, size * 2))
    with pytest.raises(ValueError, match=r"codes must be integers in \[0, 48\)"):
        vae.decode(torch.full((1, 64), 48))


def test_a_converted_vqgan_goes_wherever_a_dvae_goes(tmp_path, capsys):
    """import-vae -> pretokenize -> decode-check -> train-dalle (sampling with the VQGAN) -> export
    -> generate and eval, each loading the converted folder or the DALL-E that holds it."""
    write_taming(tmp_path / "taming")
    vae = tmp_path / "vae"
    assert main(["import-vae", "--format", "taming", "--ckpt", str(tmp_path / "taming" / "model.ckpt"),
                 "--config", str(tmp_path / "taming" / "model.yaml"), "--out", str(vae)]) == 0
    shards = write_corpus(tmp_path / "raw", num_shards=2, per_shard=8)
    assert main(["pretokenize", "--data", str(tmp_path / "raw"), "--vae", str(vae), "--out", str(tmp_path / "tokens"),
                 "--batch-size", "8", "--no-progress"]) == 0
    manifest = Manifest.load(tmp_path / "tokens")
    tokenizer = ImageTokenizer.from_pretrained(vae)
    assert (manifest.vae_fingerprint, manifest.grid_size, manifest.num_codes) == (model_fingerprint(tokenizer), 8, 64)
    assert main(["decode-check", "--data", str(tmp_path / "tokens"), "--vae", str(vae),
                 "--out", str(tmp_path / "check.png"), "--num-samples", "4"]) == 0
    train_tokenizer([f"a {c} square" for c in ("red", "green", "blue", "yellow")] * 20, tmp_path / "tok.model", 300)

    train = [sys.executable, "-m", "dalle_ds.training.train_dalle", "--data", str(tmp_path / "tokens"),
             "--tokenizer", str(tmp_path / "tok.model"), "--vae", str(vae), "--out", str(tmp_path / "run"), *TINY_RUN]
    done = subprocess.run(train, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "dalle")]) == 0
    dalle = DALLE.from_pretrained(tmp_path / "dalle")
    assert isinstance(dalle.vae, VQGAN) and model_fingerprint(dalle.vae) == manifest.vae_fingerprint
    assert main(["generate", "--dalle", str(tmp_path / "dalle"), "--out", str(tmp_path / "gen"), "--num-images", "1",
                 "a red square"]) == 0
    assert len(list((tmp_path / "gen").glob("*/*.png"))) == 1
    assert main(["eval", "--out", str(tmp_path / "eval.json"), "--vae", str(vae), "--images", str(shards[0]),
                 "--dalle", str(tmp_path / "dalle"), "--tokens", str(tmp_path / "tokens"), "--max-samples", "4"]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["vae"]["codebook_size"] == 64 and results["dalle"]["samples"] == 4
