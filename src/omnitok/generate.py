"""Any-to-any generation on a bundle: segments in, segments out (text, pixels, waveforms).

``OmniModel.generate`` turns the input segments into a prompt exactly as training data were encoded,
opens the requested output span itself (``<image>``, or ``<speech>`` plus style tokens) so the model
cannot answer in the wrong modality, decodes under the modality automaton, and decodes codes back into
images and audio. ``stream`` yields text deltas and audio chunks while tokens are still being sampled.

A text read aloud (``output="speech"``, a request "Say this: <text>") from a bundle trained in the read-aloud layout
(``omnitok.sequence``; the bundle's ``read_aloud_words``) is decoded in that layout: the decoder places the
request's words a chunk ahead of their speech, the LM speaks each chunk and closes its span (the automaton's script,
``omnitok.constraints``), and the spans' codes are joined into the one clip the caller gets.
"""

from __future__ import annotations

import itertools
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from omnitok.bundle import Bundle, load_bundle
from omnitok.constraints import DONE, SPEAK, SPEECH_CODE0, SPEECH_START, ModalityConstraint
from omnitok.data.tasks import ASR_ASKS, TTS_ASKS
from omnitok.decoding import (
    IMAGE_CFG_SCALE,
    IMAGE_SAMPLING,
    SPEECH_SAMPLING,
    TEXT_SAMPLING,
    DecodeConfig,
    Sampling,
    iter_decode,
)
from omnitok.errors import OmnitokError, is_int, is_number
from omnitok.sequence import (
    Audio,
    Image,
    LossPolicy,
    MediaEncoder,
    Segment,
    Text,
    Video,
    decode,
    encode,
    prompt,
    read_aloud_chunks,
    text_of,
)
from omnitok.vocab import END, EOS, SPAN_TOKENS, style_token

OUTPUTS = ("auto", "text", "image", "speech", "text+speech")
DEFAULT_MAX_TOKENS = {"text": 128, "speech": 300}  # speech: 12 s at 25 tokens/s
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


@dataclass
class TextDelta:
    text: str


@dataclass
class AudioChunk:
    samples: np.ndarray
    sample_rate: int
    seconds_since_start: float = 0.0


@dataclass
class ImageOut:
    pixels: np.ndarray


@dataclass
class GenerateOptions:
    output: str = "auto"
    style: dict[str, str] | list[dict[str, str] | None] | None = None  # a list: one style per batched request
    max_new_tokens: int | None = None
    # output="text+speech": the most tokens the words may take; words cut there are spoken as cut (the clip's room is
    # what max_new_tokens leaves). None: the words end where the model opens its speech.
    max_text_tokens: int | None = None
    cfg_scale: float = IMAGE_CFG_SCALE
    # output="text" about a picture: guidance against the same request without its pictures (omnitok.decoding; 1: off).
    # For a bundle whose captions were trained with the picture sometimes dropped (Bundle.caption_image_drop), so it
    # knows what it would write without one: 3 read held-out compositions better where its reading was good (a
    # 60-minute demo) and worse where it was weak (15 minutes); BENCHMARKS "Guidance for reading".
    text_cfg_scale: float = 1.0
    text: Sampling = TEXT_SAMPLING
    image: Sampling = IMAGE_SAMPLING
    speech: Sampling = SPEECH_SAMPLING
    seed: int | None = None
    speech_chunk_frames: int = 10
    # 16 kHz clip(s) giving the voice to speak in; an unseen speaker's clip is taken to be at their mid pitch, so a
    # requested pitch class is relative to it (give a clip in the speaker's normal voice)
    reference: np.ndarray | list[np.ndarray | None] | None = None
    continuation: bool = False  # continue a role-less document (interleaved pre-training format) instead of chatting
    # Draw or write this many replies (the one these options give, then samples) and keep the model's likeliest:
    # text-to-image by reading each picture back against its caption (BENCHMARKS "Drawing several pictures": 0.20
    # -> 0.30 exact scenes with 7), a description of one picture by reader + drawer ("The other way": 0.645 ->
    # 0.69 exact captions with 6), a text read aloud by hearing each clip back against the text ("Speaking several
    # clips": tts_wer 0.44 -> 0.33 and 0.54 -> 0.47 with 6), a spoken answer the same way, its words written once.
    # Costs best_of decodes and as many scoring passes.
    best_of: int = 1

    def __post_init__(self) -> None:
        """Options come from Python callers, the CLI and the server: a wrong type fails here, by name."""
        if not isinstance(self.output, str):
            raise OmnitokError(f"output must be one of {list(OUTPUTS)}, got {self.output!r}")
        if self.max_new_tokens is not None and not is_int(self.max_new_tokens):
            raise OmnitokError(f"max_new_tokens must be an int >= 1 or None, got {self.max_new_tokens!r}")
        if self.max_text_tokens is not None and (not is_int(self.max_text_tokens) or self.max_text_tokens < 1):
            raise OmnitokError(f"max_text_tokens must be an int >= 1 or None, got {self.max_text_tokens!r}")
        cfg = self.cfg_scale
        if not is_number(cfg) or cfg < 0:
            raise OmnitokError(f"cfg_scale must be a finite number >= 0 (1: no guidance), got {cfg!r}")
        read = self.text_cfg_scale
        if not is_number(read) or read < 0:
            raise OmnitokError(f"text_cfg_scale must be a finite number >= 0 (1: no guidance), got {read!r}")
        for name in ("text", "image", "speech"):
            if not isinstance(getattr(self, name), Sampling):
                raise OmnitokError(f"{name} must be a Sampling(temperature, top_k, top_p), got {getattr(self, name)!r}")
        frames = self.speech_chunk_frames
        if not is_int(frames) or frames < 1:
            raise OmnitokError(f"speech_chunk_frames must be an int >= 1, got {frames!r}")
        if self.style is not None and not isinstance(self.style, dict | list):
            raise OmnitokError(
                f"style must be a mapping such as {{'voice': 'us_f1'}} (or one per request), got {self.style!r}"
            )


