"""Shared plumbing for modality tokenizers: input checking, code checking, save/load, shard reading.

Every tokenizer (own or adapter) meets one contract, so the checks that turn a user's mistake into a clear
``OmnitokError`` live here once instead of drifting apart in each tokenizer.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from omnitok.errors import OmnitokError
from omnitok.io import atomic_path, atomic_write_json, read_json, read_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

ImageInput = np.ndarray | torch.Tensor | Sequence[np.ndarray]


# The numeric fields every tokenizer's training config has, by the least value that makes sense (config checks).
TRAIN_POSITIVE = ("steps", "lr", "log_every", "checkpoint_every", "threads")
TRAIN_NON_NEGATIVE = ("max_minutes", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip")


@runtime_checkable
class ImageTokenizerProtocol(Protocol):
    """What the vocabulary, the trainer and generation rely on; own tokenizers and adapters both satisfy it."""

    @property
    def codebook_size(self) -> int: ...

    @property
    def tokens_per_item(self) -> int: ...

    @property
    def grid(self) -> tuple[int, int]: ...

    def encode(self, images: ImageInput) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor: ...

    def save(self, path: str | os.PathLike[str]) -> Path: ...


# ----------------------------------------------------------------------------------------------- inputs


def as_image_batch(images: ImageInput, what: str = "images") -> tuple[torch.Tensor, bool]:
    """Validate images and return ``(uint8 tensor [B, H, W, 3], was_single)``.

    Accepting both numpy and torch, single and batched, keeps callers (CLI, data pipeline, generation) free of
    conversions; refusing anything but uint8 avoids silently treating [0, 1] floats as near-black images.
    """
    if isinstance(images, list | tuple):
        if not images:
            raise OmnitokError(f"{what}: got an empty list, expected at least one HxWx3 uint8 image")
        arrays = [as_image_batch(im, f"{what}[{i}]")[0] for i, im in enumerate(images)]
        shapes = {tuple(a.shape[1:]) for a in arrays}
        if len(shapes) != 1:
            raise OmnitokError(f"{what}: images in one batch must share a size, got shapes {sorted(shapes)}")
        return torch.cat(arrays, 0), False
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise OmnitokError(f"{what}: expected dtype uint8 (values 0..255), got numpy {images.dtype}")
        arr = np.ascontiguousarray(images)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise OmnitokError(f"{what}: expected dtype uint8 (values 0..255), got torch {images.dtype}")
        t = images.detach().cpu()
    else:
        raise OmnitokError(f"{what}: expected a numpy array or torch tensor, got {type(images).__name__}")
    single = t.ndim == 3
    if single:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise OmnitokError(
            f"{what}: expected shape [H, W, 3] or [B, H, W, 3] (RGB, channels last), got {list(t.shape)}"
        )
    if t.shape[0] == 0 or t.shape[1] == 0 or t.shape[2] == 0:
        raise OmnitokError(f"{what}: empty image batch, shape {list(t.shape)}")
    return t, single


def as_code_batch(codes: torch.Tensor | np.ndarray | Sequence[int], codebook_size: int) -> torch.Tensor:
    """Validate integer codes in ``[0, codebook_size)`` and return an int64 tensor (leading batch kept)."""
    if isinstance(codes, np.ndarray):
        arr = np.ascontiguousarray(codes)
        codes = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    elif not isinstance(codes, torch.Tensor):
        try:
            codes = torch.as_tensor(codes)
        except (TypeError, ValueError) as e:
            raise OmnitokError(f"codes: expected integer ids, could not read them as a tensor: {e}") from e
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise OmnitokError(f"codes: expected an integer dtype, got {codes.dtype}")
    codes = codes.detach().cpu().long()
    if codes.numel() == 0:
        raise OmnitokError(f"codes: got an empty tensor of shape {list(codes.shape)}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= codebook_size:
        raise OmnitokError(f"codes out of range: got values in [{lo}, {hi}], expected ids in [0, {codebook_size})")
    return codes


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """Map model output in [-1, 1], layout [B, 3, H, W], to uint8 [B, H, W, 3]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def from_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] to float [B, 3, H, W] in [-1, 1] (the range every codec here is trained on)."""
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def decode_png(data: bytes, where: str) -> np.ndarray:
    """Decode PNG bytes to HxWx3 uint8; a corrupt file names ``where`` instead of raising PIL's bare error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise OmnitokError(f"{where}: not a readable PNG image ({e})") from e


def read_image_file(path: str | os.PathLike[str]) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise OmnitokError(f"image file not found: {p}")
    return decode_png(p.read_bytes(), str(p))


# ----------------------------------------------------------------------------------------------- save/load


def read_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A tokenizer training checkpoint's model and optimizer tensors; an unreadable one says how to start over."""
    try:
        return (
            read_safetensors(ckpt / "model.safetensors", "checkpoint weights"),
            read_safetensors(ckpt / "optimizer.safetensors", "checkpoint optimizer state"),
        )
    except OmnitokError as e:
        raise OmnitokError(f"{e}; use --no-resume to start over") from e


