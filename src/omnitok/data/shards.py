"""Token shards: the on-disk form of pretokenized training data.

One ``(split, task, rank)`` shard is three flat ``.npy`` files: the ids of all its documents concatenated, a loss
mask of the same length and the document offsets. Flat arrays memory-map, so a trainer reads any document in
O(1) without loading the shard, and many processes share the page cache. The offsets file is moved into place
last: a shard without it (a crash mid-write) is not a shard, and :func:`write_manifest` ignores it.

    TOKDIR/manifest.json
    TOKDIR/vocab.json
    TOKDIR/{split}/{task}/shard-{rank:05d}.{ids,mask,offsets}.npy
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omnitok.errors import OmnitokError, is_int
from omnitok.io import atomic_path, atomic_write_json, read_json

FORMAT = "omnitok-tokens"
VERSION = 1
PARTS = ("ids", "mask", "offsets")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHARD = re.compile(r"^shard-(\d{5,})\.offsets\.npy$")


def _check_name(kind: str, name: str) -> str:
    # Split and task names become directory names; keep them to one safe path component.
    if not isinstance(name, str) or not _NAME.match(name):
        raise OmnitokError(f"{kind} name {name!r} must be letters, digits, '_', '-' or '.', not starting with '.'")
    return name


class ShardWriter:
    """Collects the documents of one ``(split, task, rank)`` and writes them as one shard on :meth:`close`.

    Documents are held in memory until ``close`` (about 5 bytes per token), so a pretokenizer should bound
    how much goes into one shard. Used as a context manager, an exception inside the block writes nothing.
    """

    def __init__(self, tokdir: str | Path, split: str, task: str, rank: int = 0) -> None:
        if not isinstance(rank, int) or rank < 0:
            raise OmnitokError(f"shard rank must be a non-negative integer, got {rank!r}")
        self.tokdir = Path(tokdir)
        self.prefix = f"{_check_name('split', split)}/{_check_name('task', task)}/shard-{rank:05d}"
        self._ids: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._closed = False

    def add(self, ids: Sequence[int] | np.ndarray, mask: Sequence[int] | np.ndarray) -> None:
        if self._closed:
            raise OmnitokError(f"shard {self.prefix} is already closed")
        a = np.asarray(ids)
        m = np.asarray(mask)
        doc = len(self._ids)
        where = f"shard {self.prefix}, document {doc}"
        if a.ndim != 1 or m.ndim != 1:
            raise OmnitokError(f"{where}: ids and mask must be 1-D, got shapes {a.shape} and {m.shape}")
        if len(a) != len(m):
            raise OmnitokError(f"{where}: ids has {len(a)} tokens but mask has {len(m)}")
        if len(a) == 0:
            raise OmnitokError(f"{where}: empty document")
        if a.dtype.kind not in "iu" or m.dtype.kind not in "iub":
            raise OmnitokError(f"{where}: ids and mask must be integers, got {a.dtype} and {m.dtype}")
        if a.min() < 0 or a.max() >= 2**32:
            raise OmnitokError(f"{where}: ids must be in [0, 2**32), got min {a.min()} max {a.max()}")
        if not np.isin(m, (0, 1)).all():
            raise OmnitokError(f"{where}: mask values must be 0 or 1, got {sorted(set(np.unique(m).tolist()))}")
        self._ids.append(a.astype(np.uint32))
        self._masks.append(m.astype(np.uint8))

    def close(self) -> dict[str, Any]:
        """Write the shard; returns ``{"docs", "tokens", "prefix"}``."""
        if self._closed:
            raise OmnitokError(f"shard {self.prefix} is already closed")
        self._closed = True
        lengths = np.array([len(a) for a in self._ids], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.uint32)
        mask = np.concatenate(self._masks) if self._masks else np.zeros(0, np.uint8)
        self._ids, self._masks = [], []
        base = self.tokdir / self.prefix
        base.parent.mkdir(parents=True, exist_ok=True)
        # The stack leaves in reverse order, so offsets (entered first) is moved into place last.
        with contextlib.ExitStack() as stack:
            tmps = {part: stack.enter_context(atomic_path(f"{base}.{part}.npy")) for part in reversed(PARTS)}
            for part, arr in (("ids", ids), ("mask", mask), ("offsets", offsets)):
                with open(tmps[part], "wb") as f:
                    np.save(f, arr, allow_pickle=False)
            # An older shard under the same name stops looking complete before its parts are replaced.
            Path(f"{base}.offsets.npy").unlink(missing_ok=True)
        return {"docs": len(lengths), "tokens": int(offsets[-1]), "prefix": self.prefix}

    def abort(self) -> None:
        """Drop everything added; nothing is written."""
        self._ids, self._masks = [], []
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def _open_shard(tokdir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = []
    for part in PARTS:
        path = tokdir / f"{prefix}.{part}.npy"
        if not path.is_file():
            raise OmnitokError(f"token shard {tokdir / prefix} is incomplete: {path.name} is missing")
        try:
            arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
        except (ValueError, OSError) as e:
            raise OmnitokError(f"token shard file {path} is not a readable .npy file: {e}") from e
    ids, mask, offsets = arrays
    ok = (
        ids.dtype == np.uint32
        and mask.dtype == np.uint8
        and offsets.dtype == np.int64
        and len(offsets) >= 1
        and offsets[0] == 0
        and offsets[-1] == len(ids) == len(mask)
    )
    if not ok:
        raise OmnitokError(
            f"token shard {tokdir / prefix} is inconsistent: expected uint32 ids, uint8 mask and int64 offsets "
            f"from 0 to len(ids); got {ids.dtype}[{len(ids)}], {mask.dtype}[{len(mask)}], "
            f"{offsets.dtype}[{len(offsets)}] ending at {offsets[-1] if len(offsets) else None}"
        )
    return ids, mask, offsets


def write_manifest(tokdir: str | Path, vocab_size: int) -> dict[str, Any]:
    """Index every complete shard under ``tokdir`` into ``manifest.json``; call once, after all writers closed.

    Every id is checked against ``vocab_size`` here, once, so a trainer can trust the shards later.
    """
    root = Path(tokdir)
    splits: dict[str, dict[str, dict[str, Any]]] = {}
    for offsets_path in sorted(root.glob("*/*/shard-*.offsets.npy")):
        if not _SHARD.match(offsets_path.name):
            continue
        split, task = offsets_path.parent.parent.name, offsets_path.parent.name
        prefix = f"{split}/{task}/{offsets_path.name.removesuffix('.offsets.npy')}"
        ids, _mask, offsets = _open_shard(root, prefix)
        if len(ids) and int(ids.max()) >= vocab_size:
            raise OmnitokError(f"token shard {root / prefix} holds id {int(ids.max())} >= vocab_size {vocab_size}")
        entry = splits.setdefault(split, {}).setdefault(task, {"docs": 0, "tokens": 0, "shards": []})
        entry["docs"] += len(offsets) - 1
        entry["tokens"] += int(offsets[-1])
        entry["shards"].append(prefix)
    manifest = {"format": FORMAT, "version": VERSION, "vocab_size": int(vocab_size), "splits": splits}
    atomic_write_json(root / "manifest.json", manifest)
    return manifest


def load_manifest(tokdir: str | Path) -> dict[str, Any]:
    root = Path(tokdir)
    if not root.is_dir():
        raise OmnitokError(f"token directory {root} does not exist")
    path = root / "manifest.json"
    if not path.is_file():
        raise OmnitokError(f"{root} is not a token directory: {path} is missing (run `omnitok pretokenize`)")
    manifest = read_json(path, "token manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise OmnitokError(f"{path}: field 'format' should be {FORMAT!r}, got {got!r}")
    if manifest.get("version") != VERSION:
        raise OmnitokError(f"{path}: field 'version' should be {VERSION}, got {manifest.get('version')!r}")
    return manifest


class TokenDataset:
    """The documents of one ``(split, task)``, memory-mapped across its shards."""

    def __init__(self, tokdir: str | Path, split: str, task: str) -> None:
        self.tokdir = Path(tokdir)
        self.split, self.task = split, task
        manifest = load_manifest(self.tokdir)
        if split not in manifest["splits"]:
            raise OmnitokError(f"{self.tokdir}: no split {split!r}; has {sorted(manifest['splits'])}")
        tasks = manifest["splits"][split]
        if task not in tasks:
            raise OmnitokError(f"{self.tokdir}: split {split!r} has no task {task!r}; has {sorted(tasks)}")
        self._shards = [_open_shard(self.tokdir, prefix) for prefix in tasks[task]["shards"]]
        counts = [len(offsets) - 1 for _, _, offsets in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # Lengths of every document, read from the offsets alone: the packer plans batches with these.
        self.lengths = np.concatenate([np.diff(o) for _, _, o in self._shards]) if self._shards else np.zeros(0)
        self.lengths = self.lengths.astype(np.int64)
        self.num_tokens = int(self.lengths.sum())

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {self.split}/{self.task} ({n} documents)")
        i = int(i) % n
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        ids, mask, offsets = self._shards[s]
        lo, hi = int(offsets[i - self._starts[s]]), int(offsets[i - self._starts[s] + 1])
        return np.asarray(ids[lo:hi], dtype=np.int64), np.array(mask[lo:hi], dtype=np.uint8)


def read_vocab_size(tokdir: str | Path) -> int:
    """The vocabulary size a token directory was written with (``vocab.json``'s ``size``)."""
    path = Path(tokdir) / "vocab.json"
    vocab = read_json(path, "vocabulary")
    size = vocab.get("size") if isinstance(vocab, dict) else None
    if not is_int(size) or size <= 0:
        raise OmnitokError(f"{path}: field 'size' should be a positive integer, got {size!r}")
    return size