# The extra candidates of best_of: samples (measured there at temperature 0.7 among the 64 likeliest codes), and the
# question each candidate is read back with (the captioning task's, as trained and evaluated).
BEST_OF_SAMPLING = Sampling(temperature=0.7, top_k=64)
# best_of's extra descriptions of a picture (benchmarks/caption_rerank.py: temperature 0.7 among the 32 likeliest)
DESCRIBE_SAMPLING = Sampling(temperature=0.7, top_k=32)
# best_of's extra clips of a text read aloud: the shipped speech sampling (benchmarks/tts_rerank.py: at 0.7 the
# samples were worse and the listener's pick no better than the plain clip; at 0.5 it cut the WER by 0.05-0.07), and the
# question each is heard back with (the evaluation's ASR prompt, as trained)
READ_ALOUD_SAMPLING = SPEECH_SAMPLING
HEAR_BACK_ASK = ASR_ASKS[0]
READ_BACK_ASK = "Describe the picture."
SCORE_ROWS = 8  # samples a scoring pass holds


class OmniModel:
    """A loaded bundle with the any-to-any API."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.vocab = bundle.vocab
        self.media = MediaEncoder(bundle.image, bundle.speech)
        self.image_tokens = int(bundle.image.tokens_per_item) if bundle.image is not None else None

    @property
    def lm(self) -> Any:
        return self.bundle.lm

    # --- request building -------------------------------------------------------------------------
    def _check_output(self, output: str) -> None:
        if output not in OUTPUTS:
            raise OmnitokError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
        if output == "image" and self.bundle.image is None:
            raise OmnitokError("this bundle has no image tokenizer, so it cannot produce images")
        if "speech" in output and self.bundle.speech is None:
            raise OmnitokError("this bundle has no speech tokenizer, so it cannot produce speech")

    def _style_ids(self, style: dict[str, str] | None) -> list[int]:
        ids = []
        for field_name, value in (style or {}).items():
            name = style_token(field_name, value)
            if name not in self.vocab.specials:
                styles = self.vocab.styles()
                known = sorted(styles.get(field_name, []))
                if not known:
                    raise OmnitokError(
                        f"style field {field_name!r} is not in this bundle; its style fields: {sorted(styles)}"
                    )
                raise OmnitokError(
                    f"style {field_name}={value!r} is not in this bundle; its {field_name} values: {known}"
                )
            ids.append(self.vocab.specials[name])
        return ids

    def _coded(self, sample: Sequence[Segment], opts: GenerateOptions) -> list[Segment]:
        """The request's own copies of its segments: roles set, pictures and speech tokenized and checked.

        Made once per request; the prompt and, with guidance, the unconditional row are both built from it.
        """
        if isinstance(sample, str | bytes) or not isinstance(sample, Sequence):
            raise OmnitokError(f"a request is a list of segments such as [Text('...')], got {type(sample).__name__}")
        if not sample:
            raise OmnitokError("empty prompt: give at least one text, image or audio segment")
        for i, s in enumerate(sample):
            if not isinstance(s, Text | Image | Audio | Video):
                raise OmnitokError(f"segment {i}: expected Text, Image, Audio or Video, got {type(s).__name__}")
            if isinstance(s, Text) and not isinstance(s.text, str):
                raise OmnitokError(f"segment {i}: Text.text must be a string, got {type(s.text).__name__}")
        if all(isinstance(s, Text) and not s.text.strip() for s in sample):
            raise OmnitokError("empty prompt: the text is empty")
        self._check_output(opts.output)
        segs = [replace(s, role=None if opts.continuation else s.role or "user") for s in sample]
        self.media([segs])
        for s in segs:
            frames = [s.codes] if isinstance(s, Image) else s.frames if isinstance(s, Video) else []
            for codes in frames:
                if len(codes) != self.image_tokens:
                    shape = "x".join(str(d) for d in np.shape(s.pixels)) if isinstance(s, Image) else "video frame"
                    raise OmnitokError(
                        f"input image {shape} gives {len(codes)} tokens; this model reads images of "
                        f"{self.image_tokens} tokens (the size its image tokenizer was trained on)"
                    )
        return segs

    def _prompt_ids(self, segs: list[Segment], opts: GenerateOptions) -> list[int]:
        if opts.continuation:
            return list(encode(segs, self.vocab, self.bundle.text, LossPolicy(roles=frozenset()), add_eos=False).ids)
        return list(prompt(segs, self.vocab, self.bundle.text))

    def _request(
        self, segs: list[Segment], opts: GenerateOptions
    ) -> tuple[torch.Tensor, ModalityConstraint, list[int] | None]:
        """Prompt ids (with the forced opener of the requested output), the automaton, and the reply's script (or
        None) where the bundle speaks in the read-aloud layout (:meth:`_read_aloud_layout`); from :meth:`_coded`."""
        ids = self._prompt_ids(segs, opts)
        outputs: set[str] = {"text", "image", "speech"} if opts.output == "auto" else set(opts.output.split("+"))
        outputs &= {"text"} | {m for m in ("image", "speech") if m in self.vocab.modalities}
        script = None
        if opts.output == "image":
            ids.append(self.vocab.special(SPAN_TOKENS["image"][0]))
        elif opts.output == "speech":
            style = self._style_ids(opts.style)
            if self.bundle.read_aloud_words and not opts.continuation:
                head, script = self._read_aloud_layout(segs, style)
                ids += head
                outputs.add("text")  # the placed words are text between the spans
            else:
                ids += [self.vocab.special(SPAN_TOKENS["speech"][0]), *style]
        elif opts.output == "text+speech":
            self._style_ids(opts.style)  # checked now: they follow the reply's <speech> (_words), after its words
        constraint = ModalityConstraint(
            self.vocab, image_tokens=self.image_tokens if "image" in outputs else None, outputs=outputs
        )
        return torch.tensor(ids, dtype=torch.long), constraint, script

    def _read_aloud_layout(self, segs: list[Segment], style: list[int]) -> tuple[list[int], list[int]]:
        """A speech reply in the read-aloud layout the bundle was trained on: ``(head, script)``, the head ending
        the prompt (the first chunks' words, ``<speech>``, the style tokens), the script the rest of the reply.

        A request that reads a text aloud gets its words placed chunk by chunk, each a chunk ahead of the speech
        the LM writes for it (``omnitok.sequence``); any other request for speech one span, as in training (the
        script then only ends the reply after it, as the one-span automaton does)."""
        opener = self.vocab.special(SPAN_TOKENS["speech"][0])
        ending = [self.vocab.special(END), self.vocab.special(EOS)]
        said = self._read_aloud_text(segs)
        chunks = read_aloud_chunks(said or "", self.bundle.read_aloud_words)
        if not chunks:
            return [opener, *style], [SPEAK, *ending]
        words = [list(self.bundle.text.encode(c)) for c in chunks]
        head = [*words[0], *(words[1] if len(words) > 1 else []), opener, *style]
        script = [SPEAK]
        for i in range(1, len(chunks)):
            script += [*(words[i + 1] if i + 1 < len(chunks) else []), opener, SPEAK]
        return head, [*script, *ending]

    def _uncond(self, segs: list[Segment], opts: GenerateOptions) -> torch.Tensor:
        """The training-time drop that guidance subtracts: the same request (from :meth:`_coded`) without some of it.

        A picture is drawn without the user's text (pictures and speech stay, so editing a given picture is guided by
        its instruction), after the image opener it is drawn from. Text about a picture is written without the
        pictures, as the caption task drops them (``omnitok.data.tasks.CAPTION_IMAGE_DROP``); speech stays there: a
        spoken question is the request, not the evidence.
        """
        drawing = opts.output == "image"
        dropped = Text if drawing else Image | Video
        kept = [s for s in segs if not isinstance(s, dropped)] or [Text("", role=None if opts.continuation else "user")]
        ids = self._prompt_ids(kept, opts) + ([self.vocab.special(SPAN_TOKENS["image"][0])] if drawing else [])
        return torch.tensor(ids, dtype=torch.long)

    @staticmethod
    def _read_scale(opts: GenerateOptions) -> float:
        return float(opts.text_cfg_scale) if opts.output == "text" else 1.0

    def _uncond_rows(self, coded: list[list[Segment]], opts: GenerateOptions) -> list[torch.Tensor] | None:
        """Guidance rows for a batch: none where its output is not guided, or no request in it shows a picture."""
        if opts.output == "image" and opts.cfg_scale != 1:
            return [self._uncond(c, opts) for c in coded]
        pictures = any(isinstance(s, Image | Video) for c in coded for s in c)
        if not pictures or self._read_scale(opts) == 1:
            return None
        if not self.bundle.caption_image_drop:
            warnings.warn(
                f"text_cfg_scale {opts.text_cfg_scale}: {self.bundle.path} was not trained with captions without their "
                "picture, so the request it is guided against is one it never learned (exact captions of seen "
                "compositions fell 0.89 -> 0.74 in BENCHMARKS 'Guidance for reading')",
                stacklevel=4,
            )
        return [self._uncond(c, opts) for c in coded]

    def _config(self, opts: GenerateOptions) -> DecodeConfig:
        if opts.max_new_tokens is not None:
            limit = opts.max_new_tokens
        elif opts.output == "image":
            limit = (self.image_tokens or 0) + 3
        elif "speech" in opts.output or opts.output == "auto":
            limit = DEFAULT_MAX_TOKENS["speech"] + DEFAULT_MAX_TOKENS["text"]
        else:
            limit = DEFAULT_MAX_TOKENS["text"]
        if limit < 1:
            raise OmnitokError(f"max_new_tokens must be >= 1, got {limit}")
        return DecodeConfig(
            max_new_tokens=limit,
            text=opts.text,
            image=opts.image,
            speech=opts.speech,
            cfg_scale=opts.cfg_scale if opts.output == "image" else 1.0,
            text_cfg_scale=self._read_scale(opts),
        )

    def _fit(
        self, cfg: DecodeConfig, prompts: Sequence[torch.Tensor], uncond: Sequence[torch.Tensor] | None, output: str
    ) -> tuple[DecodeConfig, list[int]]:
        """``cfg`` kept inside the LM's context, and each request's room in it (new tokens it may add).

        Why: past ``max_position_embeddings`` the LM has never seen a position (RoPE extrapolates into noise, the
        image position table ends), so a longer request came back as "the the the ..."; a request that leaves no
        room for its reply is refused, and a served one must not grow its cache without bound.
        """
        context = int(getattr(self.lm.config, "max_position_embeddings", 0) or 0)
        if not context:
            return cfg, [cfg.max_new_tokens] * len(prompts)
        need = (self.image_tokens or 0) + 1 if output == "image" else 1
        lengths = [len(p) for p in prompts]
        if uncond:
            lengths = [max(n, len(u)) for n, u in zip(lengths, uncond, strict=True)]
        rooms = []
        for i, n in enumerate(lengths):
            if n + need > context:
                what = f"an image needs {need} more" if output == "image" else "it leaves no room for a reply"
                which = f"request {i}" if len(prompts) > 1 else "the request"
                raise OmnitokError(
                    f"{which} is {n} tokens and this model's context is {context} (max_position_embeddings): "
                    f"{what}; shorten it"
                )
            rooms.append(min(cfg.max_new_tokens, context - n))
        return replace(cfg, max_new_tokens=max(rooms)), rooms

    def _forced_prefix(self, prompt_ids: torch.Tensor) -> list[int]:
        """The span opener (and style tokens) the request appended after the prompt proper."""
        ids = prompt_ids.tolist()
        openers = {self.vocab.special(SPAN_TOKENS[m][0]) for m in ("image", "speech")}
        for k in range(len(ids) - 1, -1, -1):
            if ids[k] in openers:
                tail = ids[k:]
                if all(t in openers or self.vocab.kind(t) == "special" for t in tail):
                    return tail
                break
        return []

    # --- outputs ----------------------------------------------------------------------------------
    def _render(
        self, ids: list[int], opts: GenerateOptions, forced_prefix: list[int], media: bool = True
    ) -> list[Segment]:
        """The reply's segments; ``media``: with its pictures' pixels and its speech's samples decoded."""
        segs = decode([*forced_prefix, *ids], self.vocab, self.bundle.text)
        for s in segs:
            s.role = "assistant"
        if media:
            self._decode_media(segs, opts)
        return segs

    def _decode_media(self, segs: list[Segment], opts: GenerateOptions) -> None:
        """Pixels for a reply's pictures and samples for its speech, in place (``opts``: its request's style and
        reference). Separate so that ``best_of`` decodes only the reply it keeps: skipping the dropped clips cut the
        evaluation's TTS with best_of 6 by 13-24 % (BENCHMARKS "Only the kept reply is decoded")."""
        for s in segs:
            if isinstance(s, Image) and self.bundle.image is not None and len(s.codes) == self.image_tokens:
                s.pixels = np.asarray(self.bundle.image.decode(torch.as_tensor(s.codes)))
            elif isinstance(s, Video) and self.bundle.image is not None and s.frames:
                s.pixels = [np.asarray(self.bundle.image.decode(torch.as_tensor(f))) for f in s.frames]
            elif isinstance(s, Audio) and self.bundle.speech is not None and len(s.codes):
                style = s.style or opts.style
                if opts.reference is not None:  # the voice comes from the reference clip, not a learned embedding
                    style = {k: v for k, v in (style or {}).items() if k != "voice"} or None
                s.samples = np.asarray(
                    self.bundle.speech.decode(s.codes, style=style, reference=opts.reference), dtype=np.float32
                )
                s.sample_rate = int(self.bundle.speech.sample_rate)

    def generate(self, sample: Sequence[Segment], **options: Any) -> list[Segment]:
        """One request; see :class:`GenerateOptions` for ``output``, ``style``, sampling and CFG."""
        return self.generate_batch([sample], **options)[0]

    def _generator(self, seed: int | None) -> torch.Generator | None:
        """A seeded generator on the LM's device: sampling draws on the device the logits are on (CUDA refuses a
        CPU generator there), so a seed repeats its output on one device, not across devices."""
        if seed is None:
            return None
        if not is_int(seed) or not SEED_MIN <= seed <= SEED_MAX:
            raise OmnitokError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}] or None, got {seed!r}")
        return torch.Generator(device=next(self.lm.parameters()).device).manual_seed(seed)

    def generate_batch(self, samples: Sequence[Sequence[Segment]], **options: Any) -> list[list[Segment]]:
        """Several requests with the same options, decoded together in one batch."""
        opts = GenerateOptions(**options)
        if not isinstance(opts.best_of, int) or opts.best_of < 1:
            raise OmnitokError(f"best_of must be an int >= 1, got {opts.best_of!r}")
        if opts.best_of > 1:
            return self._best_of(samples, opts, options)
        return self._replies(samples, opts)

    @staticmethod
    def _per_request(opts: GenerateOptions, n: int) -> tuple[list[Any], list[Any]]:
        """Each of ``n`` requests' style and reference clip: ``opts`` gives one for all, or a list of one each."""
        styles = opts.style if isinstance(opts.style, list) else [opts.style] * n
        refs = opts.reference if isinstance(opts.reference, list) else [opts.reference] * n
        if len(styles) != n or len(refs) != n:
            raise OmnitokError(f"style/reference: need one per request ({n}), got {len(styles)}/{len(refs)}")
        return styles, refs

    def _replies(
        self, samples: Sequence[Sequence[Segment]], opts: GenerateOptions, media: bool = True
    ) -> list[list[Segment]]:
        """:meth:`generate_batch` for one reply a request; ``media=False`` leaves pictures and speech as codes."""
        styles, refs = self._per_request(opts, len(samples))
        prompts, constraint, cfg, uncond, rooms = self._plan(samples, opts, styles)
        gen = self._generator(opts.seed)
        if opts.output == "text+speech":
            heads = self._words(prompts, constraint, cfg, rooms, styles, gen, opts.max_text_tokens)
            new = [h + c for h, c in zip(heads, self._spoken(prompts, heads, constraint, cfg, rooms, gen), strict=True)]
        else:
            new = self._decode_ids(prompts, constraint, cfg, uncond, rooms, gen)
        out = []
        for p, ids, st, ref in zip(prompts, new, styles, refs, strict=True):
            if constraint.scripts is not None:  # the read-aloud layout: the spans' codes are one clip
                ids = self._joined_clip(ids)
            out.append(self._render(ids, replace(opts, style=st, reference=ref), self._forced_prefix(p), media))
        return out

    def _joined_clip(self, ids: list[int]) -> list[int]:
        """A read-aloud reply's ids (after the prompt's ``<speech>`` and style) as one span: its speech codes, in
        order, then ``</speech>``; the placed words and the inner closers and openers are dropped. Why: the words
        only guide the LM; the caller asked for a clip, and the codec decodes the joined codes seamlessly."""
        return [*(t for t in ids if self.vocab.kind(t) == "speech"), self.vocab.special(SPAN_TOKENS["speech"][1])]

    def _plan(
        self, samples: Sequence[Sequence[Segment]], opts: GenerateOptions, styles: list[dict[str, str] | None]
    ) -> tuple[list[torch.Tensor], ModalityConstraint, DecodeConfig, list[torch.Tensor] | None, list[int]]:
        """Each request's prompt ids, the automaton, the decoding config, guidance rows and each request's room
        (``styles``: each request's, from :meth:`_per_request`)."""
        coded = [self._coded(s, opts) for s in samples]
        requests = [self._request(c, replace(opts, style=st)) for c, st in zip(coded, styles, strict=True)]
        prompts = [r[0] for r in requests]
        uncond = self._uncond_rows(coded, opts)
        cfg, rooms = self._fit(self._config(opts), prompts, uncond, opts.output)
        constraint = requests[0][1]
        if any(r[2] is not None for r in requests):  # read aloud: every row follows its script (_read_aloud_layout)
            constraint = constraint.scripted([r[2] for r in requests])
        return prompts, constraint, cfg, uncond, rooms

    def _decode_ids(
        self,
        prompts: list[torch.Tensor],
        constraint: ModalityConstraint,
        cfg: DecodeConfig,
        uncond: list[torch.Tensor] | None,
        rooms: list[int],
        gen: torch.Generator | None,
        stop_at: int | None = None,
    ) -> list[list[int]]:
        """The new ids of every row, each cut at its room (a row past it would leave the LM's context).

        ``stop_at``: a row also ends with this id (kept); decoding stops once every row has ended.
        """
        new: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        for tokens, st in iter_decode(self.lm, prompts, constraint, cfg, uncond, gen):
            for i, t in enumerate(tokens.tolist()):
                if not finished[i] and len(new[i]) < rooms[i]:
                    new[i].append(t)
            done = (st["state"] == DONE).tolist()  # one device read a step, not one per row
            finished = [
                f or d or len(ids) >= room or (stop_at is not None and bool(ids) and ids[-1] == stop_at)
                for f, d, ids, room in zip(finished, done, new, rooms, strict=True)
            ]
            if stop_at is not None and all(finished):
                break
        return new

    def _words(
        self,
        prompts: list[torch.Tensor],
        constraint: ModalityConstraint,
        cfg: DecodeConfig,
        rooms: list[int],
        styles: list[dict[str, str] | None],
        gen: torch.Generator | None,
        max_text: int | None = None,
    ) -> list[list[int]]:
        """A spoken answer's first pass: each reply up to the speech span it opens, then the request's style tokens.

        Why two passes: the spoken_qa task puts the answer's voice, pitch and rate after ``<speech>``, so a reply
        decoded in one pass speaks in a voice of its own choosing and a caller's ``style`` was lost; placed there,
        the request's style is the voice the clip is spoken in. Words that end the reply without opening speech
        (a question typed rather than spoken: all 30 of the demo's test questions) are spoken all the same, their end
        replaced by ``<speech>``: the caller asked for a clip, and words followed by one is the trained form. A reply
        with no words, or no room left for a clip, is whole.
        """
        opener = self.vocab.special(SPAN_TOKENS["speech"][0])
        cap = max_text if max_text is not None else max(rooms)
        heads = self._decode_ids(prompts, constraint, cfg, None, [min(r, cap + 1) for r in rooms], gen, stop_at=opener)
        out = []
        for h, st, room in zip(heads, styles, rooms, strict=True):
            out.append(self._spoken_head(h, cap, room, st))
        return out

    def _spoken_head(self, head: list[int], cap: int, room: int, style: dict[str, str] | None) -> list[int]:
        """A first pass's head made to open speech where its words ended or were cut (see :meth:`_words`)."""
        opener = self.vocab.special(SPAN_TOKENS["speech"][0])
        ended = {self.vocab.special(END), self.vocab.special(EOS)}
        if head and head[-1] != opener:
            words = list(itertools.takewhile(lambda t: t not in ended, head))[:cap]  # cut at max_text_tokens
            if any(self.vocab.kind(t) == "text" for t in words) and len(words) + 1 < room:
                head = [*words, opener]
        return head + self._style_ids(style) if head and head[-1] == opener else head

    def _spoken(
        self,
        prompts: list[torch.Tensor],
        heads: list[list[int]],
        constraint: ModalityConstraint,
        cfg: DecodeConfig,
        rooms: list[int],
        gen: torch.Generator | None,
    ) -> list[list[int]]:
        """The second pass: each head (from :meth:`_words`) that opened speech continued into its clip, which ends
        the reply (the spoken_qa form: words, one clip; what a weak model would write after it is not the answer)."""
        opener = self.vocab.special(SPAN_TOKENS["speech"][0])
        rows = [i for i, h in enumerate(heads) if opener in h and len(h) < rooms[i]]
        out: list[list[int]] = [[] for _ in heads]
        if rows:
            row_rooms = [rooms[i] - len(heads[i]) for i in rows]
            more = self._decode_ids(
                [torch.cat([prompts[i], torch.tensor(heads[i], dtype=torch.long)]) for i in rows],
                constraint,
                replace(cfg, max_new_tokens=max(row_rooms)),
                None,
                row_rooms,
                gen,
                stop_at=self.vocab.special(SPAN_TOKENS["speech"][1]),
            )
            for i, m in zip(rows, more, strict=True):
                out[i] = m
        return out

    def _best_of(
        self, samples: Sequence[Sequence[Segment]], opts: GenerateOptions, options: dict[str, Any]
    ) -> list[list[Segment]]:
        """``opts.best_of`` replies per request, drawn or written, and each request's likeliest by the model itself.

        - **Text to image** (``output="image"``): the picture whose caption the model reads back likeliest. The LM
          reads pictures far better than it draws them, so reading a drawing back ranks candidates nearly as well
          as the truth would (0.295 of an oracle 0.300 on 200 test scenes). The request's text is the caption.
        - **Describing one picture** (``output="text"``, a request holding one picture): the text with the highest
          log p(text | request) + log p(picture | text), the reader and the drawer. The drawer asks whether the text
          accounts for the whole picture, so this is for descriptions (exact captions 0.645 -> 0.69 on 200 test
          scenes); it would prefer a describing answer to a terse one for any other question.
        - **Reading a text aloud** (``output="speech"``, a request "Say this: <text>", or another of the trained
          asks ``TTS_ASKS``): the clip in which the model hears the text likeliest, log p(text | clip). The LM hears
          far better than it speaks, so its ear tells a garbled clip from a clear one (tts_wer 0.44 -> 0.33 and
          0.54 -> 0.47 on 60 test sentences of two demo bundles). A request of another kind is refused: its words
          are not known before it is spoken.
        - **A spoken answer** (``output="text+speech"``): the answer is written once, then its clip is spoken
          ``best_of`` times and kept the same way, heard against the written words (:meth:`_best_spoken`).
        """
        if opts.continuation or opts.output not in ("image", "text", "speech", "text+speech"):
            raise OmnitokError(
                "best_of applies to text-to-image (output='image'), to describing one picture (output='text'), to "
                "reading a text aloud (output='speech') and to speaking a written answer (output='text+speech'), "
                f"got output={opts.output!r}" + (" with continuation" if opts.continuation else "")
            )
        if opts.output == "text+speech":
            return self._best_spoken(samples, opts)
        if opts.output == "speech":
            texts = [self._read_aloud(sample, i) for i, sample in enumerate(samples)]
            candidates = self._candidates(samples, opts, options, {"speech": READ_ALOUD_SAMPLING})
            scores = self._hear_back(
                [c for cs in candidates for c in cs], [t for t in texts for _ in range(opts.best_of)]
            )
        elif opts.output == "image":
            captions = [text_of(sample) for sample in samples]
            if not all(captions):
                raise OmnitokError("best_of reads each picture back against the request's text; a request has none")
            candidates = self._candidates(samples, opts, options, {"image": BEST_OF_SAMPLING})
            scores = self._read_back(
                [c for cs in candidates for c in cs], [c for c in captions for _ in range(opts.best_of)]
            )
        else:
            coded = [self._coded(sample, opts) for sample in samples]
            pictures = []
            for i, segs in enumerate(coded):
                found = [s for s in segs if isinstance(s, Image)]
                if len(found) != 1 or any(isinstance(s, Video) for s in segs):
                    raise OmnitokError(
                        f"best_of with output='text' re-ranks descriptions of one picture; request {i} holds "
                        f"{len(found)} pictures" + (" and a video" if any(isinstance(s, Video) for s in segs) else "")
                    )
                pictures.append(found[0].codes)
            candidates = self._candidates(coded, opts, options, {"text": DESCRIBE_SAMPLING})
            scores = self._describe_scores(coded, pictures, candidates)
        styles, refs = self._per_request(opts, len(samples))
        out = []
        for i, cs in enumerate(candidates):
            mine = scores[i * opts.best_of : (i + 1) * opts.best_of]
            kept = cs[max(range(len(cs)), key=mine.__getitem__)]  # a tie keeps the plain reply
            self._decode_media(kept, replace(opts, style=styles[i], reference=refs[i]))
            out.append(kept)
        return out

    def _best_spoken(self, samples: Sequence[Sequence[Segment]], opts: GenerateOptions) -> list[list[Segment]]:
        """best_of for spoken answers: one written answer, ``best_of`` clips of it, the one heard likeliest kept.

        The reply is decoded as these options give it (:meth:`_words`, :meth:`_spoken`); its words and the style
        tokens its clip starts with are then kept and the clip re-spoken ``best_of - 1`` times (all requests' rows
        in one batch, at the read-aloud sampling). Once the words are written they are the text a clip must say, so
        each clip is scored as a read-aloud clip is, log p(words | clip): the answer's content and voice are the
        plain one's, only how intelligibly it is said changes. A reply that wrote no words or spoke nothing is
        returned as it came.
        """
        styles, refs = self._per_request(opts, len(samples))
        prompts, constraint, cfg, _, rooms = self._plan(samples, opts, styles)
        gen = self._generator(opts.seed)
        heads = self._words(prompts, constraint, cfg, rooms, styles, gen, opts.max_text_tokens)
        plain = self._spoken(prompts, heads, constraint, cfg, rooms, gen)
        opener = self.vocab.special(SPAN_TOKENS["speech"][0])
        voice_ids = set(constraint.style_ids)
        mine = [replace(opts, style=st, reference=ref) for st, ref in zip(styles, refs, strict=True)]
        again: dict[int, list[int]] = {}  # request -> the head its samples share: words, opener, style tokens
        words: dict[int, str] = {}
        for i, (head, cont) in enumerate(zip(heads, plain, strict=True)):
            if opener not in head or not cont:
                continue
            said = text_of(self._render(head[: head.index(opener)], mine[i], [], media=False)).strip()
            shared = head + list(itertools.takewhile(voice_ids.__contains__, cont))
            if said and len(shared) < rooms[i]:
                again[i], words[i] = shared, said
        k = opts.best_of - 1
        asked = sorted(again)
        more: list[list[int]] = []
        if asked:
            seed = (0 if opts.seed is None else opts.seed) + 1  # the samples' generator, seeded after the request's
            more = self._spoken(
                [prompts[i] for i in asked for _ in range(k)],
                [again[i] for i in asked for _ in range(k)],
                constraint,
                replace(cfg, speech=READ_ALOUD_SAMPLING),
                [rooms[i] for i in asked for _ in range(k)],
                self._generator(seed),
            )
        out = []
        for i, (head, cont) in enumerate(zip(heads, plain, strict=True)):
            reply = self._render(head + cont, mine[i], [], media=False)
            if i in again:
                j = asked.index(i) * k
                cands = [reply, *(self._render(again[i] + m, mine[i], [], media=False) for m in more[j : j + k])]
                scores = self._hear_back(cands, [words[i]] * len(cands))
                reply = cands[max(range(len(cands)), key=scores.__getitem__)]  # a tie keeps the plain reply
            self._decode_media(reply, mine[i])
            out.append(reply)
        return out

    def _candidates(
        self,
        samples: Sequence[Sequence[Segment]],
        opts: GenerateOptions,
        options: dict[str, Any],
        sampling: dict[str, Sampling],
    ) -> list[list[list[Segment]]]:
        """Per request: the reply these options give, then ``best_of - 1`` samples.

        Every request's samples decode as one batch (rows request-major, one generator seeded after the request's
        seed), not one batch per candidate: on 2 cores 3.1x faster for one request (BENCHMARKS "Drawing several
        pictures").
        """
        plain = {**options, "best_of": 1}
        first = self._replies(samples, GenerateOptions(**plain), media=False)  # the kept one is decoded after
        k = opts.best_of - 1
        sampled = {**plain, **sampling, "seed": (0 if opts.seed is None else opts.seed) + 1}
        for key in ("style", "reference"):  # per-request lists follow their request's rows
            if isinstance(options.get(key), list):
                sampled[key] = [v for v in options[key] for _ in range(k)]
        more = self._replies([s for s in samples for _ in range(k)], GenerateOptions(**sampled), media=False)
        return [[first[i], *more[i * k : (i + 1) * k]] for i in range(len(samples))]

    def _describe_scores(
        self, coded: list[list[Segment]], pictures: list[np.ndarray], candidates: list[list[list[Segment]]]
    ) -> list[float]:
        """log p(text | request) + log p(picture | text) of every candidate, request-major (-inf: no text)."""
        texts = [[text_of(reply) for reply in cs] for cs in candidates]
        reader, drawer = [], []
        for segs, picture, ts in zip(coded, pictures, texts, strict=True):
            for t in ts:
                if t:
                    reader.append([*segs, Text(t, role="assistant")])
                    drawer.append([Text(t, role="user"), Image(codes=picture, role="assistant")])
        it = iter([a + b for a, b in zip(self.score(reader), self.score(drawer), strict=True)])
        return [next(it) if t else float("-inf") for ts in texts for t in ts]

    @staticmethod
    def _asked(sample: Sequence[Segment]) -> str:
        return text_of(sample) if isinstance(sample, Sequence) and not isinstance(sample, str | bytes) else ""

    @classmethod
    def _read_aloud_text(cls, sample: Sequence[Segment]) -> str | None:
        """The text a request asks to be read aloud: its text after one of the trained asks (``TTS_ASKS``, in any
        case: "say this: ..." is the same request to a user); None for a request of another kind."""
        asked = cls._asked(sample)
        for ask in (a.strip() for a in TTS_ASKS):
            if asked.casefold().startswith(ask.casefold()) and asked[len(ask) :].strip():
                return asked[len(ask) :].strip()
        return None

    @classmethod
    def _read_aloud(cls, sample: Sequence[Segment], i: int) -> str:
        """:meth:`_read_aloud_text`, for best_of, which needs one: a request of another kind is refused."""
        said = cls._read_aloud_text(sample)
        if said is not None:
            return said
        asked = cls._asked(sample)
        raise OmnitokError(
            f"best_of with output='speech' keeps the clip in which the model hears the text it was asked to read; "
            f"request {i} asks {asked[:60]!r}, which does not start with one of {[a.strip() for a in TTS_ASKS]} "
            "followed by the text"
        )

    def _hear_back(self, replies: list[list[Segment]], texts: list[str]) -> list[float]:
        """Log-probability of each text as the LM's transcript of the reply's clip (HEAR_BACK_ASK)."""
        return self._understood(replies, texts, Audio, HEAR_BACK_ASK)

    def _read_back(self, replies: list[list[Segment]], captions: list[str]) -> list[float]:
        """Log-probability of each caption as the LM's answer to READ_BACK_ASK about the reply's picture."""
        return self._understood(replies, captions, Image, READ_BACK_ASK)

    def _understood(
        self, replies: list[list[Segment]], texts: list[str], kind: type[Image] | type[Audio], ask: str
    ) -> list[float]:
        """log p(text | the reply's first picture or clip given back to the LM with ``ask``), one per reply."""
        made = [
            next((s for s in r if isinstance(s, kind) and s.codes is not None and len(s.codes)), None) for r in replies
        ]
        asks = [
            [kind(codes=m.codes, role="user"), Text(ask, role="user"), Text(t, role="assistant")]
            for m, t in zip(made, texts, strict=True)
            if m is not None
        ]
        it = iter(self.score(asks))
        return [float("-inf") if m is None else next(it) for m in made]  # nothing made: never preferred

    def score(self, samples: Sequence[Sequence[Segment]]) -> list[float]:
        """How likely the model finds each sample's assistant turn: its tokens' log-probabilities, summed.

        Why: to rank answers with the model itself, as ``best_of`` reads a drawing back against its caption, or as
        ``benchmarks/caption_rerank.py`` asks how likely a picture is drawn from a caption. Samples are tokenized
        as in training (pictures and speech given as pixels or samples are encoded first); each needs a segment
        with role "assistant", the part scored.
        """
        encs = []
        for k, sample in enumerate(samples):
            segs = [replace(s) for s in sample]  # the caller's segments stay as they were; codes go on the copies
            self.media([segs])
            enc = encode(segs, self.vocab, self.bundle.text)
            if not np.any(enc.mask):
                raise OmnitokError(f"score: sample {k} has no segment with role 'assistant' to score")
            encs.append(enc)
        device = next(self.lm.parameters()).device
        out: list[float] = []
        for lo in range(0, len(encs), SCORE_ROWS):  # [rows, length, vocabulary] log-probs: bounded rows a pass
            chunk = encs[lo : lo + SCORE_ROWS]
            width = max(len(e.ids) for e in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            attn = torch.zeros_like(ids)
            keep = torch.zeros((len(chunk), width - 1), dtype=torch.bool)
            for i, e in enumerate(chunk):
                ids[i, : len(e.ids)] = torch.as_tensor(e.ids)
                attn[i, : len(e.ids)] = 1
                keep[i, : len(e.ids) - 1] = torch.as_tensor(e.mask[1:], dtype=torch.bool)
            ids, attn, keep = ids.to(device), attn.to(device), keep.to(device)
            with torch.inference_mode():
                logp = self.lm(input_ids=ids, attention_mask=attn).logits[:, :-1].float().log_softmax(-1)
            tok = logp.gather(-1, ids[:, 1:, None])[..., 0]
            out += torch.where(keep, tok, 0.0).sum(-1).tolist()
        return out

    def stream(self, sample: Sequence[Segment], **options: Any) -> Iterator[TextDelta | AudioChunk | ImageOut]:
        """Yield text as it is written and speech as audio chunks every ``speech_chunk_frames`` frames."""
        opts = GenerateOptions(**options)
        if opts.best_of != 1:
            raise OmnitokError("best_of picks among finished pictures, so it cannot stream; use generate")
        coded = self._coded(sample, opts)
        ids, constraint, script = self._request(coded, opts)
        uncond = self._uncond_rows([coded], opts) if opts.output == "text" else None  # pictures stream unguided
        if script is not None:
            constraint = constraint.scripted([script])
        joined = script is not None  # the read-aloud layout: its spans are one clip, its placed words not the reply
        gen = self._generator(opts.seed)
        speech_tok = self.bundle.speech
        levels = self.vocab.levels("speech") if "speech" in self.vocab.modalities else 1
        text_ids: list[int] = []
        emitted_text = ""
        frames: list[int] = []
        emitted_samples = 0
        style = opts.style
        image_ids: list[int] = []
        t0 = time.perf_counter()
        prefix = self._forced_prefix(ids)
        in_speech = bool(prefix) and prefix[0] == self.vocab.special(SPAN_TOKENS["speech"][0])

        def speech_audio(final: bool) -> Iterator[AudioChunk]:
            nonlocal emitted_samples
            n_frames = len(frames) // levels
            if speech_tok is None or n_frames == 0:
                return
            if not final and n_frames % opts.speech_chunk_frames:
                return
            codes = self.vocab.ids_to_codes("speech", frames[: n_frames * levels])
            audio = np.asarray(speech_tok.decode(codes, style=style), dtype=np.float32)
            # each chunk re-decodes with full left context and emits only the new part (no seams)
            keep = len(audio) if final else max(emitted_samples, len(audio) - int(0.05 * speech_tok.sample_rate))
            if keep > emitted_samples:
                yield AudioChunk(audio[emitted_samples:keep], int(speech_tok.sample_rate), time.perf_counter() - t0)
                emitted_samples = keep

        cfg = self._fit(self._config(opts), [ids], uncond, opts.output)[0]
        for tok, state in self._stream_ids(ids, constraint, cfg, gen, opts, uncond):
            kind = self.vocab.kind(tok)
            if joined and kind != "speech":  # placed words, inner closers and openers, end of turn
                continue
            if kind == "text":
                text_ids.append(tok)
                text = self.bundle.text.decode(text_ids)
                if len(text) > len(emitted_text) and not text.endswith("\ufffd"):
                    yield TextDelta(text[len(emitted_text) :])
                    emitted_text = text
            elif tok == self.vocab.special(SPAN_TOKENS["speech"][0]):
                in_speech, frames, emitted_samples = True, [], 0
            elif in_speech and kind == "speech":
                frames.append(tok)
                if state == SPEECH_CODE0:  # a frame just completed
                    yield from speech_audio(final=False)
            elif in_speech and kind == "special" and self.vocab.special_name(tok).startswith("<|"):
                field_name, value = self.vocab.special_name(tok)[2:-2].split(":", 1)
                style = {**(style or {}), field_name: value}
            elif tok == self.vocab.special(SPAN_TOKENS["speech"][1]):
                yield from speech_audio(final=True)
                in_speech = False
            elif kind == "image":
                image_ids.append(tok)
            elif tok == self.vocab.special(SPAN_TOKENS["image"][1]) and self.bundle.image is not None:
                codes = self.vocab.ids_to_codes("image", image_ids)
                yield ImageOut(np.asarray(self.bundle.image.decode(torch.as_tensor(codes))))
                image_ids = []
        if in_speech:
            yield from speech_audio(final=True)
        if text_ids:  # bytes held back as an incomplete UTF-8 character are sent at the end, as they decode
            text = self.bundle.text.decode(text_ids)
            if len(text) > len(emitted_text):
                yield TextDelta(text[len(emitted_text) :])

    def _stream_ids(
        self,
        ids: torch.Tensor,
        constraint: ModalityConstraint,
        cfg: DecodeConfig,
        gen: torch.Generator | None,
        opts: GenerateOptions,
        uncond: list[torch.Tensor] | None = None,
    ) -> Iterator[tuple[int, int]]:
        """(token, automaton state) as they are decoded; a spoken answer (``output="text+speech"``) is decoded in
        the two passes of :meth:`_words`, so the request's style tokens follow ``<speech>`` as they do there.
        ``uncond``: the guidance row of a text reply (:meth:`_uncond_rows`), as :meth:`generate` decodes it."""
        if opts.output != "text+speech":
            for tokens, st in iter_decode(self.lm, [ids], constraint, cfg, uncond, gen):
                yield int(tokens[0]), int(st["state"][0])
            return
        opener = self.vocab.special(SPAN_TOKENS["speech"][0])
        ended = {self.vocab.special(END), self.vocab.special(EOS)}
        cap = opts.max_text_tokens if opts.max_text_tokens is not None else cfg.max_new_tokens
        head: list[int] = []
        for tokens, st in iter_decode(self.lm, [ids], constraint, cfg, None, gen):
            t = int(tokens[0])
            head.append(t)
            if t in ended:  # held back: words that end here are spoken all the same (_spoken_head)
                break
            yield t, int(st["state"][0])
            if t == opener or len(head) >= cap:
                break
        asked = opts.style if isinstance(opts.style, dict) else None
        spoken = self._spoken_head(head, cap, cfg.max_new_tokens, asked)
        if opener not in spoken:  # no words to speak, or no room for a clip: the reply is whole
            if head and head[-1] in ended:
                yield head[-1], DONE
            return
        if head[-1] != opener:  # words that ended or were cut: <speech> as _words opens it
            yield opener, SPEECH_START
        for t in spoken[spoken.index(opener) + 1 :]:  # the style tokens _spoken_head placed after it
            yield t, SPEECH_START
        head = spoken
        if len(head) < cfg.max_new_tokens:
            rest = replace(cfg, max_new_tokens=cfg.max_new_tokens - len(head))
            prompt_ids = torch.cat([ids, torch.tensor(head, dtype=torch.long)])
            closer = self.vocab.special(SPAN_TOKENS["speech"][1])
            for tokens, st in iter_decode(self.lm, [prompt_ids], constraint, rest, None, gen):
                yield int(tokens[0]), int(st["state"][0])
                if int(tokens[0]) == closer:  # the clip ends the reply, as in _spoken
                    break


def load(path: str | os.PathLike[str], device: str = "cpu") -> OmniModel:
    """``omnitok.load(path)``: a bundle directory -> a model that reads and writes every modality."""
    return OmniModel(load_bundle(path, device))
