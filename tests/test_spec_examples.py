"""Every Python block of the requested API (tests/spec/, a copy of the user's README) runs as
written, with `from dalle_ds import ...` in place of `from dalle_pytorch import ...`, at the
sizes written there."""

import re
from pathlib import Path

import torch

SPEC = Path(__file__).parent / "spec" / "dalle-pytorch-README.md"


def spec_blocks():
    blocks = re.findall(r"```python\n(.*?)```", SPEC.read_text(), flags=re.S)
    return [b.replace("from dalle_pytorch import", "from dalle_ds import") for b in blocks]


def test_spec_examples_run_as_written():
    namespace = {}
    blocks = spec_blocks()
    assert len(blocks) == 4, "the spec has four Python examples"
    for block in blocks:
        exec(compile(block, str(SPEC), "exec"), namespace)  # noqa: S102 - our own spec file
    images, scores = namespace["images"], namespace["scores"]
    assert images.shape == (4, 3, 256, 256) and scores.shape == (4,)
    assert torch.isfinite(images).all()
    with torch.no_grad():  # scores[i]: image i against caption i, in input order
        expected = namespace["clip"](namespace["text"], images, text_mask=namespace["mask"])
    torch.testing.assert_close(scores, expected)
