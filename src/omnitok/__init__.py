"""omnitok: any-to-any multimodal language models on discrete tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from omnitok.generate import OmniModel


def load(path: str, device: str = "cpu") -> OmniModel:
    """Load a bundle directory: ``model = omnitok.load("runs/demo/bundle"); model.generate(...)``."""
    from omnitok.generate import load as _load

    return _load(path, device)
