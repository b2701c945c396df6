"""DiscreteVAE and CLIP behaviour, and save_pretrained / from_pretrained for all three models."""

import json

import pytest
import torch

from conftest import tiny_clip, tiny_dalle, tiny_vae
from dalle_ds import DALLE, DiscreteVAE


def test_vae_codes_decode_and_losses():
    vae = tiny_vae(num_resnet_blocks=1, kl_div_loss_weight=0.5)
    images = torch.rand(3, 3, 16, 16)
    codes = vae.get_codebook_indices(images)
    assert codes.shape == (3, 16) and codes.dtype == torch.long
    assert vae.decode(codes).shape == (3, 3, 16, 16)
    assert vae.decode(codes.to(torch.int16)).shape == (3, 3, 16, 16), "shard dtypes decode too"
    loss, recons = vae(images, return_recon_loss=True, return_recons=True)
    assert loss.ndim == 0 and recons.shape == images.shape
    assert vae(images, return_logits=True).shape == (3, 32, 4, 4)
    no_kl = tiny_vae(num_resnet_blocks=1)
    no_kl.load_state_dict(vae.state_dict())
    torch.manual_seed(0)
    with_kl_loss = vae(images, return_loss=True)  # DALLE-pytorch 1.x's name for the same flag
    torch.manual_seed(0)
    assert with_kl_loss > no_kl(images, return_recon_loss=True), "the KL term adds to the loss"


def test_vae_learns_to_reconstruct():
    vae = tiny_vae(smooth_l1_loss=True, straight_through=True, temperature=1.0)
    palette = torch.rand(4, 3)  # images of 4x4 flat patches: a code per patch can say it all
    images = palette[torch.randint(0, 4, (8, 4, 4))].permute(0, 3, 1, 2).repeat_interleave(4, 2).repeat_interleave(4, 3)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = vae(images, return_recon_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_vae_rejects_wrong_images_and_codes():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="images of shape \\(batch, 3, 16, 16\\), got \\(2, 3, 8, 8\\)"):
        vae(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="codes must be integers in \\[0, 32\\)"):
        vae.decode(torch.full((1, 16), 40))
    with pytest.raises(ValueError, match="codes of shape \\(batch, 16\\)"):
        vae.decode(torch.zeros(1, 9, dtype=torch.long))


def test_clip_scores_and_symmetric_loss():
    clip = tiny_clip().eval()
    text = torch.randint(1, 50, (4, 6))
    text[0, 3:] = 0
    images = torch.rand(4, 3, 16, 16)
    sim = clip(text, images, text_mask=text != 0)
    assert sim.shape == (4,)
    loss = clip(text, images, return_loss=True)
    flipped = clip(text.flip(0), images.flip(0), return_loss=True)
    torch.testing.assert_close(loss, flipped)
    padded = text.clone()
    padded[0, 3:] = 7  # masked-out tokens must not matter
    mask = text != 0
    torch.testing.assert_close(clip(padded, images, text_mask=mask), sim)
    with pytest.raises(ValueError, match="text of shape \\(batch, <= 6\\)"):
        clip(torch.ones(4, 7, dtype=torch.long), images)


def test_clip_learns_to_match_pairs():
    clip = tiny_clip()
    text = torch.randint(1, 50, (8, 6))
    images = torch.rand(8, 3, 16, 16)
    opt = torch.optim.Adam(clip.parameters(), lr=3e-3)
    for _ in range(40):
        loss = clip(text, images, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        sim = clip.embed_text(text) @ clip.embed_image(images).t()
    assert (sim.argmax(dim=1) == torch.arange(8)).float().mean() >= 0.75


@pytest.mark.parametrize("build", [
    lambda: tiny_vae(num_resnet_blocks=1),
    lambda: tiny_clip(),
    lambda: tiny_dalle(attn_types=("axial_row", "sparse"), reversible=True, sandwich_norm=True),
])
def test_save_pretrained_round_trip(tmp_path, build):
    model = build().eval()
    model.save_pretrained(tmp_path / "m")
    loaded = type(model).from_pretrained(tmp_path / "m").eval()
    assert loaded.config_record() == model.config_record()
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_dalle_round_trip_generates_the_same(tmp_path):
    dalle = tiny_dalle(attn_types="conv_like")
    dalle.save_pretrained(tmp_path)
    loaded = DALLE.from_pretrained(tmp_path)
    text = torch.randint(1, 50, (2, 6))
    assert torch.equal(dalle.generate_codes(text, seed=1), loaded.generate_codes(text, seed=1))
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["model_class"] == "DALLE" and record["config"]["vae"]["model_class"] == "DiscreteVAE"


def test_from_pretrained_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="not a saved model: expected config.json and model.safetensors"):
        DALLE.from_pretrained(tmp_path)
    tiny_vae().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a DiscreteVAE, not a DALLE; load it with DiscreteVAE.from_pretrained"):
        DALLE.from_pretrained(tmp_path)
    assert isinstance(DiscreteVAE.from_pretrained(tmp_path), DiscreteVAE)


def test_feed_forward_geglu_backward_matches_autograd():
    """The feed-forward's fused GEGLU: the same values as x * gelu(gate), and its hand-written
    backward against finite differences (float64)."""
    from torch.nn import functional as F

    from dalle_ds.models.transformer import FeedForward

    ff = FeedForward(dim=6, mult=2).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    value, gate = ff.proj_in(x).chunk(2, dim=-1)
    torch.testing.assert_close(ff(x), ff.proj_out(value * F.gelu(gate)))
    assert torch.autograd.gradcheck(ff, (x,))
