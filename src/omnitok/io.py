"""Atomic file writing and run records.

Every artefact omnitok writes (shards, checkpoints, manifests) goes through a temporary name in the same
directory followed by ``os.replace``, so a crash or Ctrl-C never leaves a file that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omnitok.errors import OmnitokError, is_int


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it into place only if the block succeeds."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def dumps_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, fixed indent) so equal content gives equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, dumps_json(obj).encode("utf-8"))


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise OmnitokError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise OmnitokError(f"{what} {p} is not valid JSON: {e}") from e


def check_format(doc: Any, fmt: str, version: int, source: str) -> Any:
    """``doc``, once it is a mapping whose ``format`` is ``fmt`` and whose integer ``version`` this omnitok reads."""
    got = doc.get("format") if isinstance(doc, Mapping) else type(doc).__name__
    if got != fmt:
        raise OmnitokError(f"{source}: field 'format' should be {fmt!r}, got {got!r}")
    v = doc.get("version", 0)
    if not is_int(v):
        raise OmnitokError(f"{source}: field 'version' should be an integer, got {v!r}")
    if v > version:
        raise OmnitokError(f"{source}: version {v} is newer than this omnitok reads ({version})")
    return doc


def read_safetensors(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The tensors of a safetensors file; a missing, truncated or foreign file is an error that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise OmnitokError(f"{what} not found: {p}")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise OmnitokError(f"{what} {p} is not a readable safetensors file ({e}); it may be truncated") from e


def ensure_writable_dir(path: str | os.PathLike[str], what: str = "output directory") -> Path:
    """Create ``path`` if needed and prove we can write there before any long work starts."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OmnitokError(f"{what} {p} is a file; give a directory (it is created if missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".omnitok-write-probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OmnitokError(f"{what} {p} is not writable: {e.strerror or e}") from e
    return p


def write_run_config(out_dir: str | os.PathLike[str], command: str, config: dict[str, Any]) -> Path:
    """Record what a run was asked to do next to what it produced (``config.json``)."""
    from omnitok import __version__

    record = {
        "command": command,
        "argv": sys.argv,
        "omnitok_version": __version__,
        "python": platform.python_version(),
        "config": config,
    }
    path = Path(out_dir) / "config.json"
    atomic_write_json(path, record)
    return path