def save_config_and_weights(
    path: str | os.PathLike[str], config: dict[str, Any], state: dict[str, torch.Tensor]
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` atomically (weights first, so a config implies weights)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(out / CONFIG_NAME, config)
    return out


def load_config_and_weights(path: str | os.PathLike[str], what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    p = Path(path)
    if not p.is_dir():
        raise OmnitokError(f"{what} directory not found: {p}")
    config = read_json(p / CONFIG_NAME, f"{what} config")
    return config, read_safetensors(p / WEIGHTS_NAME, f"{what} weights")


def resolve_tokenizer_dir(path: str | os.PathLike[str]) -> Path:
    """Accept either a tokenizer directory or a training run directory that holds ``tokenizer/``."""
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        try:
            cfg = json.loads((p / CONFIG_NAME).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            cfg = {}
        if isinstance(cfg, dict) and ("omnitok_tokenizer" in cfg or "model_type" in cfg):
            return p
    if (p / "tokenizer" / CONFIG_NAME).is_file():
        return p / "tokenizer"
    if not p.exists():
        raise OmnitokError(f"tokenizer directory not found: {p}")
    raise OmnitokError(
        f"{p} is not a tokenizer directory: expected {CONFIG_NAME} with an 'omnitok_tokenizer' field "
        f"(or a transformers VQ-VAE config), or a run directory containing tokenizer/"
    )


def load_image_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load any image tokenizer saved by omnitok (own FSQ tokenizer or a pretrained adapter)."""
    p = resolve_tokenizer_dir(path)
    cfg = read_json(p / CONFIG_NAME, "tokenizer config")
    kind = cfg.get("omnitok_tokenizer")
    if kind == "image_fsq":
        from omnitok.tokenizers.image import ImageTokenizer

        return ImageTokenizer.load(p)
    if kind is None and cfg.get("model_type") in ("emu3_vqgan", "janus_vqgan"):
        from omnitok.tokenizers.hf import load_hf_image_tokenizer

        return load_hf_image_tokenizer(p)
    raise OmnitokError(f"{p / CONFIG_NAME}: unknown image tokenizer type {kind!r}, expected 'image_fsq'")


# ----------------------------------------------------------------------------------------------- shards


@dataclass
class ShardSample:
    key: str
    image: np.ndarray
    meta: dict[str, Any] | None


def _glob_shards(folder: Path) -> list[Path]:
    """World scene shards (``scene-*.tar``) when present; otherwise any tar shards in ``folder``."""
    return sorted(folder.glob("scene-*.tar")) or sorted(folder.glob("*.tar"))


def find_image_shards(data: str | os.PathLike[str], split: str) -> list[Path]:
    """Locate WebDataset tar shards for ``split`` in a world directory (or a flat directory of shards)."""
    root = Path(data)
    if root.is_file() and root.suffix == ".tar":
        return [root]
    if not root.is_dir():
        raise OmnitokError(f"data directory not found: {root}")
    shards = _glob_shards(root / split) if (root / split).is_dir() else []
    if not shards and split == "train":
        shards = _glob_shards(root)
    if not shards:
        raise OmnitokError(
            f"no WebDataset shards for split '{split}' in {root}: expected {root / split}/*.tar "
            f"(build a world with `omnitok world build --out {root}`)"
        )
    return shards


def iter_shard_samples(
    shards: Sequence[str | os.PathLike[str]], with_meta: bool = False, image_ext: str = "png"
) -> Iterator[ShardSample]:
    """Yield images (and optional JSON metadata) from tar shards in order, naming the member on corruption.

    A plain ``tarfile`` reader (not a streaming pipeline) because tokenizer training holds the whole toy
    world in memory anyway and wants deterministic order and precise error messages.
    """
    for shard in shards:
        shard = Path(shard)
        try:
            tf = tarfile.open(shard, "r")  # noqa: SIM115 (closed by the with-block below)
        except (tarfile.TarError, OSError) as e:
            raise OmnitokError(f"{shard}: not a readable tar shard ({e})") from e
        with tf:
            pending: dict[str, dict[str, bytes]] = {}
            order: list[str] = []
            try:
                for m in tf:
                    if not m.isfile():
                        continue
                    name = m.name.rsplit("/", 1)[-1]
                    if "." not in name:
                        continue
                    key, ext = name.split(".", 1)
                    if ext != image_ext and not (with_meta and ext == "json"):
                        continue
                    f = tf.extractfile(m)
                    if f is None:
                        continue
                    if key not in pending:
                        pending[key] = {}
                        order.append(key)
                    pending[key][ext] = f.read()
            except (tarfile.TarError, OSError, EOFError) as e:
                raise OmnitokError(f"{shard}: truncated or corrupt tar shard ({e})") from e
            for key in order:
                parts = pending[key]
                if image_ext not in parts:
                    continue
                image = decode_png(parts[image_ext], f"{shard}:{key}.{image_ext}")
                meta = None
                if with_meta and "json" in parts:
                    try:
                        meta = json.loads(parts["json"])
                    except json.JSONDecodeError as e:
                        raise OmnitokError(f"{shard}:{key}.json is not valid JSON: {e}") from e
                yield ShardSample(key, image, meta)


def load_split_images(
    data: str | os.PathLike[str], split: str, limit: int | None = None, with_meta: bool = False
) -> tuple[np.ndarray, list[ShardSample]]:
    """Read a whole split into one uint8 array [N, H, W, 3] (plus the samples, for metadata)."""
    samples: list[ShardSample] = []
    for s in iter_shard_samples(find_image_shards(data, split), with_meta=with_meta):
        samples.append(s)
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise OmnitokError(f"split '{split}' in {data} holds no .png images")
    shapes = {s.image.shape for s in samples}
    if len(shapes) != 1:
        raise OmnitokError(f"split '{split}' in {data}: images differ in size {sorted(shapes)}")
    return np.stack([s.image for s in samples]), samples
