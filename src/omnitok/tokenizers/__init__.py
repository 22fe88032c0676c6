"""Modality tokenizers: every modality becomes discrete codes in one vocabulary.

Image: :class:`~omnitok.tokenizers.image.ImageTokenizer` (own FSQ autoencoder) and
:class:`~omnitok.tokenizers.hf.HFImageTokenizer` (adapters to transformers' Emu3 / Janus VQ-VAEs), loaded
uniformly by :func:`load_image_tokenizer`. Submodules import torch and transformers lazily where they can,
so importing this package stays cheap.
"""

from omnitok.tokenizers.base import ImageTokenizerProtocol, load_image_tokenizer

__all__ = ["ImageTokenizerProtocol", "load_image_tokenizer"]
