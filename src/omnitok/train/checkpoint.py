"""Checkpoints: safetensors for tensors, JSON for everything else, one directory per step, moved into place whole.

    out/checkpoints/step-000100/
        model.safetensors       full (unsharded) model state
        optimizer.safetensors   optimizer tensors, keys "state/<param name>/<key>"
        optimizer.json          optimizer param groups and any non-tensor state
        trainer_state.json      step, stage, sampler state, RNG states, vocab size, recipe hash

Nothing is pickled, so a checkpoint from elsewhere cannot run code on load. A directory is written under a
hidden temporary name and renamed when complete: ``latest_checkpoint`` never sees a partial one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from omnitok.errors import OmnitokError
from omnitok.io import atomic_write_json, read_json, read_safetensors

STATE_FORMAT = "omnitok-trainer-state"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def _tensors_for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied embeddings); give each key its own copy.
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for name, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{key}"] = value
            else:
                rest["state"].setdefault(name, {})[key] = value
    return tensors, rest


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {name: dict(v) for name, v in rest["state"].items()}
    for flat, value in tensors.items():
        _, name_key = flat.split("/", 1)
        name, key = name_key.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    out: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``out/checkpoints/step-{step}`` atomically, then drop all but the ``keep`` newest."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_tensors_for_safetensors(model_state), tmp / "model.safetensors", metadata={"format": "pt"})
        opt_tensors, opt_rest = _split_optimizer_state(optimizer_state)
        save_file(_tensors_for_safetensors(opt_tensors), tmp / "optimizer.safetensors")
        atomic_write_json(tmp / "optimizer.json", opt_rest)
        atomic_write_json(tmp / "trainer_state.json", {"format": STATE_FORMAT, **trainer_state})
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # re-running over an older copy of this step: the new one wins
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "trainer_state.json"
    state = read_json(file, "trainer state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise OmnitokError(f"{file}: not an omnitok trainer state (field 'format' should be {STATE_FORMAT!r})")
    return state


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    return read_safetensors(Path(path) / "model.safetensors", "checkpoint model weights")


def load_optimizer_state(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    tensors = read_safetensors(p / "optimizer.safetensors", "checkpoint optimizer state")
    return _join_optimizer_state(tensors, read_json(p / "optimizer.json", "checkpoint optimizer state"))


def rng_state() -> dict[str, list[list[int]]]:
    """This process's torch RNG states as plain lists (JSON, not pickles)."""
    state = {"cpu": [torch.get_rng_state().tolist()]}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, list[list[int]]]) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"][0], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
