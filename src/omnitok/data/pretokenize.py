"""World samples -> token shards, once, before training.

Tokenizing media is the expensive part of the pipeline (an image encoder pass per picture, a speech
encoder pass per clip), so it happens once and training reads memory-mapped ids. Work is split by rank
(``RANK``/``WORLD_SIZE`` as set by ``torchrun``): rank r takes world samples r, r+W, r+2W … and writes its own
shard per (split, task), so a cluster tokenizes in parallel and the result does not depend on W. A shard
that exists is complete (the writer renames it into place), so rerunning the command resumes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from omnitok.data import tasks as task_defs
from omnitok.errors import OmnitokError, is_int
from omnitok.io import ensure_writable_dir, read_json, write_run_config
from omnitok.sequence import READ_ALOUD_WORDS, MediaEncoder, Segment, Text, encode
from omnitok.tokenizers.text import TextTokenizer
from omnitok.vocab import Vocabulary
from omnitok.world.read import decode_sample, iter_samples, load_manifest

TEXT_TOKENIZER_DIR = "text_tokenizer"


def _dist_env(rank: int | None, world_size: int | None) -> tuple[int, int]:
    r = int(os.environ.get("RANK", 0)) if rank is None else rank
    w = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= r < w:
        raise OmnitokError(f"rank {r} is outside world size {w}")
    return r, w


def _barrier(world_size: int) -> None:
    """Synchronise ranks under torchrun; ranks run by hand (explicit rank/world_size) coordinate themselves."""
    if world_size > 1 and "MASTER_ADDR" in os.environ:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()


def resolve_tasks(requested: Sequence[str] | None, have_speech: bool) -> list[str]:
    names = list(requested) if requested else list(task_defs.TASKS)
    unknown = [t for t in names if t not in task_defs.TASKS]
    if unknown:
        raise OmnitokError(f"--tasks: unknown task(s) {unknown}; known: {list(task_defs.TASKS)}")
    if not have_speech:
        need = [t for t in names if t in task_defs.SPEECH_TASKS]
        if requested and need:
            raise OmnitokError(f"--tasks {need} need speech codes: pass --speech-tokenizer")
        names = [t for t in names if t not in task_defs.SPEECH_TASKS]
    return names


def world_texts(world: Path, task_names: Sequence[str], seed: int) -> Iterable[str]:
    """Every text segment the tasks produce on the train split (the BPE's training corpus)."""
    for kind, tasks in _by_kind(task_names).items():
        for s in iter_samples(world, "train", kind):
            for task in tasks:
                for sample in task_defs.TASKS[task][1](s, task_defs.sample_rng(seed, s["key"], task)):
                    yield from (seg.text for seg in sample if isinstance(seg, Text))


def _by_kind(task_names: Sequence[str]) -> dict[str, list[str]]:
    """Tasks grouped by the world kind they read, so each sample is decoded once for all its tasks."""
    out: dict[str, list[str]] = {}
    for t in task_names:
        out.setdefault(task_defs.TASKS[t][0], []).append(t)
    return out


def _encode_kind(
    world: Path,
    wm: dict[str, Any],
    split: str,
    kind: str,
    tasks: list[str],
    rank: int,
    world_size: int,
    seed: int,
    batch_size: int,
    media: MediaEncoder,
    vocab: Vocabulary,
    text_tok: TextTokenizer,
    report: Callable[[int, int], None] | None,
    read_aloud_words: int = 0,
) -> Iterable[tuple[str, Any]]:
    """(task, encoded document) for this rank's share of one world kind; media tokenized in batches."""
    total = wm["counts"][split][kind]
    batch: list[tuple[str, list[Segment]]] = []

    def flush() -> Iterable[tuple[str, Any]]:
        media([sample for _, sample in batch])
        for task, sample in batch:
            yield task, encode(sample, vocab, text_tok, task_defs.TASKS[task][2], read_aloud_words=read_aloud_words)
        batch.clear()

    for i, raw in enumerate(iter_samples(world, split, kind, decode=False)):
        if i % world_size != rank:
            continue  # other ranks' share: skip before paying for PNG/WAV decoding
        s = decode_sample(raw)
        for task in tasks:
            batch += [
                (task, sample) for sample in task_defs.TASKS[task][1](s, task_defs.sample_rng(seed, s["key"], task))
            ]
        if len(batch) >= batch_size:
            yield from flush()
        if report and i % 64 == 0:
            report(i, total)
    yield from flush()
    if report:
        report(total, total)


# What decides a document's tokens or which shard holds it: a rerun into the same --out must keep all of them, or
# the shards it finds finished (and skips) would mix with ones made another way.
_RESUME_KEYS = (
    "world",
    "image_tokenizer",
    "speech_tokenizer",
    "seed",
    "world_size",
    "read_aloud_words",
    "align_words",
    "caption_image_drop",
)
# what tokens made before a key was recorded were made with
_BEFORE_KEY = {"read_aloud_words": 0, "align_words": False, "caption_image_drop": 0.0}


def _check_resumable(out_dir: Path, config: dict[str, Any]) -> None:
    """Refuse to resume into ``out_dir`` when its ``config.json`` records other inputs than this run's."""
    path = out_dir / "config.json"
    if not path.exists():
        return
    before = read_json(path, "token directory config")
    old = before.get("config") if isinstance(before, dict) else None
    if not isinstance(old, dict) or before.get("command") != "omnitok pretokenize":
        raise OmnitokError(f"{out_dir} holds another command's output ({path}); give pretokenize a new --out")
    for key in _RESUME_KEYS:
        made = old.get(key, _BEFORE_KEY.get(key))
        if made != config[key]:
            raise OmnitokError(
                f"{out_dir} holds tokens made with {key} {made!r}, not {config[key]!r}: rerun with the same "
                "settings to resume, or give a new --out"
            )


def build_vocabulary(
    text_tok: TextTokenizer, image_tok: Any, speech_tok: Any | None, world_manifest: dict
) -> Vocabulary:
    codebooks: dict[str, int | list[int]] = {"image": int(image_tok.codebook_size)}
    styles: dict[str, list[str]] = {}
    if speech_tok is not None:
        sizes = getattr(speech_tok, "codebook_sizes", None)
        codebooks["speech"] = [int(s) for s in sizes] if sizes else int(speech_tok.codebook_size)
        w = world_manifest["world"]
        styles = {"voice": [v["name"] for v in w["voices"]], "pitch": list(w["pitches"]), "rate": list(w["rates"])}
    return Vocabulary.build(text_tok.vocab_size, codebooks, styles)


def pretokenize(
    world: str | os.PathLike[str],
    out: str | os.PathLike[str],
    image_tokenizer: str | os.PathLike[str],
    speech_tokenizer: str | os.PathLike[str] | None = None,
    text_tokenizer: str | os.PathLike[str] | None = None,
    tasks: Sequence[str] | None = None,
    splits: Sequence[str] = ("train", "val"),
    text_vocab_size: int = 1024,
    seed: int = 0,
    batch_size: int = 64,
    rank: int | None = None,
    world_size: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    read_aloud_words: int = READ_ALOUD_WORDS,
    align_words: bool = True,
) -> dict[str, Any]:
    """Tokenize ``splits`` of a built world into ``out``; returns the token manifest (rank 0) or {}.

    ``read_aloud_words``: the TTS task's clips are written with their words beside their speech, this many words a
    chunk (``omnitok.sequence``, read-aloud layout); 0 writes them as one span after the whole text. Recorded in
    ``config.json``, from where the trainer carries it into the bundle, so generation decodes in the layout the LM
    was trained on. ``align_words``: where the world did not record its clips' word onsets (a corpus of recorded
    speech, a world built before they were), the layout cuts each clip at its words as the speech tokenizer's phone
    CTC head aligns them (``omnitok.tokenizers.align``); False cuts such clips by characters."""
    from omnitok.data.shards import ShardWriter, write_manifest
    from omnitok.tokenizers.base import load_image_tokenizer

    world = Path(world)
    wm = load_manifest(world)
    rank, world_size = _dist_env(rank, world_size)
    if speech_tokenizer is not None and not wm.get("config", {}).get("speech", True):
        raise OmnitokError(f"--speech-tokenizer given, but the world {world} was built with --no-speech: drop the flag")
    for split in splits:
        if split not in wm["shards"]:
            raise OmnitokError(f"--splits: {split!r} is not a split of {world}; it has {sorted(wm['shards'])}")
    image_tok = load_image_tokenizer(image_tokenizer)
    speech_tok = None
    if speech_tokenizer is not None:
        from omnitok.tokenizers.speech import load_speech_tokenizer

        speech_tok = load_speech_tokenizer(speech_tokenizer)
    task_names = resolve_tasks(tasks, speech_tok is not None)
    if not is_int(read_aloud_words) or read_aloud_words < 0:
        raise OmnitokError(
            f"read_aloud_words must be an int >= 0 (0: one span after its text), got {read_aloud_words!r}"
        )
    out_dir = ensure_writable_dir(out, "token output directory")  # after the checks: a refused run leaves no folder
    config = {
        "world": str(world.resolve()),
        "image_tokenizer": str(Path(image_tokenizer).resolve()),
        "speech_tokenizer": None if speech_tokenizer is None else str(Path(speech_tokenizer).resolve()),
        "text_tokenizer": str((out_dir / TEXT_TOKENIZER_DIR).resolve()),
        "tasks": task_names,
        "splits": list(splits),
        "seed": seed,
        "world_size": world_size,
        "read_aloud_words": read_aloud_words,
        "align_words": bool(align_words),
        # the caption task's picture drop, which the bundle passes on: generation guides reading only where it was
        # trained (omnitok.generate, text_cfg_scale)
        "caption_image_drop": task_defs.CAPTION_IMAGE_DROP,
    }
    _check_resumable(out_dir, config)

    if rank == 0:
        if text_tokenizer is not None:
            text_tok = TextTokenizer.load(text_tokenizer)
        elif (out_dir / TEXT_TOKENIZER_DIR / "tokenizer.json").exists():
            text_tok = TextTokenizer.load(out_dir / TEXT_TOKENIZER_DIR)  # resuming
        else:
            text_tok = TextTokenizer.train(world_texts(world, task_names, seed), vocab_size=text_vocab_size)
        text_tok.save(out_dir / TEXT_TOKENIZER_DIR)
        vocab = build_vocabulary(text_tok, image_tok, speech_tok, wm)
        if (out_dir / "vocab.json").exists() and Vocabulary.load(out_dir) != vocab:
            raise OmnitokError(f"{out_dir}/vocab.json differs from the one these tokenizers give; use a new --out")
        vocab.save(out_dir / "vocab.json")
        write_run_config(out_dir, "omnitok pretokenize", config)
    _barrier(world_size)
    text_tok = TextTokenizer.load(out_dir / TEXT_TOKENIZER_DIR)
    vocab = Vocabulary.load(out_dir)
    media = MediaEncoder(image_tok, speech_tok, align_words=bool(align_words) and read_aloud_words > 0)

    for split in splits:
        for kind, tasks in _by_kind(task_names).items():
            todo = [t for t in tasks if not (out_dir / split / t / f"shard-{rank:05d}.offsets.npy").exists()]
            if not todo:
                continue  # finished by an earlier run
            writers = {t: ShardWriter(out_dir, split, t, rank) for t in todo}
            report = (lambda done, total, name=f"{split}/{kind}": progress(name, done, total)) if progress else None
            encoded = _encode_kind(
                world,
                wm,
                split,
                kind,
                todo,
                rank,
                world_size,
                seed,
                batch_size,
                media,
                vocab,
                text_tok,
                report,
                read_aloud_words,
            )
            for task, enc in encoded:
                writers[task].add(enc.ids, enc.mask)
            for w in writers.values():
                w.close()
    if media.aligned["by_characters"]:
        warnings.warn(
            f"pretokenize: {media.aligned['by_characters']} of {sum(media.aligned.values())} clips read aloud without "
            "word onsets could not be aligned by the speech tokenizer (no phone of its inventory in their phonemes, "
            "or fewer frames than phones) and are cut by characters",
            stacklevel=2,
        )
    _barrier(world_size)
    if rank == 0:
        return write_manifest(out_dir, vocab.size)
    return {}
