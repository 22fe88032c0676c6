"""Training recipes: YAML in, checked dataclasses out, every mistake named by its field before any work starts.

A recipe is data. Everything a run depends on is in it (plus the token directory it names), so the resolved
recipe written to ``out/config.json`` and its hash in every checkpoint say exactly what produced a model.

Checking happens in two steps, both before the model is built: :func:`load_recipe` checks the YAML's shape
(unknown keys, types, ranges, mixture weights); :func:`check_data` checks it against the token directory
(the data exist, every mixture task is in the train split, vocabulary sizes agree).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from omnitok.data.shards import TokenDataset, load_manifest, read_vocab_size
from omnitok.data.tasks import TASKS
from omnitok.errors import OmnitokError, is_int, is_number
from omnitok.model import check_model_spec

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "muon")
TRAINABLE = ("all", "new_embeddings")
CODE_EMBEDDINGS = ("random", "codec")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("ddp", "fsdp")
ATTENTIONS = ("auto", "packed", "mask")


@dataclass(frozen=True)
class BatchConfig:
    seq_len: int
    micro_batch: int  # rows per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer with warmup then decay, restarted for every stage (see the loop's docstring)."""

    lr: float
    # "muon": Muon (torch's momentum 0.95, Nesterov) for the decoder's hidden matrices, AdamW with ``betas`` for
    # the rest (loop._optimizers)
    name: str = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # final lr as a fraction of lr (cosine and linear)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # optimizer steps between checkpoints; 0: only at the end of each stage
    keep: int = 2  # newest checkpoints kept


@dataclass(frozen=True)
class ValidationConfig:
    """Held-out loss per task: the curve that says which task is learning, which the summed train loss hides."""

    every: int = 0  # optimizer steps between validations; 0: only at the end of each stage (or of the run)
    docs: int = 64  # first documents of each task's split; 0 turns validation off
    split: str = "val"
    # Validate at the end of every stage (the per-stage curve), or only at the end of the last one: the demo's
    # time-boxed LM on a slow CPU spent ~10 s on each, ~30 s of its ~280 s in the three before the last.
    stage_ends: bool = True


@dataclass(frozen=True)
class LogConfig:
    every: int = 10
    tensorboard: bool = True


@dataclass(frozen=True)
class DistributedConfig:
    strategy: str = "ddp"  # "fsdp": FSDP2 (fully_shard) per decoder layer; GPU only


