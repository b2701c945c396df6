"""The data-preparation commands end to end, as a user runs them: folder -> shards -> tokenizer
-> token shards -> decoded check grid; and their one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import tiny_vae
from data_fixtures import COLOURS, png_bytes, shard_members
from dalle_ds.cli import main
from dalle_ds.data.manifest import Manifest


@pytest.fixture
def image_folder(tmp_path):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for j in range(3):
            stem = src / ("sub" if j else "") / f"{name}{j}"
            stem.with_suffix(".png").write_bytes(png_bytes(rgb, size=24))
            stem.with_suffix(".txt").write_text(f"a {name} square number {j}")
    (src / "orphan.png").write_bytes(png_bytes((0, 0, 0)))  # no caption: skipped
    return src


def test_folder_to_decoded_grid(image_folder, tmp_path, capsys):
    shards = tmp_path / "shards"
    assert main(["prep-folder", "--src", str(image_folder), "--out", str(shards), "--samples-per-shard", "5"]) == 0
    assert "12 samples in 3 shards; skipped: missing_caption 1" in capsys.readouterr().out
    members = shard_members(shards / "00000.tar")
    assert {"000000000.png", "000000000.txt", "000000000.json"} <= set(members)

    model = tmp_path / "captions.model"
    assert main(["train-tokenizer", "--data", str(shards), "--out", str(model), "--vocab-size", "300"]) == 0
    assert model.is_file()

    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    tokens = tmp_path / "tokens"
    assert main(["pretokenize", "--data", f"{shards}/{{00000..00002}}.tar", "--vae", str(vae_dir),
                 "--out", str(tokens), "--batch-size", "4", "--no-progress"]) == 0
    assert "3 shards written" in capsys.readouterr().out
    assert Manifest.load(tokens).total_samples == 12

    grid = tmp_path / "check.png"
    assert main(["decode-check", "--data", str(tokens), "--vae", str(vae_dir), "--out", str(grid),
                 "--num-samples", "6"]) == 0
    with Image.open(grid) as image:
        assert image.size == (4 * 128, 2 * (128 + 40))  # 16 px images enlarged to 128 px cells


@pytest.mark.parametrize("argv, message", [
    (["pretokenize", "--data", "{tmp}/nothing/*.tar", "--vae", "{tmp}", "--out", "{tmp}/o"], "no shards match"),
    (["decode-check", "--data", "{tmp}", "--vae", "{tmp}", "--out", "{tmp}/x.png"], "no manifest.json"),
    (["prep-folder", "--src", "{tmp}/missing", "--out", "{tmp}/o"], "is not a folder"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize("how", ["--debug first", "--debug last", "DALLE_DS_DEBUG=1"])
def test_debug_shows_the_error_with_its_traceback(tmp_path, monkeypatch, how):
    """The one-line message hides the traceback, which an internal bug needs: --debug (before or
    after the command) or DALLE_DS_DEBUG=1 raises the error itself."""
    argv = ["prep-folder", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    if how == "DALLE_DS_DEBUG=1":
        monkeypatch.setenv("DALLE_DS_DEBUG", "1")
    else:
        argv = ["--debug", *argv] if how == "--debug first" else [*argv, "--debug"]
    with pytest.raises(ValueError, match="is not a folder"):
        main(argv)


def test_console_script_and_data_prep_entry_points_run():
    console_script = Path(sys.executable).parent / "dalle-ds"
    data_prep = Path(__file__).resolve().parents[1] / "data_prep" / "pretokenize.py"
    for cmd in ([str(console_script), "pretokenize", "--help"], [sys.executable, str(data_prep), "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert "--job-index" in out and "--num-jobs" in out


def test_prep_folder_refuses_a_used_output_folder(image_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["prep-folder", "--src", str(image_folder), "--out", str(out)]) == 0
    assert main(["prep-folder", "--src", str(image_folder), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
