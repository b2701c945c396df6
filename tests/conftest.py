import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# This environment's bin first, for every test and the commands they start: its console scripts
# (dalle-ds, torchrun), and one ninja for the C++ op builds (DeepSpeed's shm comm, our attention
# kernel). A system ninja of another version reads the build log as stale, so each switch between
# the two rebuilt the ops (30 s).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_vae(**overrides):
    from dalle_ds import DiscreteVAE

    cfg = dict(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8)
    cfg.update(overrides)
    return DiscreteVAE(**cfg)


def tiny_dalle(vae=None, **overrides):
    from dalle_ds import DALLE

    cfg = dict(dim=32, vae=vae or tiny_vae(), num_text_tokens=50, text_seq_len=6, depth=2, heads=2, dim_head=8,
               sparse_block_size=4, sparse_local_blocks=2, sparse_stride=2, conv_kernel_size=3)
    cfg.update(overrides)
    return DALLE(**cfg)


def tiny_clip(**overrides):
    from dalle_ds import CLIP

    cfg = dict(dim_text=16, dim_image=16, dim_latent=8, num_text_tokens=50, text_enc_depth=1, text_seq_len=6,
               text_heads=2, text_dim_head=8, visual_enc_depth=1, visual_heads=2, visual_dim_head=8,
               visual_image_size=16, visual_patch_size=4)
    cfg.update(overrides)
    return CLIP(**cfg)
