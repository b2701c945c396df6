"""train.compile_blocks: each transformer block compiled by inductor (on CPU here), the attention
call outside the graphs; the same losses, gradients and logits as eager."""

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import tiny_dalle, tiny_vae
from dalle_ds.training.compile import compile_blocks

PATTERNS = ("full", "axial_row")  # a dense and a sparse layer: an entry each


def test_compiled_blocks_give_the_eager_losses_gradients_and_logits():
    vae = tiny_vae()
    eager, compiled = (tiny_dalle(vae, depth=4, attn_types=PATTERNS) for _ in range(2))  # each pattern twice
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled.transformer)
    torch._dynamo.reset()
    counters.clear()
    for batch in (2, 3):  # another batch size: a dynamic-shape entry, not a failure
        text = torch.randint(1, 50, (batch, 6))
        codes = torch.randint(0, vae.num_tokens, (batch, eager.image_seq_len))
        for model in (eager, compiled):
            model.zero_grad()
            model(text, codes, return_loss=True).backward()
        if batch == 2:  # a block is two graphs: before the attention call (one per pattern, not per
            # block: torch >= 2.5 guards on no module instance) and after it
            assert counters["frames"]["total"] == len(PATTERNS) + 1, dict(counters["frames"])
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(text, codes), eager(text, codes), atol=1e-5, rtol=1e-4)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    assert counters["stats"]["unique_graphs"] >= 2  # really compiled: the graphs around each attention call
    breaks = [reason for reason in counters["graph_break"] if "torch.compiler.disable" not in reason]
    assert not breaks, breaks  # a block breaks only at the attention call: all else fuses


def test_reversible_layers_are_refused():
    with pytest.raises(ValueError, match="train.compile_blocks compiles plain layers"):
        compile_blocks(tiny_dalle(reversible=True).transformer)
