"""The unified id space: text ids first, then special tokens, then one contiguous range per codebook.

One causal decoder predicts every modality from one softmax, so every discrete code of every tokenizer
needs its own id. Codecs with several residual levels (RVQ, residual FSQ) get one range per level, so the
model can tell level 0 of frame t from level 1 without positional tricks. Ids never move once a
vocabulary is saved: a checkpoint's embedding row i means the same token forever.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnitok.errors import OmnitokError, is_int
from omnitok.io import atomic_write_json, check_format, read_json

FORMAT = "omnitok-vocab"
VERSION = 1

PAD, BOS, EOS, END = "<|pad|>", "<|bos|>", "<|eos|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPAN_TOKENS = {"image": ("<image>", "</image>"), "speech": ("<speech>", "</speech>"), "video": ("<video>", "</video>")}
FRAME = "<frame>"
BASE_SPECIALS: tuple[str, ...] = (
    PAD,
    BOS,
    EOS,
    END,
    *ROLE_TOKENS.values(),
    *(t for pair in SPAN_TOKENS.values() for t in pair),
    FRAME,
)


def style_token(field: str, value: str) -> str:
    """``<|pitch:high|>``: style controls are plain special tokens the model reads and writes."""
    return f"<|{field}:{value}|>"


_STYLE_RE = re.compile(r"^<\|(\w+):([^|]+)\|>$")


def parse_style_token(name: str) -> tuple[str, str] | None:
    """``("pitch", "high")`` for ``<|pitch:high|>`` (the inverse of :func:`style_token`); None for other tokens."""
    m = _STYLE_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


@dataclass(frozen=True)
class CodeRange:
    modality: str
    level: int
    start: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size


class Vocabulary:
    """Maps between global ids and (text id | special name | modality code at a level)."""

    def __init__(self, text_size: int, specials: Sequence[str], codebooks: Sequence[CodeRange]) -> None:
        self.text_size = int(text_size)
        self.specials: dict[str, int] = {name: self.text_size + i for i, name in enumerate(specials)}
        self.codebooks: tuple[CodeRange, ...] = tuple(codebooks)
        self._validate(list(specials))
        self._special_names = {i: n for n, i in self.specials.items()}
        self._by_modality: dict[str, list[CodeRange]] = {}
        for r in self.codebooks:
            self._by_modality.setdefault(r.modality, []).append(r)
        self.size = self.codebooks[-1].stop if self.codebooks else self.text_size + len(self.specials)

    @classmethod
    def build(
        cls,
        text_size: int,
        codebooks: Mapping[str, int | Sequence[int]],
        styles: Mapping[str, Iterable[str]] | None = None,
        extra_specials: Iterable[str] = (),
    ) -> Vocabulary:
        """Lay out a fresh vocabulary: ``codebooks`` maps modality -> size, or per-level sizes for RVQ codecs."""
        specials = list(BASE_SPECIALS)
        for field, values in (styles or {}).items():
            specials += [style_token(field, v) for v in values]
        specials += [s for s in extra_specials if s not in specials]
        ranges: list[CodeRange] = []
        start = int(text_size) + len(specials)
        for modality, sizes in codebooks.items():
            for level, size in enumerate([sizes] if isinstance(sizes, int) else list(sizes)):
                ranges.append(CodeRange(modality, level, start, int(size)))
                start += int(size)
        return cls(text_size, specials, ranges)

    def _validate(self, specials: list[str]) -> None:
        if self.text_size < 0:
            raise OmnitokError(f"vocabulary: text size must be >= 0, got {self.text_size}")
        if len(set(specials)) != len(specials):
            dup = sorted({s for s in specials if specials.count(s) > 1})
            raise OmnitokError(f"vocabulary: duplicate special tokens {dup}")
        missing = [s for s in BASE_SPECIALS if s not in self.specials]
        if missing:
            raise OmnitokError(f"vocabulary: missing required special tokens {missing}")
        expected = self.text_size + len(specials)
        seen: set[tuple[str, int]] = set()
        for r in self.codebooks:
            if r.size < 1:
                raise OmnitokError(f"vocabulary: codebook {r.modality} level {r.level} has size {r.size}")
            if (r.modality, r.level) in seen:
                raise OmnitokError(f"vocabulary: codebook {r.modality} level {r.level} appears twice")
            seen.add((r.modality, r.level))
            if r.start != expected:
                kind = "overlaps the previous range" if r.start < expected else "leaves a gap after the previous range"
                raise OmnitokError(
                    f"vocabulary: codebook {r.modality} level {r.level} starts at {r.start} and {kind} "
                    f"(expected start {expected})"
                )
            expected = r.stop
        for modality in {r.modality for r in self.codebooks}:
            levels = sorted(r.level for r in self.codebooks if r.modality == modality)
            if levels != list(range(len(levels))):
                raise OmnitokError(f"vocabulary: codebook {modality} levels must be 0..n-1, got {levels}")

    # --- lookups ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.size

    def special(self, name: str) -> int:
        try:
            return self.specials[name]
        except KeyError:
            raise OmnitokError(f"vocabulary has no special token {name!r}") from None

    def special_name(self, token_id: int) -> str | None:
        return self._special_names.get(int(token_id))

    def styles(self) -> dict[str, list[str]]:
        """Each style field's values this vocabulary has a token for (``{"pitch": ["low", ...]}``), in id order."""
        out: dict[str, list[str]] = {}
        for name in self.specials:
            parsed = parse_style_token(name)
            if parsed:
                out.setdefault(parsed[0], []).append(parsed[1])
        return out

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._by_modality)

    def levels(self, modality: str) -> int:
        return len(self._ranges(modality))

    def _ranges(self, modality: str) -> list[CodeRange]:
        if modality not in self._by_modality:
            raise OmnitokError(f"vocabulary has no {modality!r} codebook; it has {list(self._by_modality)}")
        return self._by_modality[modality]

    def code_range(self, modality: str, level: int = 0) -> CodeRange:
        ranges = self._ranges(modality)
        if not 0 <= level < len(ranges):
            raise OmnitokError(f"vocabulary: {modality} has levels 0..{len(ranges) - 1}, got {level}")
        return ranges[level]

    def kind(self, token_id: int) -> str:
        """'text', 'special' or the modality name of a global id."""
        i = int(token_id)
        if 0 <= i < self.text_size:
            return "text"
        if i in self._special_names:
            return "special"
        for r in self.codebooks:
            if r.start <= i < r.stop:
                return r.modality
        raise OmnitokError(f"token id {i} is outside the vocabulary (size {self.size})")

    def codes_to_ids(self, modality: str, codes: Any) -> np.ndarray:
        """Local codes -> global ids. ``codes`` is [N] for one level or [N, levels] (flattened frame-major)."""
        arr = np.asarray(codes)
        ranges = self._ranges(modality)
        if arr.ndim == 1 and len(ranges) > 1:
            arr = arr.reshape(-1, len(ranges)) if arr.size % len(ranges) == 0 else arr
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2 or arr.shape[1] != len(ranges):
            raise OmnitokError(
                f"{modality} codes: expected shape [N] or [N, {len(ranges)}], got {list(np.shape(codes))}"
            )
        if not np.issubdtype(arr.dtype, np.integer):
            raise OmnitokError(f"{modality} codes: expected integers, got dtype {arr.dtype}")
        sizes = np.array([r.size for r in ranges])
        bad = (arr < 0) | (arr >= sizes)
        if bad.any():
            n, q = np.argwhere(bad)[0]
            raise OmnitokError(
                f"{modality} code {int(arr[n, q])} at position {int(n)} level {int(q)} "
                f"is out of range 0..{sizes[q] - 1}"
            )
        starts = np.array([r.start for r in ranges])
        return (arr + starts).reshape(-1).astype(np.int64)

    def ids_to_codes(self, modality: str, ids: Any) -> np.ndarray:
        """Global ids -> local codes, [N] for one level or [N, levels]; ids must follow the level cycle."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        ranges = self._ranges(modality)
        q = len(ranges)
        if arr.size % q:
            raise OmnitokError(f"{modality} ids: {arr.size} is not a multiple of its {q} levels")
        grid = arr.reshape(-1, q)
        starts = np.array([r.start for r in ranges])
        sizes = np.array([r.size for r in ranges])
        local = grid - starts
        bad = (local < 0) | (local >= sizes)
        if bad.any():
            n, lvl = np.argwhere(bad)[0]
            raise OmnitokError(f"id {int(grid[n, lvl])} at frame {int(n)} is not a {modality} level-{int(lvl)} code")
        return local[:, 0] if q == 1 else local

    def allowed_ids(self, modality: str, level: int | None = None) -> np.ndarray:
        """Every global id of a modality (or one level), e.g. for constrained decoding masks."""
        ranges = self._ranges(modality) if level is None else [self.code_range(modality, level)]
        return np.concatenate([np.arange(r.start, r.stop) for r in ranges])

    # --- persistence --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "size": self.size,
            "text_size": self.text_size,
            "specials": [n for n, _ in sorted(self.specials.items(), key=lambda kv: kv[1])],
            "codebooks": [
                {"modality": r.modality, "level": r.level, "start": r.start, "size": r.size} for r in self.codebooks
            ],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str = "vocab.json") -> Vocabulary:
        check_format(d, FORMAT, VERSION, source)
        try:
            ranges = [
                CodeRange(c["modality"], int(c["level"]), int(c["start"]), int(c["size"])) for c in d["codebooks"]
            ]
            vocab = cls(int(d["text_size"]), list(d["specials"]), ranges)
        except KeyError as e:
            raise OmnitokError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise OmnitokError(f"{source}: a field has the wrong type ({e})") from e
        size = d.get("size", vocab.size)
        if not is_int(size):
            raise OmnitokError(f"{source}: field 'size' should be an integer, got {size!r}")
        if vocab.size != size:
            raise OmnitokError(f"{source}: field 'size' is {d['size']} but the ranges add up to {vocab.size}")
        return vocab

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
        p = Path(path)
        if p.is_dir():
            p = p / "vocab.json"
        return cls.from_json(read_json(p, "vocabulary"), str(p))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        parts = [f"text={self.text_size}", f"specials={len(self.specials)}"]
        parts += [f"{m}={'+'.join(str(r.size) for r in rs)}" for m, rs in self._by_modality.items()]
        return f"Vocabulary(size={self.size}, {', '.join(parts)})"
