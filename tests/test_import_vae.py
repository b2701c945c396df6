"""import-vae against the reference packages: random taming VQModel / GumbelVQ and OpenAI dVAE
models, saved in their own formats, converted by the command; our codes equal theirs and our
reconstructions match theirs. Bad inputs give one-line errors."""

import sys

import pytest
import torch

from dalle_ds import VQGAN, ImageTokenizer, OpenAIDiscreteVAE
from dalle_ds.cli import main
from dalle_ds.models.pretrained import model_fingerprint
from reference_tokenizers import dall_e, lightning_extras, taming_yaml, write_openai, write_taming


def import_taming(folder, out, *extra):
    return main(["import-vae", "--format", "taming", "--ckpt", str(folder / "model.ckpt"),
                 "--config", str(folder / "model.yaml"), "--out", str(out), *extra])


def import_openai(folder, out, *extra):
    return main(["import-vae", "--format", "openai", "--encoder", str(folder / "encoder.pkl"),
                 "--decoder", str(folder / "decoder.pkl"), "--out", str(out), *extra])


def taming_codes(reference, images):
    """The reference's codes for images in [0, 1]: VQModel's nearest entries; for GumbelVQ the most
    likely entries of its logits (its forward samples them with Gumbel noise)."""
    with torch.no_grad():
        if hasattr(reference.quantize, "proj"):
            h = reference.quant_conv(reference.encoder(images * 2 - 1))
            return reference.quantize(h, return_logits=True)[3].argmax(1).flatten(1)
        return reference.encode(images * 2 - 1)[2][2].view(len(images), -1)


def taming_images(reference, codes, grid):
    """The reference's decoding of codes, from [-1, 1] to [0, 1]."""
    b, d = len(codes), reference.post_quant_conv.in_channels
    with torch.no_grad():
        embeds = reference.quantize.get_codebook_entry(codes.flatten(), (b, grid, grid, d))
        return (reference.decode(embeds).clamp(-1, 1) + 1) / 2


@pytest.mark.parametrize("kind", ["VQModel", "GumbelVQ"])
def test_taming_checkpoints_convert_to_a_vqgan_that_matches_taming(tmp_path, kind, capsys):
    _, _, reference = write_taming(tmp_path / "taming", kind)
    assert import_taming(tmp_path / "taming", tmp_path / "vae") == 0
    assert "VQGAN: 64 codes, 32px images -> 8x8 grid" in capsys.readouterr().out

    ours = ImageTokenizer.from_pretrained(tmp_path / "vae")
    assert isinstance(ours, VQGAN) and ours.config["quantizer"] == ("gumbel" if kind == "GumbelVQ" else "vq")
    images = torch.rand(3, 3, 32, 32)
    codes = ours.get_codebook_indices(images)
    expected = taming_codes(reference, images)
    assert codes.shape == (3, 64) and codes.dtype == torch.long
    assert codes.unique().numel() > 8  # a comparison of many different codes, not of one
    assert torch.equal(codes, expected)
    torch.testing.assert_close(ours.decode(codes), taming_images(reference, expected, 8), atol=1e-5, rtol=1e-5)
    if kind == "VQModel":  # and its whole forward pass: encode, quantise, decode
        with torch.no_grad():
            reconstruction = (reference(images * 2 - 1)[0].clamp(-1, 1) + 1) / 2
        torch.testing.assert_close(ours.decode(codes), reconstruction, atol=1e-5, rtol=1e-5)


def test_openai_pickles_convert_to_a_dvae_that_matches_dall_e(tmp_path, capsys):
    package = dall_e()
    _, _, encoder, decoder = write_openai(tmp_path / "openai")
    assert import_openai(tmp_path / "openai", tmp_path / "vae", "--trust-pickle", "--image-size", "32") == 0
    assert "OpenAIDiscreteVAE: 512 codes, 32px images -> 4x4 grid" in capsys.readouterr().out

    ours = ImageTokenizer.from_pretrained(tmp_path / "vae")
    assert isinstance(ours, OpenAIDiscreteVAE)
    images = torch.rand(4, 3, 32, 32)
    codes = ours.get_codebook_indices(images)
    with torch.no_grad():
        logits = encoder(package.map_pixels(images))
        one_hot = torch.nn.functional.one_hot(logits.argmax(1), 512).permute(0, 3, 1, 2).float()
        expected_images = package.unmap_pixels(torch.sigmoid(decoder(one_hot)[:, :3]))
    assert codes.unique().numel() > 8
    assert torch.equal(codes, logits.argmax(1).flatten(1))
    torch.testing.assert_close(ours.decode(codes), expected_images, atol=1e-5, rtol=1e-5)


