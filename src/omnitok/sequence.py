"""Samples <-> one token stream: the chat template, loss masks, and the inverse parse of generated ids.

Layout of one encoded sample::

    <|bos|> [<|user|> ... <|end|>] [<|assistant|> ... <|end|>] ... <|eos|>
    image:  <image> c c c ... </image>
    speech: <speech> [<|voice:v|> <|pitch:p|> <|rate:r|>] c c ... </speech>
    video:  <video> <frame> c c ... <frame> c c ... </video>

    a clip read aloud from known words (``Audio.words``, encoded with ``read_aloud_words`` = k > 0):
            w1 w2 <speech> [style] c c ... </speech> w3 <speech> c c ... </speech> ... <speech> c c ... </speech>

In the read-aloud layout the words are cut into chunks of k, each placed one chunk ahead of the part of the clip
that says it: the clip is cut where each chunk's first word starts (``Audio.word_onsets``, which the toy world
records from eSpeak's word events, and ``MediaEncoder`` aligns through the speech tokenizer's phone head for a clip
that has only its phonemes), or, for a clip without onsets, its frames are shared out in proportion to the chunks'
characters.
Why: a TTS clip after its whole text lost its place in the sentence (fluent speech of another sentence); with the
words beside their speech the same LM at the same steps misread half as many words (docs/BENCHMARKS.md "What the
demo's clips get wrong"). The words are never training targets there: at generation they are the request's own,
placed by the decoder (``omnitok.generate``), and the LM only speaks each chunk and closes its span.

Segments without a role (pre-training documents) are written without turn markers. The loss mask decides
what the model is taught to *produce*: in SFT only the assistant's turns (their content, closers and the end
of turn), in pre-training everything; each modality can be switched off separately. Role markers themselves
are never targets: at inference they are part of the prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from omnitok.errors import OmnitokError, is_int, is_number
from omnitok.vocab import (
    BOS,
    END,
    EOS,
    FRAME,
    ROLE_TOKENS,
    SPAN_TOKENS,
    Vocabulary,
    parse_style_token,
    style_token,
)

ROLES = tuple(ROLE_TOKENS)
STYLE_FIELDS = ("voice", "pitch", "rate")
# Words a chunk in the read-aloud layout, as measured: two words one chunk ahead of their speech (docs/BENCHMARKS.md
# "What the demo's clips get wrong"). The pipeline's default; 0 in pretokenization writes the plain layout.
READ_ALOUD_WORDS = 2


class TextCodec(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class Text:
    text: str
    role: str | None = None


@dataclass
class Image:
    """An image as pixels (HxWx3 uint8) and/or as codes from an image tokenizer ([N] or [N, levels])."""

    codes: np.ndarray | None = None
    role: str | None = None
    pixels: np.ndarray | None = None


@dataclass
class Audio:
    """Speech as samples (with their rate) and/or codes; ``style`` (voice/pitch/rate) is emitted as tokens.

    ``words``: the text the clip says when it is a text read aloud; encoded in the read-aloud layout (module
    docstring) where the encoding asks for it, as one plain span otherwise. ``word_onsets``: where each of its
    white-space words starts, as a fraction of the clip (the synthesiser's word events); the layout then cuts the
    clip at its chunks' first words instead of sharing its frames out by characters. ``phonemes``: eSpeak's
    phonemes of the same words (as the world's records hold them), from which ``MediaEncoder`` aligns the words
    itself where no onsets are given (``omnitok.tokenizers.align``)."""

    codes: np.ndarray | None = None
    role: str | None = None
    style: dict[str, str] | None = None
    samples: np.ndarray | None = None
    sample_rate: int | None = None
    words: str | None = None
    word_onsets: Sequence[float] | None = None
    phonemes: str | None = None


@dataclass
class Video:
    """A clip as per-frame image codes (and/or frames as pixels)."""

    frames: list[np.ndarray] = field(default_factory=list)
    role: str | None = None
    pixels: list[np.ndarray] | None = None


Segment = Text | Image | Audio | Video
MODALITY_OF = {Text: "text", Image: "image", Audio: "speech", Video: "video"}


@dataclass(frozen=True)
class LossPolicy:
    """Which tokens are targets: ``roles=None`` trains on every token (pre-training)."""

    roles: frozenset[str] | None = frozenset({"assistant"})
    modalities: frozenset[str] = frozenset({"text", "image", "speech", "video"})

    @staticmethod
    def pretraining(modalities: Sequence[str] = ("text", "image", "speech", "video")) -> LossPolicy:
        return LossPolicy(roles=None, modalities=frozenset(modalities))


@dataclass
class Encoded:
    ids: np.ndarray  # int64 [T]
    mask: np.ndarray  # uint8 [T], 1 = training target

    def __len__(self) -> int:
        return len(self.ids)


def _segment_tokens(seg: Segment, vocab: Vocabulary, text: TextCodec) -> list[int]:
    if isinstance(seg, Text):
        return list(text.encode(seg.text))
    if isinstance(seg, Image):
        if seg.codes is None:
            raise OmnitokError("Image segment has no codes: run the image tokenizer before encoding the sample")
        open_, close = SPAN_TOKENS["image"]
        return [vocab.special(open_), *vocab.codes_to_ids("image", seg.codes), vocab.special(close)]
    if isinstance(seg, Audio):
        if seg.codes is None:
            raise OmnitokError("Audio segment has no codes: run the speech tokenizer before encoding the sample")
        open_, close = SPAN_TOKENS["speech"]
        codes = vocab.codes_to_ids("speech", seg.codes)
        return [vocab.special(open_), *_style_ids(seg, vocab), *codes, vocab.special(close)]
    if isinstance(seg, Video):
        if not seg.frames:
            raise OmnitokError("Video segment has no frame codes: run the image tokenizer on its frames first")
        open_, close = SPAN_TOKENS["video"]
        ids = [vocab.special(open_)]
        for frame in seg.frames:
            ids += [vocab.special(FRAME), *vocab.codes_to_ids("image", frame)]
        return [*ids, vocab.special(close)]
    raise OmnitokError(f"unknown segment type {type(seg).__name__}")


def _style_ids(seg: Audio, vocab: Vocabulary) -> list[int]:
    return [vocab.special(style_token(f, seg.style[f])) for f in STYLE_FIELDS if seg.style and f in seg.style]


def read_aloud_chunks(words: str, per_chunk: int) -> list[str]:
    """``words`` cut into chunks of ``per_chunk`` words, each after the first with its leading space (so the chunks
    tokenize as the running text does); [] for no words. Shared by the encoding and generation, so both cut alike."""
    if not is_int(per_chunk) or per_chunk < 1:
        raise OmnitokError(f"read_aloud_words must be an int >= 1, got {per_chunk!r}")
    ws = words.split()
    return [(" " if i else "") + " ".join(ws[i : i + per_chunk]) for i in range(0, len(ws), per_chunk)]


def _read_aloud_cuts(chunks: list[str], per_chunk: int, frames: int, onsets: Sequence[float] | None) -> list[int]:
    """Where each chunk's speech ends, in frames (the last at the clip's end), at least one frame a chunk. With
    the words' onsets a chunk ends where the next chunk's first word starts; without, the frames are shared out in
    proportion to the chunks' characters (a guess: eSpeak's pauses and long words put its cuts off by a word's
    part, docs/BENCHMARKS.md "Cutting a clip at its words")."""
    n = len(chunks)
    if onsets is None:
        chars = np.cumsum([len(c) for c in chunks]) / sum(len(c) for c in chunks)
        return (np.arange(1, n + 1) + np.round(chars * (frames - n)).astype(int)).tolist()
    n_words = sum(len(c.split()) for c in chunks)
    o = np.asarray(onsets, dtype=np.float64)
    if o.shape != (n_words,) or not np.all(np.isfinite(o)) or o.min() < 0 or o.max() > 1 or np.any(np.diff(o) < 0):
        raise OmnitokError(
            f"word_onsets: expected {n_words} non-decreasing fractions of the clip in [0, 1], one per word, "
            f"got {o.tolist()[:8]}{'...' if o.size > 8 else ''} ({o.size} values)"
        )
    cuts, lo = [], 0
    for i in range(1, n):
        hi = round(o[i * per_chunk] * frames)
        lo = min(max(hi, lo + 1), frames - (n - i))  # every chunk keeps a frame, and so does every chunk after it
        cuts.append(lo)
    return [*cuts, frames]


def _read_aloud_tokens(seg: Audio, vocab: Vocabulary, text: TextCodec, per_chunk: int) -> tuple[list[int], list[int]]:
    """A clip with its words beside it (module docstring): ``(ids, is_word)``, the words flagged so they are no
    target. A clip with fewer frames than chunks cannot give each chunk its own speech, and stays one plain span."""
    chunks = read_aloud_chunks(seg.words or "", per_chunk)
    codes = np.asarray(seg.codes)
    levels = vocab.levels("speech")
    frames = len(codes) if codes.ndim == 1 else codes.shape[0]
    ids = [int(t) for t in vocab.codes_to_ids("speech", codes)]
    if not chunks or frames < len(chunks):
        toks = _segment_tokens(seg, vocab, text)
        return toks, [0] * len(toks)
    open_, close = (vocab.special(t) for t in SPAN_TOKENS["speech"])
    cuts = _read_aloud_cuts(chunks, per_chunk, frames, seg.word_onsets)
    words = [list(text.encode(c)) for c in chunks]
    out, is_word = list(words[0]), [1] * len(words[0])
    lo = 0
    for i, hi in enumerate(cuts):
        ahead = words[i + 1] if i + 1 < len(chunks) else []
        span = [open_, *(_style_ids(seg, vocab) if i == 0 else []), *ids[lo * levels : hi * levels], close]
        out += ahead + span
        is_word += [1] * len(ahead) + [0] * len(span)
        lo = hi
    return out, is_word


def _turns(sample: Sequence[Segment]) -> list[tuple[str | None, list[Segment]]]:
    turns: list[tuple[str | None, list[Segment]]] = []
    for seg in sample:
        if seg.role is not None and seg.role not in ROLES:
            raise OmnitokError(f"segment role must be one of {list(ROLES)} or None, got {seg.role!r}")
        if turns and turns[-1][0] == seg.role:
            turns[-1][1].append(seg)
        else:
            turns.append((seg.role, [seg]))
    return turns


def encode(
    sample: Sequence[Segment],
    vocab: Vocabulary,
    text: TextCodec,
    policy: LossPolicy = LossPolicy(),
    add_eos: bool = True,
    read_aloud_words: int = 0,
) -> Encoded:
    """Tokenise a sample (its media already carry codes) into ids and a loss mask.

    ``read_aloud_words``: k > 0 writes clips that carry their ``words`` in the read-aloud layout, k words a chunk
    (module docstring); 0 writes every clip as one span."""
    if not sample:
        raise OmnitokError("cannot encode an empty sample")
    ids: list[int] = [vocab.special(BOS)]
    mask: list[int] = [0]
    last_trained = False
    for role, segs in _turns(sample):
        trained_turn = policy.roles is None or role in policy.roles
        if role is not None:
            ids.append(vocab.special(ROLE_TOKENS[role]))
            mask.append(0)
        for seg in segs:
            on = trained_turn and MODALITY_OF[type(seg)] in policy.modalities
            if read_aloud_words and isinstance(seg, Audio) and seg.words and seg.codes is not None:
                toks, is_word = _read_aloud_tokens(seg, vocab, text, read_aloud_words)
                mask += [int(on and not w) for w in is_word]
            else:
                toks = _segment_tokens(seg, vocab, text)
                mask += [int(on)] * len(toks)
            ids += toks
        if role is not None:
            ids.append(vocab.special(END))
            mask.append(int(trained_turn))
        last_trained = trained_turn
    if add_eos:
        ids.append(vocab.special(EOS))
        mask.append(int(last_trained))
    return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8))


def prompt(sample: Sequence[Segment], vocab: Vocabulary, text: TextCodec, respond_as: str = "assistant") -> np.ndarray:
    """Ids that ask the model for the next turn: the encoded sample without EOS, then the role marker."""
    ids = encode(sample, vocab, text, LossPolicy(roles=frozenset()), add_eos=False).ids
    return np.concatenate([ids, [vocab.special(ROLE_TOKENS[respond_as])]]).astype(np.int64)


class MediaEncoder:
    """Fills ``codes`` of Image/Video/Audio segments using the given tokenizers (all images in one batch).

    Shared by pretokenization and generation so a prompt is tokenized exactly like the training data.
    ``align_words``: a clip read aloud (``Audio.words``) with no ``word_onsets`` but its ``phonemes`` also gets
    its words' onsets, aligned through the speech tokenizer's phone CTC head (``omnitok.tokenizers.align``), so
    the read-aloud layout cuts it at its words rather than by characters.
    """

    def __init__(self, image_tokenizer: Any | None, speech_tokenizer: Any | None, align_words: bool = True) -> None:
        self.image = image_tokenizer
        self.speech = speech_tokenizer
        self.align_words = align_words
        self.aligned = {"aligned": 0, "by_characters": 0}  # clips read aloud that had no onsets, by how they are cut

    def __call__(self, samples: list[list[Segment]]) -> None:
        pending: list[tuple[Any, int | None, np.ndarray]] = []  # (segment, frame index, pixels)
        audio: list[Audio] = []
        # Segments holding the very same array (one world sample's picture or clip in several tasks: caption and
        # t2i, ASR and TTS) are encoded once: half the scene kind's encoding in pretokenization.
        same_image: dict[int, list[Image]] = {}
        same_audio: dict[int, list[Audio]] = {}
        for sample in samples:
            for seg in sample:
                if isinstance(seg, Image) and seg.codes is None:
                    if seg.pixels is None:
                        raise OmnitokError("Image segment has neither codes nor pixels")
                    if id(seg.pixels) in same_image:
                        same_image[id(seg.pixels)].append(seg)
                        continue
                    same_image[id(seg.pixels)] = [seg]
                    pending.append((seg, None, seg.pixels))
                elif isinstance(seg, Video) and not seg.frames:
                    if not seg.pixels:
                        raise OmnitokError("Video segment has neither frame codes nor frames")
                    seg.frames = [np.empty(0)] * len(seg.pixels)
                    pending += [(seg, i, px) for i, px in enumerate(seg.pixels)]
                elif isinstance(seg, Audio) and seg.codes is None:
                    if seg.samples is None or seg.sample_rate is None:
                        raise OmnitokError("Audio segment has neither codes nor samples with a sample rate")
                    rate = seg.sample_rate
                    if not is_number(rate) or rate != int(rate) or rate <= 0:
                        raise OmnitokError(f"Audio segment: sample_rate must be a whole number of Hz > 0, got {rate!r}")
                    if self.speech is None:
                        raise OmnitokError("the input has speech but this model has no speech tokenizer")
                    if id(seg.samples) in same_audio:
                        same_audio[id(seg.samples)].append(seg)
                        continue
                    same_audio[id(seg.samples)] = [seg]
                    audio.append(seg)
        self._encode_audio(audio)
        for segs in same_audio.values():
            for seg in segs[1:]:
                seg.codes = segs[0].codes
        if self.align_words and self.speech is not None:
            self._align(seg for sample in samples for seg in sample if isinstance(seg, Audio))
        if pending:
            if self.image is None:
                raise OmnitokError("the input has an image but this model has no image tokenizer")
            by_shape: dict[tuple[int, ...], list[tuple[Any, int | None, np.ndarray]]] = {}
            for item in pending:  # one batch per picture size: a wrong size is then refused by name, not by stack
                by_shape.setdefault(tuple(np.shape(item[2])), []).append(item)
            for group in by_shape.values():
                codes = np.asarray(self.image.encode(np.stack([p for _, _, p in group])))
                for (seg, i, _), c in zip(group, codes, strict=True):
                    if i is None:
                        seg.codes = c
                    else:
                        seg.frames[i] = c
            for images in same_image.values():
                for seg in images[1:]:
                    seg.codes = images[0].codes

    def _align(self, segs: Iterable[Audio]) -> None:
        from omnitok.tokenizers.align import align_words

        for seg in segs:
            if seg.words and seg.word_onsets is None and seg.phonemes and seg.codes is not None:
                seg.word_onsets = align_words(self.speech, np.asarray(seg.codes), seg.words, seg.phonemes)
                self.aligned["aligned" if seg.word_onsets is not None else "by_characters"] += 1

    def _encode_audio(self, segs: list[Audio], chunk: int = 16) -> None:
        """Clips of similar length are encoded together (batched tokenizers pad to the longest)."""
        batched = getattr(self.speech, "encode_batch", None)
        if batched is None:
            for seg in segs:
                seg.codes = np.asarray(self.speech.encode(seg.samples, seg.sample_rate))
            return
        for rate in sorted({int(s.sample_rate) for s in segs}):  # type: ignore[arg-type]
            same = sorted((s for s in segs if s.sample_rate == rate), key=lambda s: len(s.samples))  # type: ignore[arg-type]
            for i in range(0, len(same), chunk):
                group = same[i : i + chunk]
                for seg, codes in zip(group, batched([s.samples for s in group], rate), strict=True):
                    seg.codes = np.asarray(codes)


# --- inverse parse ------------------------------------------------------------------------------------


def decode(ids: Sequence[int] | np.ndarray, vocab: Vocabulary, text: TextCodec) -> list[Segment]:
    """Generated ids back into segments; lenient with truncation (an unclosed span keeps what it has).

    Ids that cannot occur where they stand (a speech code inside an image span, a stray closer) end the
    current span and are dropped, so a half-trained model's output still parses into something inspectable.
    """
    role_of = {vocab.special(t): r for r, t in ROLE_TOKENS.items()}
    opens = {vocab.special(o): m for m, (o, _) in SPAN_TOKENS.items()}
    closes = {vocab.special(c): m for m, (_, c) in SPAN_TOKENS.items()}
    frame_id = vocab.special(FRAME)
    out: list[Segment] = []
    role: str | None = None
    text_buf: list[int] = []
    span: str | None = None
    span_ids: list[int] = []
    style: dict[str, str] = {}
    frames: list[list[int]] = []

    def flush_text() -> None:
        if text_buf:
            out.append(Text(text.decode(text_buf), role))
            text_buf.clear()

    def flush_span() -> None:
        nonlocal span
        if span == "image" and span_ids:
            out.append(Image(codes=_codes(vocab, "image", span_ids), role=role))
        elif span == "speech":
            out.append(Audio(codes=_codes(vocab, "speech", span_ids), role=role, style=dict(style) or None))
        elif span == "video":
            fr = [_codes(vocab, "image", f) for f in frames if f]
            out.append(Video(frames=fr, role=role))
        span = None
        span_ids.clear()
        style.clear()
        frames.clear()

    for tok in (int(t) for t in np.asarray(ids).reshape(-1)):
        kind = vocab.kind(tok) if 0 <= tok < vocab.size else "invalid"
        if span is not None:
            if tok in closes and closes[tok] == span:
                flush_span()
                continue
            style_field = parse_style_token(vocab.special_name(tok) or "") if kind == "special" else None
            if span == "speech" and style_field and not span_ids:
                style[style_field[0]] = style_field[1]
                continue
            if span == "video" and tok == frame_id:
                frames.append([])
                continue
            if span == "video" and kind == "image" and frames:
                frames[-1].append(tok)
                continue
            if span in ("image", "speech") and kind == span:
                span_ids.append(tok)
                continue
            flush_span()  # anything else ends the span; fall through to handle the token normally
        if kind == "text":
            text_buf.append(tok)
        elif tok in opens:
            flush_text()
            span = opens[tok]
        elif tok in role_of:
            flush_text()
            role = role_of[tok]
        elif tok == vocab.special(END):
            flush_text()
            role = None
        elif tok == vocab.special(EOS):
            break
        # BOS, PAD, stray codes and closers carry no content
    if span is not None:
        flush_span()
    flush_text()
    return out


def _codes(vocab: Vocabulary, modality: str, ids: list[int]) -> np.ndarray:
    q = vocab.levels(modality)
    usable = len(ids) - len(ids) % q  # a truncated last frame of a multi-level codec is dropped
    return vocab.ids_to_codes(modality, ids[:usable]) if usable else np.zeros((0,) if q == 1 else (0, q), np.int64)


def text_of(segments: Sequence[Segment]) -> str:
    """A sample's text segments joined by spaces: what a reply says, or what a request asks, as one string."""
    return " ".join(s.text for s in segments if isinstance(s, Text)).strip()


def describe(segments: Sequence[Segment]) -> list[dict[str, Any]]:
    """A JSON-friendly summary of segments (for logs and reports)."""
    out: list[dict[str, Any]] = []
    for s in segments:
        d: dict[str, Any] = {"type": MODALITY_OF[type(s)], "role": s.role}
        if isinstance(s, Text):
            d["text"] = s.text
        elif isinstance(s, Image | Audio) and s.codes is not None:
            d["tokens"] = int(np.asarray(s.codes).size)
        if isinstance(s, Audio) and s.style:
            d["style"] = s.style
        if isinstance(s, Video):
            d["frames"] = len(s.frames)
        out.append(d)
    return out
