"""Weight-decay groups and the warmup + cosine schedule."""

import math

import pytest
import torch

from conftest import tiny_dalle
from dalle_ds.training.optim import OptimConfig, build_optimizer, build_scheduler, lr_factor, param_groups


def test_decay_only_on_weight_matrices_and_never_on_the_frozen_vae():
    dalle = tiny_dalle()
    decay, no_decay = param_groups(dalle, 0.1)
    names = {id(p): n for n, p in dalle.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "transformer.blocks.0.attn.to_qkv.weight" in decayed and "to_image_logits.weight" in decayed
    assert {"text_emb.weight", "image_emb.weight", "text_pos_emb.weight", "norm.weight", "norm.bias",
            "transformer.blocks.0.ff.proj_in.bias"} <= kept
    assert not any(n.startswith("vae.") for n in decayed | kept)
    trainable = {n for n, p in dalle.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable and not decayed & kept


def test_warmup_then_cosine_to_the_floor():
    config = OptimConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1) and lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(10, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(110, config) == pytest.approx(0.1) == lr_factor(10_000, config)


def test_optimizer_and_scheduler_drive_the_lr():
    dalle = tiny_dalle()
    config = OptimConfig(lr=2e-3, warmup_steps=4, total_steps=20)
    optimizer = build_optimizer(dalle, config)
    scheduler = build_scheduler(optimizer, config)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3]) and lrs[5] < lrs[4]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    with pytest.raises(ValueError, match="min_lr_ratio in \\[0, 1\\]"):
        build_scheduler(torch.optim.SGD(dalle.parameters(), lr=1), OptimConfig(total_steps=5, min_lr_ratio=2))