def test_a_checkpoint_with_pickled_objects_needs_trust_pickle_but_not_lightning(tmp_path, capsys):
    with lightning_extras() as extras:
        write_taming(tmp_path / "taming", **extras)
    assert import_taming(tmp_path / "taming", tmp_path / "vae") == 2
    err = capsys.readouterr().err
    assert "holds pickled objects besides weights" in err and "add --trust-pickle" in err
    assert not (tmp_path / "vae").exists()
    assert import_taming(tmp_path / "taming", tmp_path / "vae", "--trust-pickle") == 0
    plain = tmp_path / "plain"
    write_taming(plain)  # the same seed: the same weights, without the pickled extras
    assert import_taming(plain, tmp_path / "vae2") == 0
    assert model_fingerprint(VQGAN.from_pretrained(tmp_path / "vae")) == model_fingerprint(
        VQGAN.from_pretrained(tmp_path / "vae2"))


def test_openai_pickles_are_refused_without_trust_pickle_and_need_dall_e(tmp_path, capsys, monkeypatch):
    write_openai(tmp_path / "openai")
    assert import_openai(tmp_path / "openai", tmp_path / "vae") == 2
    assert "whole pickled modules" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "dall_e", None)  # as where the package is not installed
    assert import_openai(tmp_path / "openai", tmp_path / "vae", "--trust-pickle") == 2
    assert "pip install --no-deps DALL-E==0.1" in capsys.readouterr().err
    assert not (tmp_path / "vae").exists()


def test_wrong_inputs_say_what_is_wrong(tmp_path, capsys):
    import yaml

    write_taming(tmp_path / "taming")
    write_openai(tmp_path / "openai")
    config = tmp_path / "taming" / "model.yaml"

    def error(code):
        assert code == 2
        return capsys.readouterr().err

    config.write_text(yaml.safe_dump(taming_yaml(n_embed=128)))  # not the YAML of this checkpoint
    assert "do not fit its config (of another shape: quantize.embedding.weight)" in error(
        import_taming(tmp_path / "taming", tmp_path / "vae"))
    config.write_text(yaml.safe_dump(taming_yaml("GumbelVQ")))
    assert "missing: quantize.embed.weight, quantize.proj.bias" in error(
        import_taming(tmp_path / "taming", tmp_path / "vae"))
    wrong_target = taming_yaml()
    wrong_target["model"]["target"] = "taming.models.cond_transformer.Net2NetTransformer"
    config.write_text(yaml.safe_dump(wrong_target))
    assert "model.target is 'taming.models.cond_transformer.Net2NetTransformer'" in error(
        import_taming(tmp_path / "taming", tmp_path / "vae"))
    double_z = taming_yaml(ddconfig={**taming_yaml()["model"]["params"]["ddconfig"], "double_z": True})
    config.write_text(yaml.safe_dump(double_z))
    assert "double_z is not a VQGAN image tokenizer's config" in error(
        import_taming(tmp_path / "taming", tmp_path / "vae"))
    config.write_text(yaml.safe_dump(taming_yaml("GumbelVQ", embed_dim=16)))  # a GumbelVQ taming cannot run
    assert "embed_dim != z_channels is not a VQGAN image tokenizer's config" in error(
        import_taming(tmp_path / "taming", tmp_path / "vae"))
    config.write_text("model:\n  target: taming.models.vqgan.VQModel\n  params: {embed_dim: 16}\n")
    assert "lacks model.params.n_embed, model.params.ddconfig.resolution" in error(
        import_taming(tmp_path / "taming", tmp_path / "vae"))

    # the other format's files, flags or none
    assert "holds a builtins.dict, not dall_e's Encoder" in error(main(
        ["import-vae", "--format", "openai", "--encoder", str(tmp_path / "taming" / "model.ckpt"),
         "--decoder", str(tmp_path / "openai" / "decoder.pkl"), "--out", str(tmp_path / "vae"), "--trust-pickle"]))
    assert "--format taming needs --config" in error(main(
        ["import-vae", "--format", "taming", "--ckpt", str(tmp_path / "taming" / "model.ckpt"),
         "--out", str(tmp_path / "vae")]))
    assert "--encoder do not go with --format taming" in error(import_taming(
        tmp_path / "taming", tmp_path / "vae", "--encoder", str(tmp_path / "openai" / "encoder.pkl")))
    assert "decoder.pkl are not one dVAE: vocab_size 512 vs 1024" in error(main(
        ["import-vae", "--format", "openai", "--encoder", str(tmp_path / "openai" / "encoder.pkl"),
         "--decoder", str(write_other_decoder(tmp_path)), "--out", str(tmp_path / "vae"), "--trust-pickle"]))
    with pytest.raises(SystemExit):
        main(["import-vae", "--format", "keras", "--out", str(tmp_path / "vae")])
    assert "invalid choice: 'keras'" in capsys.readouterr().err
    assert not (tmp_path / "vae").exists()


def write_other_decoder(tmp_path):
    path = tmp_path / "other_decoder.pkl"
    torch.save(dall_e().Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=1024), path)
    return path
