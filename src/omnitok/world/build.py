"""Writes the toy world to disk: WebDataset tar shards per split and kind, plus ``manifest.json``.

Reproducibility is structural: sample ``i`` of (split, kind) draws from its own generator seeded with
``(seed, split, kind, i)``, so the bytes of a shard do not depend on how many workers built it, in which
order, or whether the build was interrupted and resumed. Each shard is written under a temporary name and
renamed when complete; the manifest (with every shard's sha256) is written last.
"""

from __future__ import annotations

import hashlib
import io
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from omnitok.errors import OmnitokError
from omnitok.io import atomic_path, atomic_write_json, ensure_writable_dir, read_json, write_run_config
from omnitok.world import language, tasks, video
from omnitok.world.scene import (
    BACKGROUND,
    CELL_CENTERS,
    COLORS,
    IMAGE_SIZE,
    PALETTE,
    SHAPES,
    SIZES,
    Scene,
    occlusions,
    render,
    render_image,
    sample_scene,
    scene_to_json,
)

GENERATOR_VERSION = "1.0"
SPLITS = ("train", "val", "test")
KINDS = ("scene", "video", "construction", "edit", "spoken_qa", "caption_filter")
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("green", "square"),
    ("blue", "triangle"),
    ("yellow", "circle"),
)
DEFAULT_KIND_RATIOS: dict[str, float] = {
    "scene": 1.0,
    "video": 0.25,
    "construction": 0.125,
    "edit": 0.25,
    "spoken_qa": 0.25,
    "caption_filter": 0.25,
}


# One British male and one RP female: unseen speakers whose clean speech pocketsphinx still reads well
# (WER 0.09 / 0.05), so held-out TTS and ASR scores measure the model, not the instrument's ceiling.
DEFAULT_HELDOUT_VOICES = ("gb_m2", "rp_f5")


