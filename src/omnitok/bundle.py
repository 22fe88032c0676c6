"""A bundle: everything needed to talk to a trained model, in one directory.

    omnitok.json          format version, the vocabulary, which tokenizers are present, the sequence layout
    lm/                   the causal LM (transformers ``save_pretrained``, safetensors)
    tokenizers/text/      tokenizer.json
    tokenizers/image/     config.json + model.safetensors (optional)
    tokenizers/speech/    config.json + model.safetensors (optional)

The vocabulary travels inside ``omnitok.json`` so the id layout the LM was trained with can never be
separated from its weights. Loading checks that the pieces agree (embedding rows vs vocabulary size,
tokenizer codebooks vs vocabulary ranges) and never unpickles anything.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnitok.errors import OmnitokError, is_int, is_number
from omnitok.io import atomic_write_json, check_format, read_json
from omnitok.tokenizers.text import TextTokenizer
from omnitok.vocab import Vocabulary

FORMAT = "omnitok-bundle"
VERSION = 1
MANIFEST = "omnitok.json"


def save_bundle(
    out: str | os.PathLike[str],
    lm: Any,
    vocab: Vocabulary,
    text_tokenizer: str | os.PathLike[str],
    image_tokenizer: str | os.PathLike[str] | None = None,
    speech_tokenizer: str | os.PathLike[str] | None = None,
    extra: dict[str, Any] | None = None,
    read_aloud_words: int = 0,
    caption_image_drop: float = 0.0,
) -> Path:
    """Assemble a bundle in a temporary directory, then move it into place (never half-written).

    ``lm`` is a transformers model or the directory it was saved to; tokenizers are directories.
    ``read_aloud_words``: the layout the LM's TTS documents were written in (``omnitok.sequence``; 0: one span after
    the text), which generation must decode in: it is part of what the weights mean, as the vocabulary is.
    ``caption_image_drop``: the share of caption documents trained without their picture, so the LM knows the words
    it would write without one, which guidance for reading (``text_cfg_scale``) needs.
    """
    if not is_int(read_aloud_words) or read_aloud_words < 0:
        raise OmnitokError(f"read_aloud_words must be an int >= 0, got {read_aloud_words!r}")
    _check_drop(caption_image_drop, "caption_image_drop")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        if isinstance(lm, str | os.PathLike):
            if not (Path(lm) / "config.json").is_file():
                raise OmnitokError(f"LM directory {lm} has no config.json (expected a transformers save_pretrained)")
            shutil.copytree(lm, tmp / "lm")
        else:
            from omnitok import image_positions

            image_positions.save(lm, tmp / "lm")
        tokenizers: dict[str, str] = {}
        for name, src in (("text", text_tokenizer), ("image", image_tokenizer), ("speech", speech_tokenizer)):
            if src is None:
                continue
            src = Path(src)
            if not src.exists():
                raise OmnitokError(f"{name} tokenizer directory {src} does not exist")
            dest = tmp / "tokenizers" / name
            if src.is_file():  # a bare tokenizer.json
                dest.mkdir(parents=True)
                shutil.copy2(src, dest / src.name)
            else:
                shutil.copytree(src, dest, ignore=shutil.ignore_patterns("checkpoint*", "*.tmp", "log*"))
            tokenizers[name] = f"tokenizers/{name}"
        atomic_write_json(
            tmp / MANIFEST,
            {
                "format": FORMAT,
                "version": VERSION,
                "vocab": vocab.to_json(),
                "tokenizers": tokenizers,
                "read_aloud_words": read_aloud_words,
                "caption_image_drop": float(caption_image_drop),
                **(extra or {}),
            },
        )
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class Bundle:
    """The loaded pieces; ``omnitok.generate.OmniModel`` adds the any-to-any API on top."""

    path: Path
    lm: Any
    vocab: Vocabulary
    text: TextTokenizer
    image: Any | None
    speech: Any | None
    manifest: dict[str, Any]
    read_aloud_words: int = 0  # the TTS layout the LM was trained on (omnitok.sequence); 0 in bundles made before it
    caption_image_drop: float = 0.0  # captions trained without their picture (save_bundle); 0 in bundles before it


def _check_drop(value: Any, where: str) -> None:
    if not is_number(value) or not 0 <= value < 1:
        raise OmnitokError(f"{where} should be a number in [0, 1), got {value!r}")


def _expect_size(what: str, got: int, vocab: Vocabulary, modality: str) -> None:
    want = sum(vocab.code_range(modality, q).size for q in range(vocab.levels(modality)))
    if got != want:
        raise OmnitokError(f"bundle: the {what} has {got} codes but the vocabulary reserves {want} {modality} ids")


def check_device(device: str) -> None:
    """Refuse a device this torch cannot use before anything slow is loaded onto it."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise OmnitokError(f"device: {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise OmnitokError(f"device: {device!r} asked for, but this torch has no CUDA device (use cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise OmnitokError(f"device: {device!r} asked for, but MPS is not available here (use cpu)")


def load_bundle(path: str | os.PathLike[str], device: str = "cpu") -> Bundle:
    check_device(device)
    p = Path(path)
    if p.is_file():
        raise OmnitokError(f"a bundle is a directory (omnitok.json, lm/, tokenizers/), got the file {p}")
    manifest = check_format(read_json(p / MANIFEST, "bundle manifest"), FORMAT, VERSION, str(p / MANIFEST))
    if not isinstance(manifest.get("vocab"), dict):
        raise OmnitokError(
            f"{p / MANIFEST}: field 'vocab' should be the vocabulary's mapping, got {manifest.get('vocab')!r}"
        )
    vocab = Vocabulary.from_json(manifest["vocab"], f"{p / MANIFEST} (field 'vocab')")
    tok = manifest.get("tokenizers", {})
    if not isinstance(tok, dict) or not all(isinstance(v, str) for v in tok.values()):
        raise OmnitokError(f"{p / MANIFEST}: field 'tokenizers' should map names to directories, got {tok!r}")
    if "text" not in tok:
        raise OmnitokError(f"{p / MANIFEST}: field 'tokenizers' has no 'text' entry")
    read_aloud = manifest.get("read_aloud_words", 0)
    if not is_int(read_aloud) or read_aloud < 0:
        raise OmnitokError(f"{p / MANIFEST}: field 'read_aloud_words' should be an int >= 0, got {read_aloud!r}")
    drop = manifest.get("caption_image_drop", 0.0)
    _check_drop(drop, f"{p / MANIFEST}: field 'caption_image_drop'")
    text = TextTokenizer.load(p / tok["text"])
    if text.vocab_size != vocab.text_size:
        raise OmnitokError(f"bundle: text tokenizer has {text.vocab_size} ids, vocabulary expects {vocab.text_size}")
    image = speech = None
    if "image" in tok:
        from omnitok.tokenizers.base import load_image_tokenizer

        image = load_image_tokenizer(p / tok["image"])
        _expect_size("image tokenizer", int(image.codebook_size), vocab, "image")
    if "speech" in tok:
        from omnitok.tokenizers.speech import load_speech_tokenizer

        speech = load_speech_tokenizer(p / tok["speech"])
        _expect_size("speech tokenizer", int(sum(speech.codebook_sizes)), vocab, "speech")

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading a small bundle should not draw bars into the user's output

    lm_dir = p / "lm"
    if not (lm_dir / "config.json").is_file():
        raise OmnitokError(f"bundle: {lm_dir} has no config.json")
    from safetensors import SafetensorError

    from omnitok import image_positions

    try:
        lm = AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, SafetensorError) as e:  # a corrupt config.json or weights
        raise OmnitokError(f"bundle: the LM in {lm_dir} cannot be loaded: {e}") from e
    image_positions.restore(lm, lm_dir)
    lm = lm.to(device).eval()
    rows = lm.get_input_embeddings().weight.shape[0]
    if rows < vocab.size:
        raise OmnitokError(f"bundle: the LM has {rows} embedding rows but the vocabulary has {vocab.size} ids")
    return Bundle(p, lm, vocab, text, image, speech, manifest, int(read_aloud), float(drop))
