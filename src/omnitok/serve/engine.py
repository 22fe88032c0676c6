"""What the server asks of the model, phrased the way the model was trained, and what the bundle offers.

Each HTTP endpoint becomes a :class:`Task` (segments in, one output kind); tasks with the same
:attr:`Task.key` can be decoded together in one ``generate_batch`` call. The prompts match the training
tasks (``omnitok.data.tasks``) and the evaluation suite: ASR asks "Transcribe the speech.", speech synthesis
is "Say this: <text>" with the style forced as tokens, text-to-image is the bare caption with classifier-free
guidance (2.0). A spoken chat answer is one reply, words then clip, as the spoken_qa task was trained: the requested
voice's style tokens follow the reply's ``<speech>``, so the voice is the one asked for and the transcript is exactly
the words the clip was spoken from.

Everything here runs on the batcher's worker thread except the bundle inspection helpers.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omnitok.decoding import IMAGE_CFG_SCALE, Sampling
from omnitok.generate import DEFAULT_MAX_TOKENS, AudioChunk, ImageOut, OmniModel, TextDelta
from omnitok.sequence import Audio, Image, Segment, Text

ASR_PROMPT = "Transcribe the speech."
TTS_PROMPT = "Say this: "
ANSWER_SPAN = 4  # a spoken answer's tokens between its words and its clip: <speech> and up to three style tokens
IMAGE_CFG = IMAGE_CFG_SCALE  # text-to-image guidance, as in the evaluation suite
EDIT_CFG = 1.0  # image editing (a picture in the prompt) is evaluated without guidance
OUTPUTS = ("text", "speech_answer", "speech", "image")

# OpenAI's built-in voice names, split by how they sound, mapped onto the bundle's voices of the same kind.
OPENAI_FEMALE = ("alloy", "coral", "marin", "nova", "sage", "shimmer")
OPENAI_MALE = ("ash", "ballad", "cedar", "echo", "fable", "onyx", "verse")


@dataclass
class Task:
    """One request for the worker: a prompt, the output kind and the options that decide batchability."""

    segments: list[Segment]
    output: str  # one of OUTPUTS
    style: dict[str, str] | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    cfg_scale: float = IMAGE_CFG  # image outputs only
    best_of: int = 1  # images, text describing one picture, speech read aloud or a spoken answer's clip: replies made,
    # the likeliest returned

    @property
    def key(self) -> Hashable:
        """Tasks with equal keys share one decode call (style may differ: it is passed per row)."""
        return (self.output, self.max_new_tokens, self.temperature, self.top_p, self.seed, self.cfg_scale, self.best_of)


@dataclass
class Result:
    text: str = ""
    audio: np.ndarray | None = None
    sample_rate: int = 16000
    images: list[np.ndarray] = field(default_factory=list)
    finish_reason: str = "stop"


class Engine:
    """The model plus the knowledge of how to prompt it; owns nothing thread-related."""

    def __init__(self, model: OmniModel, speech_max_tokens: int | None = None, text_cfg_scale: float = 1.0) -> None:
        self.model = model
        self.speech_max_tokens = speech_max_tokens
        # text replies about a picture guided against the request without it (omnitok.generate; 1: off): the
        # operator's choice for the bundle, as it helps a bundle that reads well and hurts one that does not
        self.text_cfg_scale = text_cfg_scale
        self.voices = self._voices()
        styles = model.vocab.styles()
        self.pitches = styles.get("pitch", [])
        self.rates = styles.get("rate", [])
        self.openai_voices = self._openai_voice_map()

    # --- what the bundle can do -----------------------------------------------------------------------
    @property
    def can_read(self) -> list[str]:
        b = self.model.bundle
        return ["text", *(["image"] if b.image is not None else []), *(["audio"] if b.speech is not None else [])]

    @property
    def can_write(self) -> list[str]:
        b, m = self.model.bundle, self.model.vocab.modalities
        out = ["text"]
        if b.image is not None and "image" in m:
            out.append("image")
        if b.speech is not None and "speech" in m:
            out.append("audio")
        return out

    @property
    def image_size(self) -> int | None:
        tok = self.model.bundle.image
        if tok is None:
            return None
        size = getattr(tok, "image_size", None) or getattr(getattr(tok, "config", None), "image_size", None)
        return int(size) if size else None

    @property
    def sample_rate(self) -> int | None:
        tok = self.model.bundle.speech
        return int(tok.sample_rate) if tok is not None else None

    def _voices(self) -> list[str]:
        """Voices with a style token the LM knows and (where the codec has a table) an embedding to decode with."""
        names = self.model.vocab.styles().get("voice", [])
        known = getattr(self.model.bundle.speech, "voices", None)
        if known:
            names = [v for v in names if v in known]
        return names

    def _openai_voice_map(self) -> dict[str, str]:
        if not self.voices:
            return {}
        female = [v for v in sorted(self.voices) if re.search(r"(^|[_-])f\d*$", v)] or sorted(self.voices)
        male = [v for v in sorted(self.voices) if re.search(r"(^|[_-])m\d*$", v)] or sorted(self.voices)
        out = {name: female[i % len(female)] for i, name in enumerate(OPENAI_FEMALE)}
        out |= {name: male[i % len(male)] for i, name in enumerate(OPENAI_MALE)}
        return dict(sorted(out.items()))

    def resolve_voice(self, name: str) -> str | None:
        """A bundle voice for a requested name (the bundle's own or an OpenAI one); None: the codec has no voices.

        Raises ``ValueError`` with the valid names for anything else.
        """
        if name in self.voices:
            return name
        if name.lower() in self.openai_voices:
            return self.openai_voices[name.lower()]
        if not self.voices and (name == "default" or name.lower() in OPENAI_FEMALE + OPENAI_MALE):
            return None
        valid = self.voices + list(self.openai_voices) if self.voices else ["default", *OPENAI_FEMALE, *OPENAI_MALE]
        raise ValueError(f"unknown voice {name!r}; valid voices: {valid}")

    def rate_for_speed(self, speed: float | None) -> str | None:
        """OpenAI's ``speed`` (0.25-4, 1 = normal) -> the bundle's rate class; None keeps the model's choice."""
        if speed is None or not {"slow", "normal", "fast"} <= set(self.rates):
            return None
        return "slow" if speed <= 0.85 else "fast" if speed >= 1.2 else "normal"

    def info(self) -> dict[str, Any]:
        return {
            "reads": self.can_read,
            "writes": self.can_write,
            "voices": self.voices,
            "openai_voices": self.openai_voices,
            "pitches": self.pitches,
            "rates": self.rates,
            "speed_to_rate": {"<=0.85": "slow", "0.85-1.2": "normal", ">=1.2": "fast"}
            if self.rate_for_speed(1.0)
            else {},
            "image_size": self.image_size,
            "sample_rate": self.sample_rate,
            "audio_formats": {"input": ["wav", "pcm16"], "output": ["wav", "pcm16"], "stream": "pcm16"},
            "pcm16": "raw signed 16-bit little-endian mono at 16000 Hz",
            "image_input_policy": "converted to RGB (alpha over white), centre-cropped to a square, Lanczos-resized "
            f"to {self.image_size}x{self.image_size}",
            "audio_input_policy": "WAV (PCM or float) or pcm16; stereo averaged to mono; resampled to 16 kHz "
            "(polyphase filter)",
        }

    # --- running tasks (worker thread) ----------------------------------------------------------------
    def _options(self, task: Task, max_new_tokens: int | None) -> dict[str, Any]:
        opts: dict[str, Any] = {"max_new_tokens": max_new_tokens, "seed": task.seed}
        if task.output == "text":
            opts["text_cfg_scale"] = self.text_cfg_scale
        if task.temperature is not None or task.top_p is not None:
            t = 1.0 if task.temperature is None else task.temperature
            opts["text"] = Sampling(temperature=t, top_p=1.0 if task.top_p is None else task.top_p)
        return opts

    def _speech_options(self, task: Task) -> dict[str, Any]:
        return {"max_new_tokens": self.speech_max_tokens, "seed": task.seed}

    def run_batch(self, tasks: list[Task]) -> list[Result]:
        """Decode tasks that share a key in one batch (a spoken answer takes two: its text, then its speech)."""
        first = tasks[0]
        prompts = [t.segments for t in tasks]
        if first.output == "image":
            opts = self._options(first, None)
            outs = self.model.generate_batch(
                prompts, output="image", cfg_scale=first.cfg_scale, best_of=first.best_of, **opts
            )
            return [Result(images=[s.pixels for s in o if isinstance(s, Image) and s.pixels is not None]) for o in outs]
        if first.output == "speech":
            outs = self.model.generate_batch(
                prompts,
                output="speech",
                style=[t.style for t in tasks],
                best_of=first.best_of,
                **self._speech_options(first),
            )
            return [self._audio_result(o, "") for o in outs]
        if first.output == "speech_answer":
            return self._spoken_answers(tasks, prompts)
        opts = self._options(first, first.max_new_tokens)
        if first.best_of > 1:  # a text reply about one picture (the app checks)
            opts["best_of"] = first.best_of
        outs = self.model.generate_batch(prompts, output="text", **opts)
        return [Result(text=t, finish_reason=self._finish(t, first.max_new_tokens)) for t in map(_text_of, outs)]

    def _answer_options(self, task: Task) -> dict[str, Any]:
        """A spoken answer's limits: its words at the request's max tokens, its clip at the server's speech cap."""
        words = task.max_new_tokens or DEFAULT_MAX_TOKENS["text"]
        clip = self.speech_max_tokens or DEFAULT_MAX_TOKENS["speech"]
        return {**self._options(task, words + ANSWER_SPAN + clip), "max_text_tokens": words}

    def _spoken_answers(self, tasks: list[Task], prompts: list[list[Segment]]) -> list[Result]:
        """Spoken chat answers: the words, then their clip in the requested voice, as one reply (the spoken_qa task's
        form). Read aloud as a second request "Say this: <words>" instead, the same words were heard right for 0 of
        50 test questions against 7-9 (BENCHMARKS "How a spoken answer is spoken"): the read-aloud task was trained
        on captions, not answers. ``best_of`` re-speaks the clip and keeps the one the model hears the words in
        likeliest. Words that end without a clip (a typed question) are spoken in the reply all the same
        (``OmniModel._words``): heard at WER 0.74 there against 0.92 read aloud (BENCHMARKS "Questions typed").
        """
        first = tasks[0]
        outs = self.model.generate_batch(
            prompts,
            output="text+speech",
            style=[t.style for t in tasks],
            best_of=first.best_of,
            **self._answer_options(first),
        )
        results = []
        for o in outs:
            result = self._audio_result(o, _text_of(o))
            result.finish_reason = self._finish(result.text, first.max_new_tokens)
            results.append(result)
        return results

    def run_stream(self, task: Task) -> Iterator[tuple[str, Any]]:
        """Events ``("text", str)``, ``("audio", float32 samples)``, ``("image", pixels)``, ``("finish", reason)``."""
        if task.output == "image":
            opts = self._options(task, None)
            for ev in self.model.stream(task.segments, output="image", cfg_scale=task.cfg_scale, **opts):
                if isinstance(ev, ImageOut):
                    yield "image", ev.pixels
            yield "finish", "stop"
            return
        text = ""
        if task.output == "speech_answer":  # one reply, words then clip, as _spoken_answers decodes it
            events = self.model.stream(
                task.segments, output="text+speech", style=task.style, **self._answer_options(task)
            )
        elif task.output == "text":
            events = self.model.stream(task.segments, output="text", **self._options(task, task.max_new_tokens))
        else:
            events = iter(())
        for ev in events:
            if isinstance(ev, TextDelta):
                text += ev.text
                yield "text", ev.text
            elif isinstance(ev, AudioChunk):
                yield "audio", np.asarray(ev.samples, dtype=np.float32)
        if task.output == "speech":
            for ev in self.model.stream(task.segments, output="speech", style=task.style, **self._speech_options(task)):
                if isinstance(ev, AudioChunk):
                    yield "audio", np.asarray(ev.samples, dtype=np.float32)
        yield "finish", self._finish(text, task.max_new_tokens) if task.output != "speech" else "stop"

    def _finish(self, text: str, limit: int | None) -> str:
        if limit is not None and text and len(self.model.bundle.text.encode(text)) >= limit:
            return "length"
        return "stop"

    def _audio_result(self, segments: list[Segment], text: str) -> Result:
        clips = [s.samples for s in segments if isinstance(s, Audio) and s.samples is not None]
        audio = np.concatenate(clips).astype(np.float32) if clips else np.zeros(0, np.float32)
        return Result(text=text, audio=audio, sample_rate=self.sample_rate or 16000)


def _text_of(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments if isinstance(s, Text))
