"""Adapters that make pretrained transformers audio codecs (``EncodecModel``, ``MimiModel``, ``DacModel``) speech
tokenizers with the same contract as :class:`omnitok.tokenizers.speech.SpeechTokenizer`.

They load from a local directory only (``save_pretrained`` output), never from a hub. These codecs quantize
with residual VQ, so one audio frame has several codes, one per level. ``encode`` returns them as
``[N, num_levels]`` local codes (``0 .. codebook_size - 1`` each); the vocabulary gives every level its own id
range (``codebook_sizes``) and flattens frame by frame, so a language model sees level 0, 1, ... of frame 0,
then of frame 1, and never confuses a level-0 code with a level-3 one. ``num_levels`` trades bitrate for
quality: Mimi's first level is its distilled "semantic" codebook, Encodec's levels follow its bandwidths.

The adapter's own setting (``num_levels``) lives beside the weights in ``omnitok_adapter.json``. Codecs carry
the voice inside their codes, so ``decode`` ignores a ``style`` (with a warning): re-voicing needs omnitok's
own tokenizer, whose style is kept apart from the content tokens.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnitok.errors import OmnitokError
from omnitok.io import atomic_write_json, read_json
from omnitok.tokenizers.speech import as_code_array, as_mono_audio

ADAPTER_NAME = "omnitok_adapter.json"
_KINDS = ("encodec", "mimi", "dac")


def _model_class(model_type: str) -> Any:
    import transformers

    names = {"encodec": "EncodecModel", "mimi": "MimiModel", "dac": "DacModel"}
    if model_type not in names:
        raise OmnitokError(f"unsupported audio codec model_type {model_type!r}; expected one of {list(_KINDS)}")
    return getattr(transformers, names[model_type])


class HFSpeechTokenizer:
    """A transformers audio codec behind omnitok's speech-tokenizer contract; see the module docstring."""

    def __init__(self, model: Any, num_levels: int | None = None, max_seconds: float = 120.0) -> None:
        mt = getattr(model.config, "model_type", None)
        if mt not in _KINDS:
            raise OmnitokError(f"unsupported audio codec model_type {mt!r}; expected one of {list(_KINDS)}")
        self.kind = mt
        self.model = model.eval()
        self.max_seconds = max_seconds
        self.max_levels = self._max_levels()
        levels = self._default_levels() if num_levels is None else int(num_levels)
        if not 1 <= levels <= self.max_levels:
            raise OmnitokError(f"{mt}: num_levels must be in [1, {self.max_levels}], got {num_levels}")
        self._levels = levels
        self._bandwidth = self._encodec_bandwidth(levels) if mt == "encodec" else None

    # --- codec facts
    def _max_levels(self) -> int:
        cfg = self.model.config
        if self.kind == "encodec":
            return min(int(cfg.num_quantizers), max(self._encodec_levels(b) for b in cfg.target_bandwidths))
        if self.kind == "mimi":
            return int(cfg.num_quantizers)
        return int(cfg.n_codebooks)

    def _default_levels(self) -> int:
        if self.kind == "encodec":
            return self._encodec_levels(min(self.model.config.target_bandwidths))
        if self.kind == "mimi":
            return min(8, self.max_levels)  # Moshi's choice: 8 levels at 12.5 Hz, 1.1 kbps
        return self.max_levels

    def _encodec_levels(self, bandwidth: float) -> int:
        cfg = self.model.config
        bits = math.log2(cfg.codebook_size)
        return max(1, int(bandwidth * 1000 // (cfg.frame_rate * bits)))

    def _encodec_bandwidth(self, levels: int) -> float:
        options = {self._encodec_levels(b): b for b in self.model.config.target_bandwidths}
        if levels not in options:
            raise OmnitokError(
                f"encodec: num_levels {levels} matches none of its target bandwidths "
                f"{self.model.config.target_bandwidths} kbps; possible num_levels: {sorted(options)}"
            )
        return float(options[levels])

    # --- contract properties
    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def frame_rate(self) -> float:
        return float(self.model.config.frame_rate)

    @property
    def num_levels(self) -> int:
        return self._levels

    @property
    def codebook_sizes(self) -> list[int]:
        return [int(self.model.config.codebook_size)] * self._levels

    @property
    def codebook_size(self) -> int:
        """Ids over all levels (each level has its own range in the vocabulary)."""
        return sum(self.codebook_sizes)

    @property
    def bitrate(self) -> float:
        return self.frame_rate * sum(math.log2(s) for s in self.codebook_sizes)

    # --- encode / decode
    @torch.no_grad()
    def encode(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono audio -> int64 codes [N, num_levels] (resampled to the codec's rate first)."""
        x = as_mono_audio(samples, sample_rate, self.sample_rate, self.max_seconds)
        wave = torch.from_numpy(x).view(1, 1, -1)
        if self.kind == "encodec":
            out = self.model.encode(wave, bandwidth=self._bandwidth)
            codes = out.audio_codes[0, 0] if out.audio_codes.ndim == 4 else out.audio_codes[0]
        elif self.kind == "mimi":
            codes = self.model.encode(wave, num_quantizers=self._levels).audio_codes[0]
        else:
            codes = self.model.encode(wave, n_quantizers=self._levels).audio_codes[0]
        codes = codes[: self._levels]
        return codes.t().contiguous().numpy().astype(np.int64)

    @torch.no_grad()
    def _decode_array(self, arr: np.ndarray) -> np.ndarray:
        codes = torch.from_numpy(arr).t().unsqueeze(0)  # [1, levels, N]
        if self.kind == "encodec":
            audio = self.model.decode(codes.unsqueeze(0), [None]).audio_values
        elif self.kind == "mimi":
            audio = self.model.decode(codes).audio_values
        else:
            audio = self.model.decode(audio_codes=codes).audio_values
        return audio.reshape(-1).numpy().astype(np.float32)

    def _check_codes(self, codes: Any) -> np.ndarray:
        size = int(self.model.config.codebook_size)
        arr = as_code_array(codes, size, self._levels)
        if self._levels == 1 and arr.ndim == 1:
            arr = arr[:, None]
        return arr

    def decode(
        self, codes: Any, style: dict[str, Any] | None = None, reference: np.ndarray | None = None
    ) -> np.ndarray:
        """Codes [N, num_levels] -> float32 audio at the codec's ``sample_rate`` (style is carried by the codes)."""
        if style or reference is not None:
            warnings.warn(
                f"{self.kind} codec: style/reference are ignored (the voice is inside the codes)", stacklevel=2
            )
        arr = self._check_codes(codes)
        if len(arr) > self.max_seconds * self.frame_rate:
            raise OmnitokError(
                f"codes: {len(arr)} frames is more than {self.max_seconds:.0f} s; use decode_chunks for long streams"
            )
        return self._decode_array(arr)

    def decode_chunks(
        self,
        codes: Any,
        style: dict[str, Any] | None = None,
        chunk_frames: int = 8,
        context_frames: int = 16,
        crossfade_frames: int = 1,
    ) -> Iterator[np.ndarray]:
        """Stream audio chunk by chunk while frames arrive: each chunk is decoded with ``context_frames`` of
        history and the newest ``crossfade_frames`` are held back and cross-faded into the next chunk.

        ``codes``: an [N, num_levels] array or an iterable of frames (each ``num_levels`` ints).
        """
        if chunk_frames < 1:
            raise OmnitokError(f"decode_chunks: chunk_frames must be >= 1, got {chunk_frames}")
        if style:
            warnings.warn(f"{self.kind} codec: style is ignored (the voice is inside the codes)", stacklevel=2)
        spf = self.sample_rate / self.frame_rate
        frames: list[np.ndarray] = []
        done = 0  # frames whose audio is emitted (minus the held tail)
        tail = np.zeros(0, np.float32)
        hold = max(0, int(crossfade_frames))

        def produce(end: int, final: bool) -> Iterator[np.ndarray]:
            nonlocal done, tail
            lo = max(0, done - context_frames)
            arr = self._check_codes(np.stack(frames[lo:end]))
            audio = self._decode_array(arr)
            start_s = round((done - lo) * spf)
            stop_frame = end if final else max(done, end - hold)
            seg = audio[start_s : round((stop_frame - lo) * spf)].copy()
            k = min(len(tail), len(seg))
            if k:
                ramp = np.linspace(0, 1, k + 2, dtype=np.float32)[1:-1]
                seg[:k] = tail[:k] * (1 - ramp) + seg[:k] * ramp
            tail = audio[round((stop_frame - lo) * spf) :].copy()
            done = stop_frame
            if seg.size:
                yield seg

        source: Iterable[Any] = self._check_codes(codes) if isinstance(codes, np.ndarray | torch.Tensor) else codes
        for item in source:
            frame = np.asarray(item, dtype=np.int64).reshape(-1)
            if frame.size != self._levels:
                raise OmnitokError(f"decode_chunks: each frame needs {self._levels} codes, got {frame.size}")
            frames.append(frame)
            if len(frames) - done >= chunk_frames + hold:
                yield from produce(done + chunk_frames + hold, False)
        if not frames:
            raise OmnitokError("decode_chunks: the code stream was empty; expected at least one frame")
        yield from produce(len(frames), True)

    # --- save / load
    def save(self, path: str | os.PathLike[str]) -> Path:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out), safe_serialization=True)
        atomic_write_json(
            out / ADAPTER_NAME, {"kind": "speech_codec", "num_levels": self._levels, "max_seconds": self.max_seconds}
        )
        return out

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], num_levels: int | None = None, max_seconds: float | None = None
    ) -> HFSpeechTokenizer:
        """Load a codec saved with ``save_pretrained`` (``config.json`` + ``model.safetensors``), offline."""
        p = Path(path)
        cfg = read_json(p / "config.json", "audio codec config")
        mt = cfg.get("model_type") if isinstance(cfg, dict) else None
        model_cls = _model_class(str(mt))
        if not any((p / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
            raise OmnitokError(f"{p}: no model.safetensors (omnitok loads safetensors weights only, never pickles)")
        try:
            model = model_cls.from_pretrained(str(p), local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise OmnitokError(f"{p}: could not load the {mt} codec: {e}") from e
        settings = read_json(p / ADAPTER_NAME, "adapter settings") if (p / ADAPTER_NAME).is_file() else {}
        levels = num_levels if num_levels is not None else settings.get("num_levels")
        secs = max_seconds if max_seconds is not None else float(settings.get("max_seconds", 120.0))
        return cls(model, levels, secs)


def load_hf_speech_tokenizer(path: str | os.PathLike[str], num_levels: int | None = None) -> HFSpeechTokenizer:
    return HFSpeechTokenizer.from_pretrained(path, num_levels)


__all__ = ["HFSpeechTokenizer", "load_hf_speech_tokenizer"]
