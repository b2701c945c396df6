"""The model classes: plain nn.Modules, free of distributed code."""

from .clip import CLIP
from .dalle import DALLE
from .vae import DiscreteVAE

__all__ = ["CLIP", "DALLE", "DiscreteVAE"]
