"""Reading a built world back: the manifest and decoded samples from its WebDataset shards."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from omnitok.errors import OmnitokError
from omnitok.io import read_json


def load_manifest(world: str | Path) -> dict[str, Any]:
    path = Path(world) / "manifest.json"
    if not path.exists():
        raise OmnitokError(f"{world} is not a built omnitok world: {path} is missing")
    manifest = read_json(path, "world manifest")
    if manifest.get("format") != "omnitok-world":
        raise OmnitokError(f"{path}: field 'format' should be 'omnitok-world', got {manifest.get('format')!r}")
    return manifest


def shard_paths(world: str | Path, split: str, kind: str) -> list[str]:
    manifest = load_manifest(world)
    if split not in manifest["shards"]:
        raise OmnitokError(f"split {split!r} not in {world}; has {sorted(manifest['shards'])}")
    paths = [str(Path(world) / s["path"]) for s in manifest["shards"][split] if s["kind"] == kind]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise OmnitokError(f"world {world} is incomplete: missing shard {missing[0]}")
    return paths


def decode_png(data: bytes, name: str = "image") -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB") if im.mode not in ("RGB", "L") else im).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise OmnitokError(f"{name} is not a readable PNG: {e}") from e


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw WebDataset record -> {'key', 'meta', extension: array}; PNGs to uint8 arrays, WAVs to float32."""
    key = raw["__key__"]
    out: dict[str, Any] = {"key": key, "meta": json.loads(raw["json"])}
    for ext, data in raw.items():
        if ext.startswith("__") or ext == "json":
            continue
        if ext.endswith("png"):
            out[ext] = decode_png(data, f"{key}.{ext}")
        elif ext.endswith("wav"):
            from omnitok.world.speech import decode_wav

            out[ext], _ = decode_wav(data)
        else:
            out[ext] = data
    return out


def iter_samples(world: str | Path, split: str, kind: str, decode: bool = True) -> Iterator[dict[str, Any]]:
    """Samples of one split and kind in shard order (deterministic)."""
    paths = shard_paths(world, split, kind)
    if not paths:
        return
    dataset = wds.WebDataset(paths, shardshuffle=False, empty_check=False)
    for raw in dataset:
        yield decode_sample(raw) if decode else raw
