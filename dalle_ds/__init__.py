"""dalle_ds: distributed DALL-E training with DeepSpeed, sparse and reversible attention, CLIP."""

from .models import CLIP, DALLE, DiscreteVAE

__all__ = ["CLIP", "DALLE", "DiscreteVAE"]
__version__ = "0.1.0"
