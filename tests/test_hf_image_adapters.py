"""Adapters to transformers' Emu3VQVAE / JanusVQVAE: tiny random configs, saved and loaded locally."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitok.errors import OmnitokError
from omnitok.tokenizers.base import load_image_tokenizer
from omnitok.tokenizers.hf import HFImageTokenizer, load_hf_image_tokenizer

transformers = pytest.importorskip("transformers")

EMU3_TINY = dict(
    codebook_size=64,
    embed_dim=4,
    latent_channels=4,
    base_channels=32,
    channel_multiplier=[1, 1],
    num_res_blocks=1,
    attn_resolutions=[],
    temporal_downsample_factor=2,
    hidden_size=32,
)
JANUS_TINY = dict(
    num_embeddings=48,
    embed_dim=4,
    latent_channels=32,
    base_channels=32,
    channel_multiplier=[1, 1],
    num_res_blocks=1,
    num_patches=8,
    projection_dim=8,
    image_token_embed_dim=8,
)


def _save_tiny(kind: str, path: Path) -> Path:
    torch.manual_seed(0)
    if kind == "emu3":
        model = transformers.Emu3VQVAE(transformers.Emu3VQVAEConfig(**EMU3_TINY))
    else:
        model = transformers.JanusVQVAE(transformers.JanusVQVAEConfig(**JANUS_TINY))
    model.save_pretrained(path)  # safetensors by default; no downloads anywhere
    return path


def _images(n: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(("kind", "size", "grid", "codebook"), [("emu3", 16, 8, 64), ("janus", 16, 8, 48)])
def test_adapter_contract(tmp_path: Path, kind: str, size: int, grid: int, codebook: int) -> None:
    path = _save_tiny(kind, tmp_path / kind)
    tok = load_hf_image_tokenizer(path, image_size=size)
    assert isinstance(tok, HFImageTokenizer)
    assert tok.codebook_size == codebook and tok.grid == (grid, grid) and tok.tokens_per_item == grid * grid
    images = _images(3, size)
    codes = tok.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (3, grid * grid)
    assert int(codes.min()) >= 0 and int(codes.max()) < codebook
    assert torch.equal(tok.encode(images[2]), codes[2])  # single image == its row of the batch
    out = tok.decode(codes)
    assert out.dtype == torch.uint8 and out.shape == (3, size, size, 3)
    assert tok.decode(codes[0]).shape == (size, size, 3)
    # other input sizes are resized to the adapter's size, so the token count stays fixed
    assert tok.encode(_images(1, 2 * size)).shape == (1, grid * grid)

    # save (safetensors + adapter settings) and load back through the generic loader
    tok.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "omnitok_adapter.json").read_text())["image_size"] == size
    back = load_image_tokenizer(tmp_path / "saved")
    assert isinstance(back, HFImageTokenizer) and back.image_size == size
    assert torch.equal(back.encode(images), codes)
    assert torch.equal(back.decode(codes), out)


def test_adapter_errors(tmp_path: Path) -> None:
    path = _save_tiny("janus", tmp_path / "janus")
    tok = load_hf_image_tokenizer(path)
    assert tok.image_size == 16  # Janus decodes a fixed num_patches grid: 8 patches x factor 2
    with pytest.raises(OmnitokError, match="fixed 8x8 grid"):
        load_hf_image_tokenizer(path, image_size=32)
    with pytest.raises(OmnitokError, match="out of range"):
        tok.decode(torch.full((1, 64), 48))
    with pytest.raises(OmnitokError, match="64 tokens per image"):
        tok.decode(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(OmnitokError, match="dtype uint8"):
        tok.encode(np.zeros((16, 16, 3), np.float32))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(OmnitokError, match="not a supported VQ-VAE"):
        load_hf_image_tokenizer(tmp_path / "other")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(OmnitokError, match="weights not found"):
        load_hf_image_tokenizer(tmp_path / "noweights")
