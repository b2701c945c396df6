"""dalle_ds: distributed DALL-E training with DeepSpeed, sparse and reversible attention, CLIP."""

from .models import CLIP, DALLE, VQGAN, DiscreteVAE, ImageTokenizer, OpenAIDiscreteVAE

__all__ = ["CLIP", "DALLE", "DiscreteVAE", "ImageTokenizer", "OpenAIDiscreteVAE", "VQGAN"]
__version__ = "0.1.0"
