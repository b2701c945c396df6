"""The model classes: plain nn.Modules, free of distributed code."""

from .clip import CLIP
from .dalle import DALLE
from .image_tokenizer import ImageTokenizer
from .openai_dvae import OpenAIDiscreteVAE
from .vae import DiscreteVAE
from .vqgan import VQGAN

__all__ = ["CLIP", "DALLE", "DiscreteVAE", "ImageTokenizer", "OpenAIDiscreteVAE", "VQGAN"]