def _default_heldout_voices() -> tuple[str, ...]:
    return DEFAULT_HELDOUT_VOICES


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a world's bytes (and nothing that does not, like worker count)."""

    n: int = 10_000  # scene samples over all splits; other kinds scale with `kind_ratios`
    seed: int = 0
    speech: bool = True
    # Share of scene samples that are also spoken. Speech costs ~3x a scene to build and far more to tokenize, and
    # image tasks can use many more distinct scenes than speech tasks need utterances once a run is long enough to
    # memorise a small world (a probe on 32k scenes kept improving where one on 6k had peaked; the CPU-size LM run
    # is not yet there: docs/BENCHMARKS.md), so a large world can speak only some of its scenes.
    speech_fraction: float = 1.0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    kind_ratios: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_RATIOS))
    captions_per_scene: int = 3
    caption_error_rate: float = 0.3
    heldout_combo_rate: float = 0.3  # val/test: share of samples forced to show a held-out pair
    heldout_voice_rate: float = 0.4  # test: share of utterances spoken by held-out voices
    heldout_voices: tuple[str, ...] = ()  # empty: DEFAULT_HELDOUT_VOICES
    samples_per_shard: int = 500

    def validate(self) -> None:
        if self.n < 1:
            raise OmnitokError(f"--n must be a positive number of scene samples, got {self.n}")
        if self.seed < 0:
            raise OmnitokError(f"--seed must be >= 0, got {self.seed}")
        if self.samples_per_shard < 1:
            raise OmnitokError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise OmnitokError(f"split_fractions must be >= 0 and sum to 1, got {self.split_fractions}")
        unknown = set(self.kind_ratios) - set(KINDS)
        if unknown:
            raise OmnitokError(f"kind_ratios has unknown kinds {sorted(unknown)}; known: {list(KINDS)}")
        for name in ("caption_error_rate", "heldout_combo_rate", "heldout_voice_rate", "speech_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise OmnitokError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.speech:
            from omnitok.world.speech import VOICES

            names = {v.name for v in VOICES}
            bad = [v for v in self.heldout_voices if v not in names]
            if bad:
                raise OmnitokError(f"heldout_voices {bad} are not voices; known: {sorted(names)}")
            if len(names - set(self.heldout_voices)) == 0:
                raise OmnitokError("heldout_voices leaves no voice for training")

    def counts(self) -> dict[str, dict[str, int]]:
        """Samples per split and kind (train takes the rounding remainder)."""
        out: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
        for kind in KINDS:
            total = round(self.n * self.kind_ratios.get(kind, 0.0))
            val = round(total * self.split_fractions[1])
            test = round(total * self.split_fractions[2])
            out["train"][kind], out["val"][kind], out["test"][kind] = total - val - test, val, test
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["split_fractions"] = list(self.split_fractions)
        d["heldout_voices"] = list(self.heldout_voices)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> WorldConfig:
        d = dict(d)
        d["split_fractions"] = tuple(d["split_fractions"])
        d["heldout_voices"] = tuple(d["heldout_voices"])
        return WorldConfig(**d)


# --- encoding -----------------------------------------------------------------------------------------


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    import json

    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# --- per-sample generation ----------------------------------------------------------------------------

_SPEAKER = None  # one eSpeak instance per worker process (the C library keeps global state)


def _speaker():
    global _SPEAKER
    if _SPEAKER is None:
        from omnitok.world.speech import Speaker

        _SPEAKER = Speaker()
    return _SPEAKER


@dataclass
class _Context:
    cfg: WorldConfig
    split: str
    rng: np.random.Generator

    @property
    def forbidden(self) -> frozenset[tuple[str, str]]:
        return frozenset(HELDOUT_COMBOS) if self.split == "train" else frozenset()

    def scene(self, **kw: Any) -> Scene:
        require = None
        if self.split != "train" and self.rng.random() < self.cfg.heldout_combo_rate:
            require = HELDOUT_COMBOS[int(self.rng.integers(len(HELDOUT_COMBOS)))]
        return sample_scene(self.rng, forbidden=self.forbidden, require=require, **kw)

    def speak(self, text: str) -> tuple[bytes, dict[str, Any]]:
        from omnitok.world.speech import PITCHES, RATES, SAMPLE_RATE, VOICES, Style, encode_wav

        held = [v.name for v in VOICES if v.name in self.cfg.heldout_voices]
        seen = [v.name for v in VOICES if v.name not in self.cfg.heldout_voices]
        use_held = self.split == "test" and self.rng.random() < self.cfg.heldout_voice_rate
        pool = held if use_held else seen
        style = Style(
            voice=pool[int(self.rng.integers(len(pool)))],
            pitch=tuple(PITCHES)[int(self.rng.integers(len(PITCHES)))],
            rate=tuple(RATES)[int(self.rng.integers(len(RATES)))],
        )
        audio, onsets = _speaker().synthesize_timed(text, style)
        record = {
            "text": text,
            "voice": style.voice,
            "pitch": style.pitch,
            "rate": style.rate,
            "phonemes": _speaker().phonemes(text, style),
            "heldout_voice": use_held,
            "sample_rate": SAMPLE_RATE,
            "num_samples": len(audio),
            "word_onsets": onsets,  # sample where each white-space word of the text starts (eSpeak's word events)
        }
        return encode_wav(audio, SAMPLE_RATE), record


def _heldout(*scenes: Scene) -> bool:
    return any((o.color, o.shape) in HELDOUT_COMBOS for s in scenes for o in s)


def _make_scene(ctx: _Context) -> tuple[dict[str, bytes], dict[str, Any]]:
    scene = ctx.scene()
    r = render(scene)
    caps = language.captions(scene, ctx.rng, ctx.cfg.captions_per_scene)
    files = {"png": encode_png(r.image), "mask.png": encode_png(r.instance), "depth.png": encode_png(r.depth)}
    meta: dict[str, Any] = {
        "scene": scene_to_json(scene),
        "captions": caps,
        "occlusions": [list(p) for p in occlusions(scene)],
        "heldout_combo": _heldout(scene),
    }
    # Fraction 1 draws nothing extra, so worlds built before speech_fraction existed keep their bytes.
    spoken = ctx.cfg.speech and (ctx.cfg.speech_fraction >= 1.0 or ctx.rng.random() < ctx.cfg.speech_fraction)
    if spoken:
        files["wav"], meta["speech"] = ctx.speak(caps[int(ctx.rng.integers(len(caps)))])
    return files, meta


def _make_video(ctx: _Context) -> tuple[dict[str, bytes], dict[str, Any]]:
    frames, event = video.sample_clip(ctx.rng, ctx.forbidden)
    strip = np.concatenate([render_image(f) for f in frames], axis=1)  # frames side by side
    meta = {
        "n_frames": len(frames),
        "frames": [scene_to_json(f) for f in frames],
        "event": event,
        "caption": video.event_caption(event),
        "heldout_combo": _heldout(*frames),
    }
    return {"video.png": encode_png(strip)}, meta


def _make_construction(ctx: _Context) -> tuple[dict[str, bytes], dict[str, Any]]:
    scene = ctx.scene(occlusion_prob=0.0)
    steps = tasks.construction_steps(scene, ctx.rng)
    files: dict[str, bytes] = {}
    segments: list[dict[str, str]] = []
    for k, (text, partial) in enumerate(steps):
        files[f"step{k}.png"] = encode_png(render_image(partial))
        segments += [{"type": "text", "text": text}, {"type": "image", "file": f"step{k}.png"}]
    meta = {"scene": scene_to_json(scene), "segments": segments, "heldout_combo": _heldout(scene)}
    return files, meta


def _make_edit(ctx: _Context) -> tuple[dict[str, bytes], dict[str, Any]]:
    scene = ctx.scene()
    instruction, edited, record = tasks.sample_edit(scene, ctx.rng, ctx.forbidden)
    files = {"png": encode_png(render_image(scene)), "edited.png": encode_png(render_image(edited))}
    meta = {
        "scene": scene_to_json(scene),
        "instruction": instruction,
        "edit": record,
        "edited_scene": scene_to_json(edited),
        "heldout_combo": _heldout(scene, edited),
    }
    return files, meta


def _make_spoken_qa(ctx: _Context) -> tuple[dict[str, bytes], dict[str, Any]]:
    scene = ctx.scene()
    question, answer, qtype = language.question_answer(scene, ctx.rng, ctx.forbidden)
    files = {"png": encode_png(render_image(scene))}
    meta: dict[str, Any] = {
        "scene": scene_to_json(scene),
        "question": question,
        "answer": answer,
        "question_type": qtype,
        "heldout_combo": _heldout(scene),
    }
    if ctx.cfg.speech:
        files["question.wav"], meta["question_speech"] = ctx.speak(question)
        files["answer.wav"], meta["answer_speech"] = ctx.speak(answer)
    return files, meta


def _make_caption_filter(ctx: _Context) -> tuple[dict[str, bytes], dict[str, Any]]:
    scene = ctx.scene()
    correct = bool(ctx.rng.random() >= ctx.cfg.caption_error_rate)
    error = None
    described = scene
    if not correct:
        described, error = language.corrupt_scene(scene, ctx.rng, ctx.forbidden)
    meta = {
        "scene": scene_to_json(scene),
        "caption": language.caption(described, ctx.rng),
        "correct": correct,
        "error": error,
        "heldout_combo": _heldout(scene),
    }
    return {"png": encode_png(render_image(scene))}, meta


BUILDERS: dict[str, Callable[[_Context], tuple[dict[str, bytes], dict[str, Any]]]] = {
    "scene": _make_scene,
    "video": _make_video,
    "construction": _make_construction,
    "edit": _make_edit,
    "spoken_qa": _make_spoken_qa,
    "caption_filter": _make_caption_filter,
}
_SPLIT_ID = {s: i for i, s in enumerate(SPLITS)}
_KIND_ID = {k: i for i, k in enumerate(KINDS)}


def make_sample(cfg: WorldConfig, split: str, kind: str, index: int) -> dict[str, Any]:
    """Sample ``index`` of (split, kind) as a WebDataset record: ``__key__`` plus extension -> bytes."""
    rng = np.random.default_rng([cfg.seed, _SPLIT_ID[split], _KIND_ID[kind], index])
    files, meta = BUILDERS[kind](_Context(cfg, split, rng))
    key = f"{kind}-{split}-{index:07d}"
    meta = {"key": key, "kind": kind, "split": split, "generator_version": GENERATOR_VERSION, **meta}
    return {"__key__": key, **files, "json": _json_bytes(meta)}


# --- sharding -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardTask:
    split: str
    kind: str
    shard: int
    start: int
    stop: int

    @property
    def relpath(self) -> str:
        return f"{self.split}/{self.kind}-{self.shard:05d}.tar"


def plan_shards(cfg: WorldConfig) -> list[ShardTask]:
    plan = []
    for split, per_kind in cfg.counts().items():
        for kind, count in per_kind.items():
            for s in range(math.ceil(count / cfg.samples_per_shard)):
                start = s * cfg.samples_per_shard
                plan.append(ShardTask(split, kind, s, start, min(count, start + cfg.samples_per_shard)))
    return plan


def write_shard(cfg: WorldConfig, task: ShardTask, out: Path) -> int:
    """Write one complete shard atomically; returns its sample count."""
    final = out / task.relpath
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        writer = wds.TarWriter(f, user="omnitok", group="omnitok", mode=0o444, encoder=False, mtime=0.0)
        try:
            for i in range(task.start, task.stop):
                writer.write(make_sample(cfg, task.split, task.kind, i))
        finally:
            writer.close()  # on failure the temporary file is discarded by atomic_path
    return task.stop - task.start


def _worker(args: tuple[WorldConfig, ShardTask, str]) -> tuple[ShardTask, int]:
    cfg, task, out = args
    return task, write_shard(cfg, task, Path(out))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_existing(out: Path, cfg: WorldConfig, overwrite: bool) -> None:
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        stray = sorted(out.glob("*/*.tar"))
        if stray and not overwrite:
            raise OmnitokError(f"{out} already holds shards but no config.json; use an empty --out or --overwrite")
        return
    # Fields added since an old world was built read as their defaults, so it still resumes.
    old = {**WorldConfig().to_json(), **read_json(cfg_path, "world config").get("config", {})}
    new = cfg.to_json()
    if old == new:
        return
    if not overwrite:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise OmnitokError(
            f"{out} holds a world built with different settings ({', '.join(diff)}); "
            "use another --out or pass --overwrite"
        )
    for p in out.glob("*/*.tar"):
        p.unlink()
    (out / "manifest.json").unlink(missing_ok=True)


def check_speech_available() -> None:
    """Fail before any work if eSpeak NG cannot be loaded (the one line a user needs to fix it)."""
    from omnitok.world.speech import Speaker

    Speaker()


def build_world(
    out: str | os.PathLike[str],
    cfg: WorldConfig,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Build (or finish building) a world in ``out``; returns the manifest.

    Shards already present from an interrupted build with the same config are kept (they are complete by
    construction) and only missing ones are written.
    """
    if cfg.speech and not cfg.heldout_voices:
        cfg = replace(cfg, heldout_voices=_default_heldout_voices())
    cfg.validate()
    out_dir = ensure_writable_dir(out, "world output directory")
    if cfg.speech:
        check_speech_available()
    _check_existing(out_dir, cfg, overwrite)
    write_run_config(out_dir, "omnitok world build", cfg.to_json())
    plan = plan_shards(cfg)
    todo = [t for t in plan if not (out_dir / t.relpath).exists()]
    total = sum(t.stop - t.start for t in plan)
    done = total - sum(t.stop - t.start for t in todo)
    if progress:
        progress(done, total)
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    t0 = time.perf_counter()
    args = [(cfg, t, str(out_dir)) for t in todo]
    results: Iterable[tuple[ShardTask, int]]
    if workers == 1:
        results = map(_worker, args)
        for _, n in results:
            done += n
            if progress:
                progress(done, total)
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            for _, n in pool.imap_unordered(_worker, args):
                done += n
                if progress:
                    progress(done, total)
    seconds = time.perf_counter() - t0
    manifest = make_manifest(out_dir, cfg, plan)
    atomic_write_json(out_dir / "manifest.json", manifest)
    manifest["_build_seconds"] = seconds
    manifest["_built_samples"] = sum(t.stop - t.start for t in todo)
    return manifest


def make_manifest(out: Path, cfg: WorldConfig, plan: list[ShardTask]) -> dict[str, Any]:
    shards: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for t in plan:
        shards[t.split].append(
            {"path": t.relpath, "kind": t.kind, "count": t.stop - t.start, "sha256": _sha256(out / t.relpath)}
        )
    vocab: dict[str, Any] = {
        "colors": {c: list(PALETTE[c]) for c in COLORS},
        "shapes": list(SHAPES),
        "sizes": dict(SIZES),
        "background": list(BACKGROUND),
        "image_size": IMAGE_SIZE,
        "cell_centers": list(CELL_CENTERS),
    }
    if cfg.speech:
        from omnitok.world.speech import PITCHES, RATES, SAMPLE_RATE, VOICES

        vocab["voices"] = [asdict(v) for v in VOICES]
        vocab["pitches"] = dict(PITCHES)
        vocab["rates"] = dict(RATES)
        vocab["sample_rate"] = SAMPLE_RATE
    return {
        "format": "omnitok-world",
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "config": cfg.to_json(),
        "counts": cfg.counts(),
        "heldout": {
            "combos": [list(c) for c in HELDOUT_COMBOS],
            "voices": list(cfg.heldout_voices) if cfg.speech else [],
        },
        "caption_error_rate": cfg.caption_error_rate,
        "world": vocab,
        "shards": shards,
    }
