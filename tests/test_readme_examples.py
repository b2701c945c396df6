"""The README's Python examples (```python blocks) run as shown, in order, in one namespace.
Fragments that need data on disk are ```py blocks; tests/test_stream.py runs the same calls."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # save_pretrained writes to a relative folder
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["images"].shape == (4, 3, 128, 128)
    scores = namespace["scores"]  # image i's CLIP score against its caption, in input order
    assert scores.shape == (4,) and torch.equal(namespace["best"], namespace["images"][scores.argmax()])
    assert torch.equal(namespace["codes"][:, :64], namespace["vae"].get_codebook_indices(namespace["images"][:4])[:, :64])
    assert (tmp_path / "my-dalle" / "model.safetensors").is_file()
