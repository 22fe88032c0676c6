"""The style instrument: which pitch class and which speaking-rate class a clip was spoken at.

Pitch and rate classes in the toy world are relative to the voice (eSpeak's ``pitch`` and ``rate`` parameters
shift a voice's own base), so absolute thresholds cannot work: a high-pitched male voice sits below a
low-pitched female one. Both classifiers therefore compare a clip with *references measured on eSpeak's own
audio of the same voice*:

* **pitch**: the clip's median F0 (:func:`omnitok.world.speech.estimate_f0`) against the voice's per-class F0
  centroids (median over reference sentences, nearest in log frequency). Given the clip's ``text``, the
  references are that very sentence spoken at each pitch class, which removes sentence-to-sentence intonation
  differences.
* **rate**: the clip's active duration (first to last frame within 35 dB of its loudest 10 ms frame) against
  the same text spoken by the same voice at each rate class, nearest in log duration. A duration ratio rather
  than a phone rate, because it needs no phone recogniser and is insensitive to accent differences in phone
  counts.

The instrument uses eSpeak and the YIN estimator only, never a learned model, so it can score generated
speech (``tts_style_acc``) without sharing parts with the model under test.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from omnitok.errors import OmnitokError

_ACTIVE_DB = 35.0
_FRAME_S = 0.010


def _check_audio(audio: Any, sample_rate: Any, what: str) -> np.ndarray:
    if not isinstance(audio, np.ndarray):
        raise OmnitokError(f"{what}: expected a numpy array of samples, got {type(audio).__name__}")
    x = audio.reshape(-1) if audio.ndim == 2 and 1 in audio.shape else audio
    if x.ndim != 1:
        raise OmnitokError(f"{what}: expected mono audio (1-D), got shape {list(audio.shape)}")
    if x.size == 0:
        raise OmnitokError(f"{what}: got empty audio (0 samples)")
    if not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
        raise OmnitokError(f"{what}: sample_rate must be a positive int, got {sample_rate!r}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise OmnitokError(f"{what}: audio contains NaN or infinity")
    return x


def active_duration(audio: np.ndarray, sample_rate: int) -> float:
    """Seconds from the first to the last 10 ms frame within 35 dB of the loudest frame (0 for silence)."""
    x = _check_audio(audio, sample_rate, "active_duration")
    hop = max(1, int(sample_rate * _FRAME_S))
    n = x.size // hop
    if n == 0:
        return 0.0
    rms = np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(1))
    peak = rms.max()
    if peak <= 1e-6:
        return 0.0
    active = np.nonzero(rms > peak * 10 ** (-_ACTIVE_DB / 20))[0]
    return float((active[-1] - active[0] + 1) * hop / sample_rate)


def median_f0(audio: np.ndarray, sample_rate: int) -> float:
    """Median F0 in Hz (NaN if nothing voiced), via the world's YIN estimator."""
    from omnitok.world.speech import estimate_f0

    return estimate_f0(_check_audio(audio, sample_rate, "median_f0"), int(sample_rate))


def _nearest(value: float, table: dict[str, float]) -> str:
    return min(table, key=lambda k: abs(math.log(value) - math.log(table[k])))