@dataclass(frozen=True)
class StageConfig:
    """One curriculum stage; any ``None`` field falls back to the recipe-wide ``batch``/``optim`` value."""

    name: str
    steps: int
    mixture: dict[str, float]
    trainable: str = "all"
    seq_len: int | None = None
    micro_batch: int | None = None
    grad_accum: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    schedule: str | None = None
    min_lr_ratio: float | None = None
    weight_decay: float | None = None

    def batch(self, base: BatchConfig) -> BatchConfig:
        return BatchConfig(
            seq_len=self.seq_len or base.seq_len,
            micro_batch=self.micro_batch or base.micro_batch,
            grad_accum=self.grad_accum or base.grad_accum,
        )

    def optim(self, base: OptimConfig) -> OptimConfig:
        overrides = {
            k: getattr(self, k)
            for k in ("lr", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay")
            if getattr(self, k) is not None
        }
        return dataclasses.replace(base, **overrides)


@dataclass(frozen=True)
class Recipe:
    name: str
    data: Path  # token directory (relative paths: to the current directory)
    out: Path
    model: dict[str, Any]
    batch: BatchConfig
    optim: OptimConfig
    stages: list[StageConfig]
    seed: int = 0
    split: str = "train"
    precision: str = "auto"  # auto: bf16 autocast on a bf16 GPU or a CPU with AMX/AVX512-BF16
    # How packed documents are kept apart in a non-flash model: auto = packed (per document) on a CPU, else mask
    attention: str = "auto"
    # "codec": codebook embedding rows start with a projection of the tokenizers' code vectors (model.py)
    code_embeddings: str = "random"
    device: str = "auto"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def tasks(self) -> list[str]:
        return sorted({t for s in self.stages for t in s.mixture})

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, tuple):
                return list(v)
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v

        return plain(dataclasses.asdict(self))

    def identity(self) -> dict[str, Any]:
        """What is trained: everything but where it is written and how it is logged."""
        d = self.to_dict()
        for k in ("out", "log", "checkpoint"):
            d.pop(k)
        return d

    def hash(self) -> str:
        """A short fingerprint of ``identity()``: what a checkpoint records to tell a resumed run it changed."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


def recipe_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two ``Recipe.identity()`` dicts (dotted keys).

    A resumed run says what changed rather than only that something did: a run re-planned by
    ``omnitok.train.budget`` changes its stages' steps, a changed learning rate or mixture is worth seeing.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if k not in old or k not in new:
                out.append(f"{prefix}{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}")
            else:
                out += recipe_changes(old[k], new[k], f"{prefix}{k}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new, strict=True)) for c in recipe_changes(a, b, f"{prefix}{i}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old} -> {new}"]


# --- parsing -------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; the only conversions are the unambiguous ones."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if is_int(value):
            return value
    elif tp is float:
        # YAML 1.1 reads "3e-3" as a string; accept any finite number written either way.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if is_number(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str) and value:
            return value
    elif tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
    elif origin is tuple:
        if isinstance(value, list | tuple) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {_coerce(k, args[0], f"{where} key"): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    else:  # pragma: no cover - a field type this parser does not know is a bug here, not in the recipe
        raise TypeError(f"unsupported recipe field type {tp!r}")
    raise OmnitokError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _parse_dataclass(cls: Any, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise OmnitokError(f"{where or 'recipe'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in fields:
            raise OmnitokError(f"{prefix}{key}: unknown key; expected one of {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise OmnitokError(f"{prefix}{name}: required")
    return cls(**kwargs)


def _choice(value: str | None, options: tuple[str, ...], where: str) -> None:
    if value is not None and value not in options:
        raise OmnitokError(f"{where}: expected one of {list(options)}, got {value!r}")


def _positive(value: int | float | None, where: str, zero_ok: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not zero_ok)):
        raise OmnitokError(f"{where}: must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def _check(recipe: Recipe) -> None:
    check_model_spec(recipe.model, "model")
    b, o = recipe.batch, recipe.optim
    for k in ("seq_len", "micro_batch", "grad_accum"):
        _positive(getattr(b, k), f"batch.{k}")
    _positive(o.lr, "optim.lr")
    _positive(o.weight_decay, "optim.weight_decay", zero_ok=True)
    _positive(o.grad_clip, "optim.grad_clip", zero_ok=True)
    _positive(o.warmup_steps, "optim.warmup_steps", zero_ok=True)
    _choice(o.schedule, SCHEDULES, "optim.schedule")
    _choice(o.name, OPTIMIZERS, "optim.name")
    if not 0 <= o.min_lr_ratio <= 1:
        raise OmnitokError(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    if not all(0 <= x < 1 for x in o.betas):
        raise OmnitokError(f"optim.betas: each must be in [0, 1), got {list(o.betas)}")
    _choice(recipe.precision, PRECISIONS, "precision")
    _choice(recipe.attention, ATTENTIONS, "attention")
    _choice(recipe.code_embeddings, CODE_EMBEDDINGS, "code_embeddings")
    _choice(recipe.device, DEVICES, "device")
    _choice(recipe.distributed.strategy, STRATEGIES, "distributed.strategy")
    if o.name == "muon" and recipe.distributed.strategy == "fsdp":
        # Muon orthogonalises whole matrices; FSDP gives each rank a shard of each.
        raise OmnitokError("optim.name: 'muon' needs whole weight matrices on each rank; use distributed.strategy ddp")
    _positive(recipe.checkpoint.every, "checkpoint.every", zero_ok=True)
    _positive(recipe.checkpoint.keep, "checkpoint.keep")
    _positive(recipe.log.every, "log.every")
    _positive(recipe.validation.every, "validation.every", zero_ok=True)
    _positive(recipe.validation.docs, "validation.docs", zero_ok=True)
    if not recipe.stages:
        raise OmnitokError("stages: at least one stage is required")
    names = [s.name for s in recipe.stages]
    for i, s in enumerate(recipe.stages):
        at = f"stages[{i}]"
        if names.index(s.name) != i:
            raise OmnitokError(f"{at}.name: {s.name!r} is used by more than one stage")
        _positive(s.steps, f"{at}.steps")
        for k in ("seq_len", "micro_batch", "grad_accum", "lr"):
            _positive(getattr(s, k), f"{at}.{k}")
        _positive(s.warmup_steps, f"{at}.warmup_steps", zero_ok=True)
        _positive(s.weight_decay, f"{at}.weight_decay", zero_ok=True)
        _choice(s.schedule, SCHEDULES, f"{at}.schedule")
        _choice(s.trainable, TRAINABLE, f"{at}.trainable")
        if s.min_lr_ratio is not None and not 0 <= s.min_lr_ratio <= 1:
            raise OmnitokError(f"{at}.min_lr_ratio: must be in [0, 1], got {s.min_lr_ratio}")
        if s.trainable == "new_embeddings" and "pretrained" not in recipe.model:
            raise OmnitokError(
                f"{at}.trainable: new_embeddings needs model.pretrained (a model built from scratch has no old rows)"
            )
        if not s.mixture:
            raise OmnitokError(f"{at}.mixture: at least one task is required")
        for task, w in s.mixture.items():
            if w < 0:
                raise OmnitokError(f"{at}.mixture.{task}: weight must be >= 0, got {w}")
        total = sum(s.mixture.values())
        if abs(total - 1.0) > 1e-6:
            raise OmnitokError(f"{at}.mixture: weights must sum to 1, got {total:g}")


def parse_recipe(raw: Any, source: str = "recipe") -> Recipe:
    """A recipe from an already-loaded mapping (what :func:`load_recipe` does after reading the YAML)."""
    if not isinstance(raw, dict):
        raise OmnitokError(f"{source}: expected a YAML mapping at the top level, got {type(raw).__name__}")
    recipe = _parse_dataclass(Recipe, raw, "")
    _check(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Read and check a YAML recipe. ``overrides`` replace top-level keys (the CLI's ``--out``, ``--data``).

    A recipe may start from another: ``base: toyworld.yaml`` (relative to the recipe's own folder) reads that one
    first and lays this one's keys over it, mappings merged key by key and everything else (a list of stages, a
    number) replaced. So a variant states only what it changes, and a fix to the curriculum reaches both.
    """
    raw = recipe_mapping(path)
    if isinstance(raw, dict) and overrides:
        raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return parse_recipe(raw, str(path))
    except OmnitokError as e:
        raise OmnitokError(f"recipe {path}: {e}") from e


