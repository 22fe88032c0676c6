"""omnitok: any-to-any multimodal language models on discrete tokens."""

__version__ = "0.1.0"