class StyleReference:
    """Per-voice F0 centroids per pitch class, plus on-demand eSpeak references for a given sentence.

    Build with :meth:`fit` (synthesises reference sentences) or from a saved :meth:`to_dict`. Sentence-level
    references are synthesised lazily with eSpeak and cached, so scoring many clips of few sentences is cheap.
    """

    def __init__(
        self,
        f0: dict[str, dict[str, float]],
        pitches: Sequence[str] | None = None,
        rates: Sequence[str] | None = None,
        speaker: Any = None,
        lazy: tuple[Sequence[str], Sequence[str], str] | None = None,
    ) -> None:
        from omnitok.world.speech import PITCHES, RATES

        if not f0 and not lazy:
            raise OmnitokError("StyleReference: empty F0 table; build it with StyleReference.fit(...)")
        self.f0 = {v: {p: float(hz) for p, hz in t.items()} for v, t in f0.items()}
        self.pitches = list(pitches or PITCHES)
        self.rates = list(rates or RATES)
        self._speaker = speaker
        self._cache: dict[tuple[str, str, str, str], np.ndarray] = {}
        # (texts, voices, rate) of a fit deferred to each voice's first need (``fit(lazy=True)``)
        self._lazy = lazy

    # --- construction
    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        voices: Iterable[str] | None = None,
        speaker: Any = None,
        rate: str = "normal",
        lazy: bool = False,
    ) -> StyleReference:
        """Speak each of ``texts`` with every voice at every pitch class (at ``rate``) and keep F0 centroids.

        ``lazy``: fit a voice's centroids only when they are first needed. Classifying a clip *with* its text
        compares it with that sentence's own references and needs the centroids only if eSpeak's renderings of the
        sentence are unvoiced, so an evaluation that always has the text need not pay for the whole table (8.5 s of
        the TTS task's 11 s share on a 2-core Xeon: every voice x pitch x text synthesised and analysed).
        """
        from omnitok.world.speech import VOICES, Speaker

        if isinstance(texts, str) or not texts:
            raise OmnitokError("StyleReference.fit: expected a non-empty list of sentences")
        speaker = speaker or Speaker()
        names = list(voices) if voices is not None else [v.name for v in VOICES]
        ref = cls({}, speaker=speaker, lazy=(list(texts), names, rate))
        if not lazy:
            for v in names:
                ref._voice_table(v)
            ref._lazy = None
        return ref

    def _fit_voice(self, voice: str) -> dict[str, float]:
        from omnitok.world.speech import PITCHES, Style

        assert self._lazy is not None
        texts, _, rate = self._lazy
        table = {}
        for p in PITCHES:
            vals = [median_f0(self._speaker_().synthesize(t, Style(voice, p, rate)), 16000) for t in texts]
            vals = [f for f in vals if math.isfinite(f)]
            if not vals:
                raise OmnitokError(f"StyleReference.fit: no voiced frames for voice {voice!r} pitch {p!r}")
            table[p] = float(np.exp(np.median(np.log(vals))))
        return table

    def to_dict(self) -> dict[str, Any]:
        """The whole table (a lazy reference fits its remaining voices first)."""
        for v in self._lazy[1] if self._lazy else []:
            self._voice_table(v)
        return {"f0": self.f0, "pitches": self.pitches, "rates": self.rates}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StyleReference:
        if not isinstance(d, dict) or "f0" not in d:
            raise OmnitokError("StyleReference.from_dict: expected a mapping with an 'f0' table")
        return cls(d["f0"], d.get("pitches"), d.get("rates"))

    # --- references
    def _speaker_(self) -> Any:
        if self._speaker is None:
            from omnitok.world.speech import Speaker

            self._speaker = Speaker()
        return self._speaker

    def reference(self, text: str, voice: str, pitch: str = "mid", rate: str = "normal") -> np.ndarray:
        """eSpeak's own audio of ``text`` in this style (cached)."""
        from omnitok.world.speech import Style

        key = (text, voice, pitch, rate)
        if key not in self._cache:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = self._speaker_().synthesize(text, Style(voice, pitch, rate))
        return self._cache[key]

    def _known(self, voice: str) -> None:
        if voice not in self.f0 and not (self._lazy and voice in self._lazy[1]):
            known = sorted({*self.f0, *(self._lazy[1] if self._lazy else [])})
            raise OmnitokError(f"StyleReference: no F0 references for voice {voice!r}; fitted: {known}")

    def _voice_table(self, voice: str) -> dict[str, float]:
        self._known(voice)
        if voice not in self.f0:
            self.f0[voice] = self._fit_voice(voice)
        return self.f0[voice]

    # --- classification
    def classify_pitch(self, audio: np.ndarray, sample_rate: int, voice: str, text: str | None = None) -> str | None:
        """The pitch class nearest to the clip's median F0 for ``voice`` (None if nothing is voiced).

        With ``text``, the references are that sentence spoken at each class; otherwise the voice centroids.
        """
        self._known(voice)
        f0 = median_f0(audio, sample_rate)
        if not math.isfinite(f0):
            return None
        if text is None:
            return _nearest(f0, self._voice_table(voice))
        refs = {p: median_f0(self.reference(text, voice, p, "normal"), 16000) for p in self.pitches}
        refs = {p: hz for p, hz in refs.items() if math.isfinite(hz)}
        return _nearest(f0, refs or self._voice_table(voice))

    def classify_rate(self, audio: np.ndarray, sample_rate: int, voice: str, text: str) -> str | None:
        """The rate class whose eSpeak rendering of ``text`` (same voice) lasts closest to the clip (log scale)."""
        if not isinstance(text, str) or not text.strip():
            raise OmnitokError("classify_rate: expected the clip's text (a non-empty str) to compare durations")
        dur = active_duration(audio, sample_rate)
        if dur <= 0:
            return None
        refs = {r: active_duration(self.reference(text, voice, "mid", r), 16000) for r in self.rates}
        return _nearest(dur, {r: d for r, d in refs.items() if d > 0})

    def rate_ratio(self, audio: np.ndarray, sample_rate: int, voice: str, text: str, rate: str = "normal") -> float:
        """Clip duration over eSpeak's duration of ``text`` at ``rate`` (1.0 = same speed)."""
        ref = active_duration(self.reference(text, voice, "mid", rate), 16000)
        return active_duration(audio, sample_rate) / ref if ref > 0 else float("nan")


def style_accuracy(
    ref: StyleReference,
    clips: Sequence[tuple[np.ndarray, int, dict[str, str], str]],
) -> dict[str, float]:
    """Fraction of clips whose measured pitch and rate classes match the requested ones.

    ``clips``: ``(audio, sample_rate, {"voice", "pitch", "rate"}, text)``; the voice must be one the reference
    knows. Unvoiced clips count as wrong for pitch.
    """
    if not clips:
        raise OmnitokError("style_accuracy: no clips given")
    pitch_ok = rate_ok = 0
    for audio, sr, style, text in clips:
        pitch_ok += ref.classify_pitch(audio, sr, style["voice"], text) == style["pitch"]
        rate_ok += ref.classify_rate(audio, sr, style["voice"], text) == style["rate"]
    n = len(clips)
    return {"pitch_acc": pitch_ok / n, "rate_acc": rate_ok / n, "n": n}


__all__ = ["StyleReference", "active_duration", "median_f0", "style_accuracy"]