def recipe_mapping(path: str | Path) -> Any:
    """The recipe's YAML as read, its ``base:`` chain merged in, not yet checked: for a tool that edits a recipe
    before parsing it (a benchmark's arms), which would otherwise see only what a variant changes."""
    return _read_recipe_yaml(Path(path), ())


def _read_recipe_yaml(p: Path, chain: tuple[Path, ...]) -> Any:
    """The recipe's YAML with its ``base:`` chain merged in (``chain``: the recipes that named this one)."""
    if not p.is_file():
        via = f" (the base of {chain[-1]})" if chain else ""
        raise OmnitokError(f"recipe {p} not found{via}")
    if p.resolve() in chain:
        names = " -> ".join(str(c) for c in (*chain, p.resolve()))
        raise OmnitokError(f"recipe {chain[0]}: its base: chain comes back to {p} ({names})")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise OmnitokError(f"recipe {p} is not valid YAML: {e}") from e
    if not isinstance(raw, dict) or "base" not in raw:
        return raw
    raw = dict(raw)
    base = raw.pop("base")
    if not isinstance(base, str) or not base:
        raise OmnitokError(f"recipe {p}: base: expected the path of another recipe, got {base!r}")
    under = _read_recipe_yaml(p.parent / base, (*chain, p.resolve()))
    if not isinstance(under, dict):
        raise OmnitokError(f"recipe {p}: its base {p.parent / base} is not a YAML mapping")
    return _merged(under, raw)


