"""generate and eval through the command line, on small real models saved as export writes them."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_clip, tiny_dalle, tiny_vae
from data_fixtures import write_corpus
from dalle_ds.cli import main
from dalle_ds.data.pretokenize import pretokenize
from dalle_ds.data.tokenizer import train_tokenizer
from dalle_ds.demo.shapes import Scene, render

CAPTIONS = [f"a {c} square" for c in ("red", "green", "blue", "yellow")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Exported-style folders: weights + config.json + the captions' tokenizer.model."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = train_tokenizer(CAPTIONS * 20, root / "tok.model", 300)
    torch.manual_seed(0)
    vae = tiny_vae()
    dalle = tiny_dalle(vae=vae, num_text_tokens=300, text_seq_len=8)
    clip = tiny_clip(num_text_tokens=300, text_seq_len=8)
    for name, model in (("vae", vae), ("dalle", dalle), ("clip", clip)):
        model.save_pretrained(root / name)
        shutil.copyfile(tokenizer, root / name / "tokenizer.model")
    return root


def generate(models, out, *extra):
    return main(["generate", "--dalle", str(models / "dalle"), "--out", str(out), "--num-images", "3",
                 "--batch-size", "2", *extra, *CAPTIONS[:2]])


def test_generate_writes_images_sidecars_and_grids_reproducibly(models, tmp_path, capsys):
    assert generate(models, tmp_path / "a", "--seed", "5", "--clip", str(models / "clip")) == 0
    assert "generate: 6 images for 2 prompts" in capsys.readouterr().out
    first = sorted((tmp_path / "a").glob("000-*"))
    folder = next(p for p in first if p.is_dir())
    assert (tmp_path / "a" / f"{folder.name}.png").is_file()
    sidecars = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    assert [s["rank"] for s in sidecars] == [0, 1, 2] and {s["prompt"] for s in sidecars} == {CAPTIONS[0]}
    scores = [s["clip_score"] for s in sidecars]
    assert scores == sorted(scores, reverse=True)
    assert {(s["seed"], s["index_in_batch"]) for s in sidecars} == {(5, 0), (5, 1), (6, 0)}
    assert sidecars[0]["settings"]["num_images"] == 3
    assert Image.open(folder / "000.png").size == (16, 16)

    # one CLIP score: eval's mean over what generate wrote is the mean of its sidecars' scores
    # (eval reads the 8-bit PNGs, generate scored the images before they were rounded)
    assert main(["eval", "--out", str(tmp_path / "eval.json"), "--generations", str(tmp_path / "a"),
                 "--clip", str(models / "clip")]) == 0
    every = [json.loads(p.read_text())["clip_score"] for p in (tmp_path / "a").glob("*/*.json")]
    evaluated = json.loads((tmp_path / "eval.json").read_text())["generations"]["clip_score"]
    assert evaluated == pytest.approx(np.mean(every), abs=0.5)

    assert generate(models, tmp_path / "b", "--seed", "5", "--clip", str(models / "clip")) == 0
    again = next(p for p in sorted((tmp_path / "b").glob("000-*")) if p.is_dir())
    pngs = [sorted(f.glob("*.png")) for f in (folder, again)]
    assert [p.read_bytes() for p in pngs[0]] == [p.read_bytes() for p in pngs[1]]


def test_keep_and_sampling_flags(models, tmp_path):
    assert generate(models, tmp_path, "--clip", str(models / "clip")) == 0  # 3 images per prompt
    assert generate(models, tmp_path, "--clip", str(models / "clip"), "--keep", "1", "--top-k", "4",
                    "--temperature", "0.5", "--top-p", "0.9", "--cond-scale", "2") == 0  # the same folder again
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 2 and all(len(list(f.glob("*.png"))) == 1 for f in folders)
    settings = json.loads(next(folders[0].glob("*.json")).read_text())["settings"]
    assert settings["filter_thres"] == pytest.approx(1 - 4.5 / 32) and settings["cond_scale"] == 2


def test_prompts_from_a_file(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\na blue square\n")
    assert main(["generate", "--dalle", str(models / "dalle"), "--out", str(tmp_path / "o"), "--num-images", "1",
                 "--prompts-file", str(prompts)]) == 0
    assert len([p for p in (tmp_path / "o").iterdir() if p.is_dir()]) == 2


def test_clear_errors_for_the_wrong_model_or_no_prompt(models, tmp_path, capsys):
    assert main(["generate", "--dalle", str(models / "clip"), "--out", str(tmp_path), "x"]) == 2
    assert "holds a CLIP, not a DALLE" in capsys.readouterr().err
    assert main(["generate", "--dalle", str(tmp_path), "--out", str(tmp_path), "x"]) == 2
    assert "neither a model folder" in capsys.readouterr().err
    assert main(["generate", "--dalle", str(models / "dalle"), "--out", str(tmp_path)]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["generate", "--dalle", str(models / "dalle"), "--out", str(tmp_path), "--device", "cpu",
                 "--cuda-graph", "x"]) == 2
    assert "--cuda-graph needs a CUDA device; the model is on cpu" in capsys.readouterr().err
    assert main(["eval", "--out", str(tmp_path / "e.json"), "--vae", str(models / "vae")]) == 2
    assert "--vae and --images go together" in capsys.readouterr().err


def sidecar_and_pixels(folder):
    first = next(p for p in sorted(folder.glob("000-*")) if p.is_dir())
    return json.loads((first / "000.json").read_text()), [np.asarray(Image.open(p)) for p in sorted(first.glob("*.png"))]


def test_an_image_prompt_keeps_its_top_rows_and_the_model_completes_them(models, tmp_path, capsys):
    from dalle_ds import DALLE
    from dalle_ds.data.images import decode_image, images_to_float
    from dalle_ds.data.tokenizer import CaptionTokenizer

    photo = tmp_path / "photo.jpg"  # not square, not the model's size: prepared as training data is
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(photo)
    greedy = ("--temperature", "0", "--init-image", str(photo), "--init-rows", "2")
    assert generate(models, tmp_path / "primed", *greedy) == 0
    assert "memory for batch size 2" in capsys.readouterr().err
    sidecar, pixels = sidecar_and_pixels(tmp_path / "primed")
    assert sidecar["settings"]["init_rows"] == 2 and sidecar["settings"]["init_image"] == str(photo)

    # what the Python API gives when primed with the top 2 rows of the photo's codes
    dalle = DALLE.from_pretrained(models / "dalle")
    codes = dalle.vae.get_codebook_indices(images_to_float(decode_image(photo.read_bytes(), 16)[None]))
    text = CaptionTokenizer(models / "dalle" / "tokenizer.model").encode([CAPTIONS[0]], dalle.text_seq_len)
    expected = dalle.generate_images(text.ids, mask=text.mask, temperature=0, img=codes,
                                     num_init_img_tokens=2 * dalle.vae.grid_size)
    expected = (expected[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    assert len(pixels) == 3 and all(np.array_equal(p, expected) for p in pixels)

    assert generate(models, tmp_path / "free", "--temperature", "0") == 0
    assert not np.array_equal(sidecar_and_pixels(tmp_path / "free")[1][0], expected), "the prompt made a difference"


@pytest.mark.parametrize("flags, message", [
    ("--init-image {photo} --init-rows 4", "--init-rows must be in [1, 3] (the code grid has 4 rows), got 4"),
    ("--init-image {photo} --init-rows 0", "--init-rows must be in [1, 3]"),
    ("--init-image {junk} --init-rows 2", "junk.png is not a usable image (corrupt_image"),
    ("--init-image {missing} --init-rows 2", "No such file"),
    ("--init-rows 2", "--init-image and --init-rows go together"),
    ("--init-image {photo}", "--init-image and --init-rows go together"),
])
def test_bad_image_prompts_are_one_line_errors(models, tmp_path, capsys, flags, message):
    Image.new("RGB", (20, 20), "red").save(tmp_path / "photo.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    names = {name: tmp_path / f"{name}.png" for name in ("photo", "junk", "missing")}
    assert generate(models, tmp_path / "o", *flags.format(**names).split()) == 2
    assert message in capsys.readouterr().err


def test_generation_in_bf16_and_fp16_writes_the_dtype_in_the_sidecar(models, tmp_path, caplog):
    for dtype in ("bf16", "fp16"):
        assert generate(models, tmp_path / dtype, "--dtype", dtype) == 0
        sidecar, pixels = sidecar_and_pixels(tmp_path / dtype)
        assert sidecar["settings"]["dtype"] == dtype and len(pixels) == 3 and pixels[0].shape == (16, 16, 3)
    assert "fp16 on CPU" in caplog.text


def test_eval_scores_the_dvae_and_dalle_on_held_out_shards(models, tmp_path, capsys):
    from dalle_ds import DiscreteVAE

    shards = write_corpus(tmp_path / "raw", num_shards=2, per_shard=6)
    vae = DiscreteVAE.from_pretrained(models / "vae")
    pretokenize([str(s) for s in shards], vae, tmp_path / "tokens", batch_size=4, progress=False)
    out = tmp_path / "eval.json"
    assert main(["eval", "--out", str(out), "--vae", str(models / "vae"), "--images", str(tmp_path / "raw"),
                 "--dalle", str(models / "dalle"), "--tokens", str(tmp_path / "tokens"), "--max-samples", "10"]) == 0
    results = json.loads(out.read_text())
    assert results["vae"]["samples"] == 10 and results["dalle"]["samples"] == 10
    assert 0 < results["vae"]["recon_mse"] < 1 and results["vae"]["recon_psnr_db"] > 0
    assert 1 <= results["vae"]["codebook_perplexity"] <= 32 and 0 <= results["vae"]["dead_codes"] < 32
    dalle = results["dalle"]
    assert dalle["image_perplexity"] == pytest.approx(np.exp(dalle["image_loss"]))
    assert 1 < dalle["image_perplexity"] < 64  # an untrained model is near uniform over 32 codes
    assert "dalle.image_perplexity" in capsys.readouterr().out  # the table


def write_generations(folder, pairs):
    """generate's layout, with demo images drawn by the renderer: (prompt, drawn scene) pairs."""
    for i, (prompt, scene) in enumerate(pairs):
        sub = folder / f"{i:03d}"
        sub.mkdir(parents=True)
        Image.fromarray(render(scene)).save(sub / "000.png")
        (sub / "000.json").write_text(json.dumps({"prompt": prompt, "rank": 0, "seed": 0, "clip_score": 0.5}))


def test_eval_reads_colour_and_shape_from_generated_pixels(models, tmp_path):
    right = Scene("red", "triangle", "large", "centre", "white")
    wrong_shape = Scene("blue", "circle", "small", "left", "black")
    write_generations(tmp_path / "gen", [(right.caption(0), right), ("a blue cross", wrong_shape),
                                         ("a picture of nothing in particular", right)])
    out = tmp_path / "eval.json"
    assert main(["eval", "--out", str(out), "--generations", str(tmp_path / "gen"), "--clip", str(models / "clip")]) == 0
    generations = json.loads(out.read_text())["generations"]
    assert generations["images"] == 3 and generations["attribute_images"] == 2  # the third names no attribute
    assert generations["attribute_accuracy/all/colour"] == 1.0
    assert generations["attribute_accuracy/all/shape"] == 0.5 and generations["attribute_accuracy/best/both"] == 0.5
    assert -100 <= generations["clip_score"] <= 100
