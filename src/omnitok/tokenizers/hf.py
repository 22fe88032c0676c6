"""Adapters that make pretrained transformers VQ-VAEs (``Emu3VQVAE``, ``JanusVQVAE``) omnitok image tokenizers.

They load from a local directory only (``save_pretrained`` output: ``config.json`` + ``model.safetensors``),
never from a hub, and present the same contract as :class:`omnitok.tokenizers.image.ImageTokenizer`: uint8
images in, flat code ids out, and back. Each adapter works at one square ``image_size`` (inputs of another
size are resized with antialiasing), so ``tokens_per_item`` is fixed and the vocabulary can reserve exactly
``grid[0] * grid[1]`` positions per image. Its settings (size, normalisation) are stored beside the
weights in ``omnitok_adapter.json``.

Pixel normalisation defaults to mean 0.5 / std 0.5 (pixels in [-1, 1]), the range both released VQ-VAEs
were trained on; pass the processor's values if a checkpoint differs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from omnitok.errors import OmnitokError
from omnitok.io import atomic_write_json, read_json
from omnitok.tokenizers.base import CONFIG_NAME, WEIGHTS_NAME, ImageInput, as_code_batch, as_image_batch

ADAPTER_NAME = "omnitok_adapter.json"
_KINDS = {"emu3_vqgan": "emu3", "janus_vqgan": "janus"}


class HFImageTokenizer:
    """Wraps a transformers VQ-VAE; use :meth:`from_pretrained` or :func:`load_hf_image_tokenizer`."""

    def __init__(
        self,
        model: Any,
        image_size: int | None = None,
        mean: float | tuple[float, float, float] = 0.5,
        std: float | tuple[float, float, float] = 0.5,
        batch_size: int = 8,
    ) -> None:
        mt = getattr(model.config, "model_type", None)
        if mt not in _KINDS:
            raise OmnitokError(f"unsupported VQ-VAE model_type {mt!r}; expected one of {sorted(_KINDS)}")
        self.kind = _KINDS[mt]
        self.model = model.eval()
        cfg = model.config
        self.factor = 2 ** (len(cfg.channel_multiplier) - 1)
        if self.kind == "janus":
            native = int(cfg.num_patches) * self.factor
            if image_size is not None and int(image_size) != native:
                raise OmnitokError(
                    f"JanusVQVAE decodes a fixed {cfg.num_patches}x{cfg.num_patches} grid, i.e. {native}px images;"
                    f" got image_size {image_size}"
                )
            image_size = native
        elif image_size is None:
            image_size = 512
        if int(image_size) % self.factor:
            raise OmnitokError(f"image_size {image_size} is not a multiple of the VQ-VAE's downsampling {self.factor}")
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean if isinstance(mean, list | tuple) else [mean] * 3).view(1, 3, 1, 1)
        self.std = torch.tensor(std if isinstance(std, list | tuple) else [std] * 3).view(1, 3, 1, 1)
        self.batch_size = batch_size

    # --- contract properties
    @property
    def codebook_size(self) -> int:
        cfg = self.model.config
        return int(cfg.codebook_size if self.kind == "emu3" else cfg.num_embeddings)

    @property
    def grid(self) -> tuple[int, int]:
        s = self.image_size // self.factor
        return (s, s)

    @property
    def tokens_per_item(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_levels(self) -> int:
        return 1

    # --- contract
    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        px = x.permute(0, 3, 1, 2).float() / 255.0
        if px.shape[-1] != self.image_size or px.shape[-2] != self.image_size:
            px = F.interpolate(px, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        dtype = next(self.model.parameters()).dtype
        return ((px - self.mean) / self.std).to(dtype)

    @torch.inference_mode()
    def encode(self, images: ImageInput) -> torch.Tensor:
        """uint8 [B, H, W, 3] or [H, W, 3] -> int64 codes [B, tokens] (resized to ``image_size`` first)."""
        x, single = as_image_batch(images)
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            px = self._pixels(x[i : i + self.batch_size])
            b = px.shape[0]
            if self.kind == "emu3":
                sizes = torch.tensor([[self.image_size, self.image_size]] * b)
                toks = torch.stack(list(self.model.encode(px, image_sizes=sizes).image_tokens))
            else:
                toks = self.model.encode(px).image_tokens
            out.append(toks.reshape(b, -1).long())
        codes = torch.cat(out)
        return codes[0] if single else codes

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Codes [B, tokens] or [tokens] -> uint8 images [B, image_size, image_size, 3]."""
        single = isinstance(codes, torch.Tensor | np.ndarray) and codes.ndim == 1
        c = as_code_batch(codes, self.codebook_size)
        if c.ndim == 1:
            c = c[None]
        c = c.reshape(c.shape[0], -1)
        if c.shape[1] != self.tokens_per_item:
            raise OmnitokError(
                f"codes: expected {self.tokens_per_item} tokens per image (grid {self.grid[0]}x{self.grid[1]}),"
                f" got {c.shape[1]}"
            )
        h, w = self.grid
        out = []
        for i in range(0, c.shape[0], self.batch_size):
            cb = c[i : i + self.batch_size]
            px = self.model.decode(cb.view(-1, h, w)) if self.kind == "emu3" else self.model.decode(cb)
            px = px.float() * self.std + self.mean
            out.append((px.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
        images = torch.cat(out)
        return images[0] if single else images

    # --- persistence
    def adapter_config(self) -> dict[str, Any]:
        return {
            "omnitok_adapter": self.kind,
            "image_size": self.image_size,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "codebook_size": self.codebook_size,
            "tokens_per_item": self.tokens_per_item,
            "grid": list(self.grid),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """``save_pretrained`` (safetensors) plus ``omnitok_adapter.json``."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(p, safe_serialization=True)
        atomic_write_json(p / ADAPTER_NAME, self.adapter_config())
        return p

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> HFImageTokenizer:
        return load_hf_image_tokenizer(path, **kwargs)

    load = from_pretrained


def load_hf_image_tokenizer(path: str | os.PathLike[str], **overrides: Any) -> HFImageTokenizer:
    """Load an ``Emu3VQVAE`` or ``JanusVQVAE`` saved with ``save_pretrained`` in a local directory.

    Only safetensors weights are accepted (``use_safetensors=True``), so loading never unpickles.
    """
    p = Path(path)
    if not p.is_dir():
        raise OmnitokError(f"VQ-VAE directory not found: {p}")
    cfg = read_json(p / CONFIG_NAME, "VQ-VAE config")
    mt = cfg.get("model_type")
    if mt not in _KINDS:
        raise OmnitokError(
            f"{p / CONFIG_NAME}: model_type {mt!r} is not a supported VQ-VAE; expected 'emu3_vqgan' (Emu3VQVAE)"
            " or 'janus_vqgan' (JanusVQVAE)"
        )
    if not (p / WEIGHTS_NAME).is_file():
        raise OmnitokError(f"VQ-VAE weights not found: {p / WEIGHTS_NAME} (only safetensors are loaded)")
    settings: dict[str, Any] = {}
    if (p / ADAPTER_NAME).is_file():
        a = read_json(p / ADAPTER_NAME, "adapter settings")
        settings = {k: a[k] for k in ("image_size", "mean", "std") if k in a}
    settings.update(overrides)
    if mt == "emu3_vqgan":
        from transformers import Emu3VQVAE as cls
    else:
        from transformers import JanusVQVAE as cls
    try:
        model = cls.from_pretrained(p, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise OmnitokError(f"could not load {cls.__name__} from {p}: {e}") from e
    return HFImageTokenizer(model, **settings)


def random_emu3(**config: Any) -> HFImageTokenizer:
    """An ``Emu3VQVAE`` with random weights (default architecture unless overridden) wrapped as a tokenizer;
    for speed measurements and tests, since speed does not depend on the weights."""
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    image_size = config.pop("image_size", None)
    return HFImageTokenizer(Emu3VQVAE(Emu3VQVAEConfig(**config)), image_size=image_size)


def random_janus(**config: Any) -> HFImageTokenizer:
    """A ``JanusVQVAE`` with random weights, wrapped; see :func:`random_emu3`."""
    from transformers import JanusVQVAE, JanusVQVAEConfig

    return HFImageTokenizer(JanusVQVAE(JanusVQVAEConfig(**config)))