def _merged(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(under)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_data(recipe: Recipe) -> int:
    """Check the recipe against its token directory; returns the vocabulary size."""
    if recipe.data.is_file():
        raise OmnitokError(f"data: {recipe.data} is a file; give the token directory omnitok pretokenize wrote")
    if not recipe.data.is_dir():
        raise OmnitokError(f"data: token directory {recipe.data} does not exist")
    try:
        manifest = load_manifest(recipe.data)
        vocab_size = read_vocab_size(recipe.data)
    except OmnitokError as e:
        raise OmnitokError(f"data: {e}") from e
    if manifest["vocab_size"] != vocab_size:
        raise OmnitokError(
            f"data: {recipe.data}/manifest.json says vocab_size {manifest['vocab_size']} but vocab.json says "
            f"{vocab_size}; re-run pretokenize"
        )
    if recipe.split not in manifest["splits"]:
        raise OmnitokError(f"split: {recipe.data} has no split {recipe.split!r}; has {sorted(manifest['splits'])}")
    available = manifest["splits"][recipe.split]
    checked: dict[tuple[str, int], int] = {}  # (task, seq_len) -> the first stage that trains it so
    for i, s in enumerate(recipe.stages):
        for task in s.mixture:
            if task not in available:
                if task in TASKS:  # a task added since these shards were written (vqa, say)
                    raise OmnitokError(
                        f"stages[{i}].mixture.{task}: {recipe.data} split {recipe.split!r} has no {task!r} documents "
                        f"(has {sorted(available)}): written before the task existed; run omnitok pretokenize again"
                    )
                raise OmnitokError(
                    f"stages[{i}].mixture.{task}: unknown task; {recipe.data} split {recipe.split!r} has "
                    f"{sorted(available)}"
                )
            if available[task]["docs"] == 0 and s.mixture[task] > 0:
                raise OmnitokError(f"stages[{i}].mixture.{task}: task has no documents in {recipe.data}")
            if s.mixture[task] > 0:
                checked.setdefault((task, s.batch(recipe.batch).seq_len), i)
    for (task, _), i in checked.items():  # once per task and row length, not once per stage that mixes it in
        _check_targets_fit(recipe, i, task)
    return vocab_size


def _check_targets_fit(recipe: Recipe, stage: int, task: str, sample: int = 64) -> None:
    """Refuse a ``seq_len`` that cuts most of a task's documents before their first target.

    Why: a document longer than a row is cut at ``seq_len``; when the answer starts later, the row trains on
    nothing, and a run of such rows logs loss 0.0 and finishes as if it had learned.
    """
    seq_len = recipe.stages[stage].batch(recipe.batch).seq_len
    ds = TokenDataset(recipe.data, recipe.split, task)
    firsts = []
    for k in range(min(sample, len(ds))):
        mask = np.asarray(ds[k][1])
        firsts.append(int(mask.argmax()) if mask.any() else len(mask))
    if firsts and sum(f >= seq_len for f in firsts) > len(firsts) // 2:
        raise OmnitokError(
            f"stages[{stage}]: batch.seq_len {seq_len} cuts most {task} documents before their first target "
            f"(median first target at position {int(np.median(firsts))} in the first {len(firsts)}); raise seq_len"
        )
