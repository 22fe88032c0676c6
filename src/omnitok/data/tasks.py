"""Training tasks built from toy-world samples: which segments the user gives and which the assistant answers.

One world sample can feed several tasks (a scene is captioned, drawn, transcribed and spoken), so tasks
are functions ``(decoded world sample, rng) -> list of Samples``. Media stay raw here (pixels, waveforms);
tokenizers fill in codes afterwards, so the same task definitions serve pretokenization and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from omnitok.sequence import Audio, Image, LossPolicy, Segment, Text, Video

Sample = list[Segment]

_CAPTION_ASKS = ("Describe the picture.", "What is in this image?", "Caption this image.", "What do you see?")
_DRAW_ASKS = ("Draw: ", "Make a picture of this: ", "Paint this: ", "")
# The asks for transcribing and reading aloud are public: generation reads its own speech back with the first, and
# knows a request to read a text aloud by the second (omnitok.generate, best_of for speech).
ASR_ASKS = ("Transcribe the speech.", "What was said?", "Write down what you hear.")
TTS_ASKS = ("Say this: ", "Read aloud: ", "Speak: ")
_VIDEO_ASKS = ("What happens in the video?", "Describe the clip.", "What changed?")
_FILTER_ASK = "Does this caption match the picture? "
SAMPLE_RATE_KEY = "sample_rate"


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _style(record: dict[str, Any]) -> dict[str, str]:
    return {"voice": record["voice"], "pitch": record["pitch"], "rate": record["rate"]}


def _audio(samples: np.ndarray, record: dict[str, Any], role: str, with_style: bool) -> Audio:
    return Audio(
        samples=samples,
        sample_rate=int(record[SAMPLE_RATE_KEY]),
        role=role,
        style=_style(record) if with_style else None,
    )


def caption(s: dict[str, Any], rng: np.random.Generator) -> list[Sample]:
    # The answer is the canonical caption (objects in reading order, one wording): a function of the picture, so
    # every target token teaches reading. Paraphrases (random order, frames, synonyms) stay in the prompts of
    # the tasks that read text (t2i), where variety teaches understanding instead of guessing a wording.
    text = s["meta"]["captions"][0]
    _pick(rng, tuple(s["meta"]["captions"]))  # keeps the random stream of the remaining samples unchanged
    ask = Text(_pick(rng, _CAPTION_ASKS), role="user")
    if CAPTION_IMAGE_DROP and rng.random() < CAPTION_IMAGE_DROP:
        return [[ask, Text(text, role="assistant")]]
    return [[Image(pixels=s["png"], role="user"), ask, Text(text, role="assistant")]]


# Share of caption samples with the picture removed: the LM learns what it would write without one, which guidance
# for reading subtracts (omnitok.generate, text_cfg_scale). On a 60-minute bundle fine-tuned with it, exact captions
# of held-out colour-shape pairs 0.225 -> 0.31 guided at 3, seen ones level; unguided the drop cost nothing at 60
# minutes (0.560 against 0.553) nor at 15 (0.12 against 0.08). docs/BENCHMARKS.md "Guidance for reading".
CAPTION_IMAGE_DROP = 0.15


T2I_PROMPT_DROP = 0.1  # share of text-to-image samples with the caption removed: teaches the unconditional
# distribution that classifier-free guidance subtracts at generation time


def t2i(s: dict[str, Any], rng: np.random.Generator) -> list[Sample]:
    text = _pick(rng, _DRAW_ASKS) + _pick(rng, tuple(s["meta"]["captions"]))
    if rng.random() < T2I_PROMPT_DROP:
        text = ""
    return [[Text(text, role="user"), Image(pixels=s["png"], role="assistant")]]


def asr(s: dict[str, Any], rng: np.random.Generator) -> list[Sample]:
    if "wav" not in s:
        return []
    rec = s["meta"]["speech"]
    # input speech carries no style tokens: at inference nobody tells the model who is speaking
    return [
        [
            _audio(s["wav"], rec, "user", False),
            Text(_pick(rng, ASR_ASKS), role="user"),
            Text(rec["text"], role="assistant"),
        ]
    ]


def tts(s: dict[str, Any], rng: np.random.Generator) -> list[Sample]:
    if "wav" not in s:
        return []
    rec = s["meta"]["speech"]
    # the clip carries its words (and where each starts, in worlds that recorded it; else their phonemes, from which
    # pretokenization aligns them), so the encoding can lay them beside their speech (omnitok.sequence, read-aloud)
    onsets = rec.get("word_onsets")
    n = int(rec.get("num_samples") or len(s["wav"]))
    clip = replace(
        _audio(s["wav"], rec, "assistant", True),
        words=rec["text"],
        word_onsets=None if onsets is None else tuple(float(o) / n for o in onsets),
        phonemes=rec.get("phonemes") if onsets is None else None,
    )
    return [[Text(_pick(rng, TTS_ASKS) + rec["text"], role="user"), clip]]


def video_caption(s: dict[str, Any], rng: np.random.Generator) -> list[Sample]:
    strip = s["video.png"]
    n = int(s["meta"]["n_frames"])
    w = strip.shape[1] // n
    frames = [strip[:, i * w : (i + 1) * w] for i in range(n)]
    return [
        [
            Video(pixels=frames, role="user"),
            Text(_pick(rng, _VIDEO_ASKS), role="user"),
            Text(s["meta"]["caption"], role="assistant"),
        ]
    ]


def interleaved(s: dict[str, Any], rng: np.random.Generator) -> list[Sample]:
    doc: Sample = []
    for seg in s["meta"]["segments"]:
        doc.append(Text(seg["text"]) if seg["type"] == "text" else Image(pixels=s[seg["file"]]))
    return [doc]


def edit(s: dict[str, Any], rng: np.random.Generator) -> list[Sample]:
    return [
        [
            Image(pixels=s["png"], role="user"),
            Text(s["meta"]["instruction"], role="user"),
            Image(pixels=s["edited.png"], role="assistant"),
        ]
    ]


def spoken_qa(s: dict[str, Any], rng: np.random.Generator) -> list[Sample]:
    if "question.wav" not in s:
        return []
    m = s["meta"]
    return [
        [
            Image(pixels=s["png"], role="user"),
            _audio(s["question.wav"], m["question_speech"], "user", False),
            Text(m["answer"], role="assistant"),
            _audio(s["answer.wav"], m["answer_speech"], "assistant", True),
        ]
    ]


def vqa(s: dict[str, Any], rng: np.random.Generator) -> list[Sample]:
    """The spoken questions typed, answered in words. Without it a question typed about a picture (the chat page's
    usual request) was answered with a caption: the model had only ever been asked about pictures aloud. Needs no
    speech, so a world built without it trains the task too."""
    m = s["meta"]
    question, answer = Text(m["question"], role="user"), Text(m["answer"], role="assistant")
    return [[Image(pixels=s["png"], role="user"), question, answer]]


def caption_filter(s: dict[str, Any], rng: np.random.Generator) -> list[Sample]:
    m = s["meta"]
    answer = "Yes." if m["correct"] else f"No, the {m['error']['field']} is wrong."
    return [
        [
            Image(pixels=s["png"], role="user"),
            Text(_FILTER_ASK + m["caption"], role="user"),
            Text(answer, role="assistant"),
        ]
    ]


def text(s: dict[str, Any], rng: np.random.Generator) -> list[Sample]:
    """Plain captions as a text-only document (keeps the language side fluent)."""
    return [[Text(" ".join(s["meta"]["captions"]))]]


TaskFn = Callable[[dict[str, Any], np.random.Generator], list[Sample]]

# task -> (world kind it reads, builder, loss policy)
TASKS: dict[str, tuple[str, TaskFn, LossPolicy]] = {
    "caption": ("scene", caption, LossPolicy()),
    "t2i": ("scene", t2i, LossPolicy()),
    "asr": ("scene", asr, LossPolicy()),
    "tts": ("scene", tts, LossPolicy()),
    "text": ("scene", text, LossPolicy.pretraining()),
    "video_caption": ("video", video_caption, LossPolicy()),
    "interleaved": ("construction", interleaved, LossPolicy.pretraining()),
    "edit": ("edit", edit, LossPolicy()),
    "spoken_qa": ("spoken_qa", spoken_qa, LossPolicy()),
    "vqa": ("spoken_qa", vqa, LossPolicy()),
    "caption_filter": ("caption_filter", caption_filter, LossPolicy()),
}
SPEECH_TASKS = frozenset({"asr", "tts", "spoken_qa"})


def sample_rng(seed: int, key: str, task: str) -> np.random.Generator:
    """A generator per (sample, task) so prompts do not depend on processing order or rank."""
    import zlib

    return np.random.default_rng([seed, zlib.crc32(key.encode()), zlib.crc32(task.encode())])
