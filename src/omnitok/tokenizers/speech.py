"""omnitok's own speech tokenizer: log-mel -> encoder -> FSQ content tokens (25/s); tokens + style -> mel -> audio.

The design follows the "content tokens, style kept apart" family (SpeechTokenizer, EMOVA): a phone CTC loss on
the quantized tokens makes them carry *what* is said, while *how* it is said travels beside them as a small
style vector that the decoder receives and the language model never has to predict token by token:

* **voice**: a learned embedding per training voice, or a vector a small style encoder computes from a
  reference clip (the only way to speak as a voice not seen in training);
* **pitch**: the median F0 as one continuous number (log Hz). A requested class maps to that voice's centroid
  measured on the training data (EMOVA's "style centroids"); a reference clip gives its own measured F0. A small
  predictor turns tokens + median into a frame-level F0 contour (:mod:`omnitok.tokenizers.pitch` measures the
  training targets), and the decoder draws the mel along that contour: one definite pitch track keeps the
  harmonics sharp, where a decoder left to guess the intonation smears them (low voices then lost their pitch
  after Griffin-Lim);
* **rate**: the decoder is told the tokens' own speaking rate; a requested different rate is reached by
  time-stretching the predicted mel spectrogram (phones keep their pitch, the whole utterance gets slower or
  faster). The tokens' rate is read off the tokens by a small classifier trained beside the codec.

Audio comes back through Griffin-Lim (:mod:`omnitok.tokenizers.mel`), which needs no weights. Everything is
convolutional with per-frame normalisation and a bounded receptive field, so :meth:`decode_chunks` can decode
a stream of tokens with left context and a few tokens of lookahead and reproduce exactly the mel spectrogram
of a one-shot decode; audio joins are made seamless by carrying Griffin-Lim's phase across chunk boundaries.

:func:`load_speech_tokenizer` opens either this tokenizer or one of the pretrained-codec adapters in
:mod:`omnitok.tokenizers.hf_speech`, by the directory's ``config.json``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnitok.errors import OmnitokError
from omnitok.tokenizers.mel import MelConfig, MelSpectrogram
from omnitok.tokenizers.quantizers import FSQ

SAMPLE_RATE = 16000
KIND = "speech_fsq"
STRESS_MARKS = "ˈˌ"


# ----------------------------------------------------------------------------------------------- inputs


def as_mono_audio(
    samples: Any, sample_rate: Any, target_rate: int = SAMPLE_RATE, max_seconds: float | None = None
) -> np.ndarray:
    """Check and convert audio to float32 mono at ``target_rate``; every refusal says what was expected.

    Accepted: float arrays in [-1, 1] or int16 PCM; shape [T], or [T, C] / [C, T] with one or two channels
    (two channels are averaged, since every tokenizer here is mono); any positive integer rate (resampled with a
    polyphase filter). Refused: empty audio, NaN or infinity, other dtypes, more than two channels, and clips
    longer than ``max_seconds`` (split them first: the model was trained on short utterances).
    """
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    if not isinstance(samples, np.ndarray):
        raise OmnitokError(f"audio: expected a numpy array of samples, got {type(samples).__name__}")
    if not isinstance(sample_rate, int | np.integer) or isinstance(sample_rate, bool) or sample_rate <= 0:
        raise OmnitokError(f"audio: sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    x = samples
    if x.ndim == 2:
        if x.shape[1] in (1, 2) and x.shape[0] > 2:
            x = x.mean(axis=1) if x.shape[1] == 2 else x[:, 0]
        elif x.shape[0] in (1, 2) and x.shape[1] > 2:
            x = x.mean(axis=0) if x.shape[0] == 2 else x[0]
        else:
            raise OmnitokError(
                f"audio: expected mono [samples] or [samples, channels] with 1-2 channels, got shape {list(x.shape)}"
            )
    elif x.ndim != 1:
        raise OmnitokError(f"audio: expected a 1-D array of samples (mono), got shape {list(x.shape)}")
    if x.size == 0:
        raise OmnitokError("audio: got 0 samples; expected a non-empty clip")
    if np.issubdtype(x.dtype, np.integer):
        if x.dtype != np.int16:
            raise OmnitokError(f"audio: integer samples must be int16 PCM, got {x.dtype}")
        x = x.astype(np.float32) / 32768.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
    else:
        raise OmnitokError(f"audio: expected float samples in [-1, 1] or int16 PCM, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise OmnitokError("audio: samples contain NaN or infinity")
    seconds = x.size / float(sample_rate)
    if max_seconds is not None and seconds > max_seconds:
        raise OmnitokError(
            f"audio: clip is {seconds:.1f} s long, more than the maximum {max_seconds:.0f} s; "
            "split it into utterances (the limit is the speech tokenizer's max_seconds setting)"
        )
    if int(sample_rate) != target_rate:
        from scipy.signal import resample_poly

        g = gcd(int(sample_rate), target_rate)
        x = resample_poly(x.astype(np.float64), target_rate // g, int(sample_rate) // g).astype(np.float32)
        if x.size == 0:
            raise OmnitokError(f"audio: too short to resample from {sample_rate} Hz to {target_rate} Hz")
    return np.ascontiguousarray(x)


def as_code_array(codes: Any, codebook_size: int, num_levels: int = 1) -> np.ndarray:
    """Codes [N] (or [N, 1]) for one level, [N, levels] otherwise; ints in range; an OmnitokError if not."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    try:
        arr = np.asarray(codes)
    except (TypeError, ValueError) as e:
        raise OmnitokError(f"codes: could not read as an integer array: {e}") from e
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise OmnitokError(f"codes: expected integer ids, got dtype {arr.dtype}")
    if num_levels == 1 and arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    want = "[N]" if num_levels == 1 else f"[N, {num_levels}]"
    if (num_levels == 1 and arr.ndim != 1) or (num_levels > 1 and (arr.ndim != 2 or arr.shape[1] != num_levels)):
        raise OmnitokError(f"codes: expected shape {want}, got {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise OmnitokError("codes: got 0 frames; expected at least one code")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= codebook_size:
        raise OmnitokError(f"codes out of range: got values in [{lo}, {hi}], expected ids in [0, {codebook_size})")
    return arr.astype(np.int64)


def phone_units(phonemes: str, keep_stress: bool = True) -> list[str]:
    """eSpeak's IPA string (``_`` between phones, spaces between words) -> a list of phone symbols."""
    out = []
    for word in phonemes.split():
        for p in word.split("_"):
            if not keep_stress:
                p = p.strip(STRESS_MARKS)
            if p:
                out.append(p)
    return out


# ----------------------------------------------------------------------------------------------- model config


@dataclass
class SpeechTokenizerConfig:
    """Architecture and the tables learned from data (phones, voices, pitch centroids), all JSON."""

    mel: dict[str, Any] = field(default_factory=dict)
    downsample: int = 4  # mel frames (100/s) per token: 4 -> 25 tokens/s
    levels: tuple[int, ...] = (8, 5, 5, 5)
    width: int = 192
    enc_blocks: int = 4
    # 0: the phone CTC head sees one token at a time, so each token must name its phone (a linear probe reads
    # phones off single tokens with PER 0.05, against 0.56 with a 2-block head; docs/BENCHMARKS.md)
    ctc_blocks: int = 0
    dec_blocks: int = 6
    post_width: int = 128
    post_blocks: int = 2
    kernel: int = 7
    lookahead: int = 1  # right context of each decoder block, in frames of that block's rate
    voice_dim: int = 64
    rate_dim: int = 16
    style_width: int = 128
    keep_stress: bool = True
    phones: list[str] = field(default_factory=list)  # CTC inventory; CTC index 0 is the blank
    voices: list[str] = field(default_factory=list)  # voices with a learned embedding
    # lists, not a mapping: JSON files are written with sorted keys, and the order fixes embedding rows
    rates: list[str] = field(default_factory=lambda: ["slow", "normal", "fast"])
    rate_wpm: list[float] = field(default_factory=lambda: [125.0, 170.0, 220.0])
    pitches: list[str] = field(default_factory=lambda: ["low", "mid", "high"])
    f0_centroids: dict[str, dict[str, float]] = field(default_factory=dict)  # voice -> pitch -> median F0 Hz
    default_style: dict[str, str] = field(default_factory=dict)
    f0_contour: bool = True  # predict a frame-level F0 contour and draw the mel along it
    pitch_width: int = 96
    pitch_blocks: int = 3
    max_seconds: float = 60.0
    gl_iters: int = 32

    def __post_init__(self) -> None:
        self.levels = tuple(int(v) for v in self.levels)
        if self.downsample < 1:
            raise OmnitokError(f"speech tokenizer config: downsample must be >= 1, got {self.downsample}")
        if self.kernel < 1 or not 0 <= self.lookahead < self.kernel:
            raise OmnitokError(
                f"speech tokenizer config: need kernel >= 1 and 0 <= lookahead < kernel, got "
                f"{self.kernel}, {self.lookahead}"
            )
        self.rates, self.rate_wpm = list(self.rates), [float(v) for v in self.rate_wpm]
        if not self.rates or len(self.rates) != len(self.rate_wpm) or any(v <= 0 for v in self.rate_wpm):
            raise OmnitokError(
                f"speech tokenizer config: rates {self.rates} need one positive words-per-minute value each in "
                f"rate_wpm, got {self.rate_wpm}"
            )

    @property
    def mel_config(self) -> MelConfig:
        return MelConfig.from_dict(self.mel)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "speech tokenizer config") -> SpeechTokenizerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise OmnitokError(f"{where}: unknown fields {unknown}; known: {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise OmnitokError(f"{where}: {e}") from e


# ----------------------------------------------------------------------------------------------- layers


class Block(nn.Module):
    """ConvNeXt-style 1-D block (depthwise conv, norm, pointwise MLP) with optional style modulation.

    The depthwise convolution is padded ``kernel - 1 - right`` frames on the left and ``right`` on the right:
    ``right`` is the block's lookahead, which fixes how many future tokens a streaming decoder must wait for.
    Normalisation is per frame (LayerNorm over channels), never over time, so a window of frames with enough
    context computes exactly what the whole sequence would.
    """

    def __init__(self, dim: int, kernel: int, right: int, cond_dim: int = 0, mult: int = 2) -> None:
        super().__init__()
        self.left, self.right = kernel - 1 - right, right
        self.dw = nn.Conv1d(dim, dim, kernel, groups=dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=cond_dim == 0)
        self.cond = nn.Linear(cond_dim, 2 * dim) if cond_dim else None
        if self.cond is not None:
            nn.init.zeros_(self.cond.weight)
            nn.init.zeros_(self.cond.bias)
        self.pw1 = nn.Linear(dim, mult * dim)
        self.pw2 = nn.Linear(mult * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.2))

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.dw(F.pad(x.transpose(1, 2), (self.left, self.right))).transpose(1, 2)
        h = self.norm(h)
        if self.cond is not None and cond is not None:
            scale, shift = self.cond(cond).unsqueeze(1).chunk(2, -1)
            h = h * (1 + scale) + shift
        x = x + self.pw2(F.gelu(self.pw1(h))) * self.gamma
        return x * mask if mask is not None else x


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1)


class StyleEncoder(nn.Module):
    """Reference clip (normalised log-mel) -> voice vector; a voice classifier head keeps it about the voice."""

    def __init__(self, n_mels: int, width: int, voice_dim: int, n_voices: int, downsample: int, kernel: int) -> None:
        super().__init__()
        self.stem = nn.Conv1d(n_mels, width, 2 * downsample, stride=downsample, padding=downsample // 2)
        self.blocks = nn.ModuleList(Block(width, kernel, kernel // 2) for _ in range(2))
        self.out = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, voice_dim))
        self.classify = nn.Linear(voice_dim, max(1, n_voices))

    def forward(self, mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.stem(mel).transpose(1, 2)
        h = h[:, : mask.shape[1]] * mask
        for b in self.blocks:
            h = b(h, mask=mask)
        mean = _masked_mean(h, mask)
        std = (_masked_mean((h - mean.unsqueeze(1)) ** 2, mask) + 1e-5).sqrt()
        return self.out(torch.cat([mean, std], -1))


# ----------------------------------------------------------------------------------------------- the tokenizer


@dataclass
class _Style:
    """Resolved decoder conditioning: a voice vector, a log-F0 value and the rate to stretch to (wpm or None)."""

    voice: torch.Tensor  # [voice_dim]
    log_f0: float
    target_wpm: float | None


class SpeechTokenizer(nn.Module):
    """The own speech tokenizer; see the module docstring. Build untrained with a config, or :meth:`load`."""

    def __init__(self, config: SpeechTokenizerConfig | None = None) -> None:
        super().__init__()
        cfg = config or SpeechTokenizerConfig()
        if not cfg.phones:
            cfg.phones = ["a"]
        if not cfg.voices:
            cfg.voices = ["default"]
        self.config = cfg
        self.mel = MelSpectrogram(cfg.mel_config)
        n_mels, w, k = self.mel.n_mels, cfg.width, cfg.kernel
        self.register_buffer("mel_mean", torch.zeros(n_mels))
        self.register_buffer("mel_std", torch.ones(n_mels))
        ds = cfg.downsample
        # encoder (not streamed: symmetric context)
        self.stem = nn.Conv1d(n_mels, w, 2 * ds, stride=ds, padding=ds // 2)
        self.enc = nn.ModuleList(Block(w, k, k // 2) for _ in range(cfg.enc_blocks))
        self.enc_norm = nn.LayerNorm(w)
        self.fsq = FSQ(cfg.levels)
        d = self.fsq.dim
        self.to_latent = nn.Linear(w, d)
        # content heads on the quantized tokens
        self.ctc_in = nn.Linear(d, w)
        self.ctc = nn.ModuleList(Block(w, k, k // 2) for _ in range(cfg.ctc_blocks))
        self.ctc_out = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, len(cfg.phones) + 1))
        self.rate_in = nn.Linear(d, 64)
        self.rate_conv = nn.Conv1d(64, 64, 5, padding=2)
        self.rate_out = nn.Linear(64, len(cfg.rates))
        # style
        self.voice_emb = nn.Embedding(len(cfg.voices), cfg.voice_dim)
        nn.init.normal_(self.voice_emb.weight, std=0.5)
        self.rate_emb = nn.Embedding(len(cfg.rates), cfg.rate_dim)
        self.style_encoder = StyleEncoder(n_mels, cfg.style_width, cfg.voice_dim, len(cfg.voices), ds, k)
        cond = cfg.voice_dim + cfg.rate_dim + 1
        self.cond_dim = cond
        # decoder (streamable: each block looks ``lookahead`` frames ahead)
        self.dec_in = nn.Linear(d, w)
        self.dec = nn.ModuleList(Block(w, k, cfg.lookahead, cond) for _ in range(cfg.dec_blocks))
        self.to_frames = nn.Linear(w, ds * cfg.post_width)
        self.post = nn.ModuleList(Block(cfg.post_width, k, cfg.lookahead, cond) for _ in range(cfg.post_blocks))
        self.post_norm = nn.LayerNorm(cfg.post_width)
        self.to_mel = nn.Linear(cfg.post_width, n_mels)
        # F0 contour: predicted from tokens + style (detached tokens), fed to the decoder at 25 and 100 frames/s
        if cfg.f0_contour:
            pw = cfg.pitch_width
            self.pitch_in = nn.Linear(d, pw)
            self.pitch = nn.ModuleList(Block(pw, k, cfg.lookahead, cond) for _ in range(cfg.pitch_blocks))
            self.pitch_out = nn.Sequential(nn.LayerNorm(pw), nn.Linear(pw, 2 * ds))
            self.f0_dec = nn.Linear(2 * ds, w)
            self.f0_post = nn.Linear(2, cfg.post_width)
            from omnitok.tokenizers.pitch import HarmonicComb

            mc = self.mel.config
            self.comb = HarmonicComb(mc.sample_rate, mc.n_fft, mc.win_length, self.mel.fb)
            self.comb_in = nn.Linear(n_mels, cfg.post_width)
            self.comb_gain = nn.Parameter(torch.ones(n_mels))

    # --- contract properties
    @property
    def sample_rate(self) -> int:
        return self.mel.config.sample_rate

    @property
    def frame_rate(self) -> float:
        """Tokens per second (one level)."""
        return self.mel.config.frame_rate / self.config.downsample

    @property
    def samples_per_token(self) -> int:
        return self.mel.config.hop_length * self.config.downsample

    @property
    def num_levels(self) -> int:
        return 1

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.codebook_size]

    @torch.no_grad()
    def code_vectors(self, level: int = 0) -> torch.Tensor:
        """The FSQ grid point every code stands for, [codebook size, len(levels)] (see the image tokenizer's)."""
        if level != 0:
            raise OmnitokError(f"speech tokenizer has one level (0), got {level}")
        return self.fsq.indices_to_codes(torch.arange(self.codebook_size))

    @property
    def bitrate(self) -> float:
        """Bits per second if every token were coded with log2(codebook) bits."""
        return self.frame_rate * math.log2(self.codebook_size)

    @property
    def voices(self) -> list[str]:
        return list(self.config.voices)

    def _context(self, side: int) -> int:
        c = self.config
        blocks = c.dec_blocks + (c.pitch_blocks if c.f0_contour else 0)
        return blocks * side + math.ceil(c.post_blocks * side / c.downsample)

    @property
    def lookahead_tokens(self) -> int:
        """Future tokens the decoder needs before the mel of a token is final (for streaming)."""
        return self._context(self.config.lookahead)

    @property
    def left_context_tokens(self) -> int:
        """Past tokens that still influence a token's mel (a streaming window starts this far back)."""
        return self._context(self.config.kernel - 1 - self.config.lookahead)

    # --- building blocks
    def normalize_mel(self, log_mel: torch.Tensor) -> torch.Tensor:
        return (log_mel - self.mel_mean[:, None]) / self.mel_std[:, None]

    def features(self, wave: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Normalised log-mel [n_mels, n_tokens * downsample] of a waveform padded to whole tokens."""
        need = n_tokens * self.samples_per_token
        if wave.shape[-1] < need:
            wave = F.pad(wave, (0, need - wave.shape[-1]))
        mel = self.mel.log_mel(wave[..., :need])[..., : n_tokens * self.config.downsample]
        return self.normalize_mel(mel)

    def encode_latent(self, mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised mel [B, n_mels, 4N] -> pre-quantization latent [B, N, d]."""
        h = self.stem(mel).transpose(1, 2)[:, : mask.shape[1]] * mask
        for b in self.enc:
            h = b(h, mask=mask)
        return self.to_latent(self.enc_norm(h))

    def ctc_logits(self, zq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ctc_in(zq) * mask
        for b in self.ctc:
            h = b(h, mask=mask)
        return self.ctc_out(h)

    def rate_logits(self, zq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.rate_in(zq)) * mask
        h = F.gelu(self.rate_conv(h.transpose(1, 2))).transpose(1, 2)
        return self.rate_out(_masked_mean(h, mask))

    def cond_vector(self, voice: torch.Tensor, log_f0: torch.Tensor, rate_idx: torch.Tensor) -> torch.Tensor:
        """[B, voice_dim], [B], [B] -> decoder conditioning [B, cond_dim] (log F0 centred on 150 Hz)."""
        f0 = ((log_f0 - math.log(150.0)) / 0.5).unsqueeze(-1)
        return torch.cat([voice, self.rate_emb(rate_idx), f0], -1)

    @staticmethod
    def cond_log_f0(cond: torch.Tensor) -> torch.Tensor:
        """The log-F0 median a conditioning vector asks for (inverse of :meth:`cond_vector`'s last entry)."""
        return cond[:, -1] * 0.5 + math.log(150.0)

    def predict_contour(
        self, zq: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per mel frame [B, N * downsample]: log F0 relative to the requested median, and a voicing logit."""
        h = self.pitch_in(zq.detach())
        if mask is not None:
            h = h * mask
        for b in self.pitch:
            h = b(h, cond, mask)
        out = self.pitch_out(h).reshape(h.shape[0], -1, 2)
        return out[..., 0], out[..., 1]

    def predict_f0(self, zq: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted F0 track [B, N * downsample] in Hz (0 where predicted unvoiced)."""
        rel, vlogit = self.predict_contour(zq, cond, mask)
        return torch.exp(self.cond_log_f0(cond)[:, None] + rel) * (vlogit > 0)

    @staticmethod
    def contour_features(f0: torch.Tensor) -> torch.Tensor:
        """F0 track [B, T] (Hz, 0 unvoiced) -> decoder input [B, T, 2]: normalised log F0 and voicing."""
        v = (f0 > 0).float()
        return torch.stack([(torch.log(f0.clamp(min=20.0)) - math.log(150.0)) / 0.5 * v, v], -1)

    def decode_mel(
        self,
        zq: torch.Tensor,
        cond: torch.Tensor,
        mask: torch.Tensor | None = None,
        f0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Quantized tokens [B, N, d] + conditioning -> normalised log-mel [B, n_mels, N * downsample].

        ``f0`` ([B, N * downsample] Hz, 0 unvoiced) is the pitch track to draw: training passes the measured
        one, decoding predicts it from the tokens and the requested median F0. It enters as numbers and as the
        harmonic comb it implies, which is also added to the output with learned per-band gains.
        """
        ds = self.config.downsample
        h = self.dec_in(zq)
        comb = feats = None
        if self.config.f0_contour:
            if f0 is None:
                f0 = self.predict_f0(zq, cond, mask)
            feats = self.contour_features(f0)
            comb = self.comb(f0)
            h = h + self.f0_dec(feats.reshape(feats.shape[0], -1, 2 * ds))
        if mask is not None:
            h = h * mask
        for b in self.dec:
            h = b(h, cond, mask)
        b_, n, _ = h.shape
        h = self.to_frames(h).reshape(b_, n * ds, self.config.post_width)
        if comb is not None and feats is not None:
            h = h + self.f0_post(feats) + self.comb_in(comb)
        fmask = mask.repeat_interleave(ds, 1) if mask is not None else None
        if fmask is not None:
            h = h * fmask
        for b in self.post:
            h = b(h, cond, fmask)
        out = self.to_mel(self.post_norm(h))
        if comb is not None:
            out = out + comb * (self.comb_gain / self.mel_std)
        return out.transpose(1, 2)

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        return self.fsq.indices_to_codes(codes)

    # --- encode
    def _prepare(self, samples: Any, sample_rate: int) -> torch.Tensor:
        x = as_mono_audio(samples, sample_rate, self.sample_rate, self.config.max_seconds)
        return torch.from_numpy(x)

    @torch.no_grad()
    def encode_batch(self, clips: Sequence[np.ndarray], sample_rate: int = SAMPLE_RATE) -> list[np.ndarray]:
        """Encode several clips at once (padded and masked: the same codes as one by one)."""
        if isinstance(clips, np.ndarray) and clips.ndim == 1:
            raise OmnitokError("encode_batch expects a list of clips; use encode() for one clip")
        if len(clips) == 0:
            return []
        waves = [self._prepare(c, sample_rate) for c in clips]
        spt = self.samples_per_token
        counts = [max(1, math.ceil(w.numel() / spt)) for w in waves]
        n_max = max(counts)
        ds = self.config.downsample
        # the mel clip by clip, then padded: a batch's STFT ([B, 513, frames] complex) falls out of the CPU's
        # caches and cost twice as much per clip (benchmarks/audio_front_end.py)
        mel = torch.zeros(len(waves), self.mel.n_mels, n_max * ds)
        mask = torch.zeros(len(waves), n_max, 1)
        for i, (w, n) in enumerate(zip(waves, counts, strict=True)):
            mel[i, :, : n * ds] = self.features(w, n)
            mask[i, :n] = 1
        _, idx = self.fsq(self.encode_latent(mel, mask))
        return [idx[i, :n].numpy().astype(np.int64) for i, n in enumerate(counts)]

    def encode(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """Mono audio -> int64 codes [N], N = ceil(seconds * frame_rate); other sample rates are resampled."""
        was_training = self.training
        self.eval()
        try:
            return self.encode_batch([samples], sample_rate)[0]
        finally:
            self.train(was_training)

    # --- style
    def _voice_index(self, name: str) -> int:
        if name not in self.config.voices:
            raise OmnitokError(
                f"style field 'voice': {name!r} has no learned embedding (training voices: {self.config.voices}); "
                "pass a reference clip of that voice instead (decode(..., reference=audio))"
            )
        return self.config.voices.index(name)

    def _rate_index(self, name: str) -> int:
        if name not in self.config.rates:
            raise OmnitokError(f"style field 'rate': expected one of {self.config.rates}, got {name!r}")
        return self.config.rates.index(name)

    def wpm_of(self, rate: str) -> float:
        return self.config.rate_wpm[self._rate_index(rate)]

    def f0_for(self, voice: str | None, pitch: str) -> float:
        """Median F0 (Hz) the decoder is asked for: the voice's centroid, or the mean ratio for unseen voices."""
        if pitch not in self.config.pitches:
            raise OmnitokError(f"style field 'pitch': expected one of {self.config.pitches}, got {pitch!r}")
        table = self.config.f0_centroids
        if voice in table and pitch in table[voice]:
            return float(table[voice][pitch])
        if not table:
            return {"low": 100.0, "mid": 130.0, "high": 170.0}.get(pitch, 130.0)
        vals = [math.log(t[pitch]) for t in table.values() if pitch in t]
        return float(math.exp(sum(vals) / len(vals)))

    def pitch_ratio(self, pitch: str) -> float:
        """Mean F0 ratio of ``pitch`` to ``mid`` over the training voices (to shift a reference's pitch)."""
        table = self.config.f0_centroids
        vals = [math.log(t[pitch] / t["mid"]) for t in table.values() if pitch in t and "mid" in t]
        return float(math.exp(sum(vals) / len(vals))) if vals else 1.0

    @torch.no_grad()
    def reference_style(self, reference: np.ndarray, sample_rate: int = SAMPLE_RATE) -> dict[str, Any]:
        """What the style encoder hears in a clip: voice vector, nearest training voice, F0, rate class."""
        from omnitok.world.speech import estimate_f0

        wave = self._prepare(reference, sample_rate)
        n = max(1, math.ceil(wave.numel() / self.samples_per_token))
        mel = self.features(wave, n).unsqueeze(0)
        mask = torch.ones(1, n, 1)
        vec = self.style_encoder(mel, mask)[0]
        voice = self.config.voices[int(self.style_encoder.classify(vec).argmax())]
        f0 = estimate_f0(wave.numpy(), self.sample_rate)
        _, idx = self.fsq(self.encode_latent(mel, mask))
        rate = self.config.rates[int(self.rate_logits(self.fsq.indices_to_codes(idx), mask).argmax(-1))]
        return {"voice_vector": vec, "nearest_voice": voice, "f0": f0, "rate": rate}

    def resolve_style(
        self, style: dict[str, Any] | None, reference: np.ndarray | None, reference_rate: int = SAMPLE_RATE
    ) -> _Style:
        """Merge a style dict and/or a reference clip into decoder conditioning; the dict wins field by field."""
        if style is not None and not isinstance(style, dict):
            raise OmnitokError(
                f"style: expected a dict like {{'voice': ..., 'pitch': ..., 'rate': ...}}, got {style!r}"
            )
        style = dict(style or {})
        unknown = sorted(set(style) - {"voice", "pitch", "rate"})
        if unknown:
            raise OmnitokError(f"style: unknown fields {unknown}; expected 'voice', 'pitch' and/or 'rate'")
        for k in ("voice", "pitch", "rate"):
            if k in style and style[k] is not None and not isinstance(style[k], str):
                raise OmnitokError(f"style field {k!r}: expected a name (str), got {style[k]!r}")
        style = {k: v for k, v in style.items() if v is not None}
        default = {"voice": self.config.voices[0], "pitch": "mid", "rate": None} | dict(self.config.default_style)
        target_rate = style.get("rate")
        if target_rate is not None:
            self._rate_index(target_rate)
        if reference is not None:
            ref = self.reference_style(reference, reference_rate)
            if "voice" in style:
                voice_vec = self.voice_emb.weight[self._voice_index(style["voice"])].detach()
                voice_name: str | None = style["voice"]
            else:
                voice_vec, voice_name = ref["voice_vector"], None
            if "pitch" in style:
                if voice_name is not None:
                    f0 = self.f0_for(voice_name, style["pitch"])
                else:  # an unseen voice: assume the reference speaks at its "mid" pitch
                    base = ref["f0"] if math.isfinite(ref["f0"]) else self.f0_for(None, "mid")
                    f0 = base * self.pitch_ratio(style["pitch"])
            else:
                f0 = ref["f0"] if math.isfinite(ref["f0"]) else self.f0_for(voice_name, "mid")
            if target_rate is None:
                target_rate = ref["rate"]
        else:
            voice_name = style.get("voice", default["voice"])
            voice_vec = self.voice_emb.weight[self._voice_index(voice_name)].detach()
            f0 = self.f0_for(voice_name, style.get("pitch", default["pitch"]))
            if target_rate is None:
                target_rate = default.get("rate")
        wpm = self.wpm_of(target_rate) if target_rate is not None else None
        return _Style(voice=voice_vec, log_f0=math.log(max(f0, 20.0)), target_wpm=wpm)

    def estimate_rate(self, codes: np.ndarray) -> tuple[str, float]:
        """The tokens' speaking-rate class and its expected words per minute (softmax-weighted)."""
        with torch.no_grad():
            zq = self.codes_to_latents(torch.from_numpy(codes)).unsqueeze(0)
            p = self.rate_logits(zq, torch.ones(1, zq.shape[1], 1)).softmax(-1)[0]
        names = self.config.rates
        wpm = torch.tensor(self.config.rate_wpm)
        return names[int(p.argmax())], float(math.exp((p * wpm.log()).sum()))

    def _stretch_factor(self, source: tuple[str, float], target_wpm: float | None) -> float:
        """Output/input duration: 1 when the tokens already have the target rate's class."""
        if target_wpm is None:
            return 1.0
        name, wpm = source
        if self.wpm_of(name) == target_wpm:
            return 1.0
        return float(wpm / target_wpm)

    def _cond(self, st: _Style, source_rate: str) -> torch.Tensor:
        return self.cond_vector(
            st.voice.unsqueeze(0), torch.tensor([st.log_f0]), torch.tensor([self._rate_index(source_rate)])
        )

    # --- decode
    @torch.no_grad()
    def decode_to_mel(
        self,
        codes: Any,
        style: dict[str, Any] | None = None,
        reference: np.ndarray | None = None,
        reference_rate: int = SAMPLE_RATE,
    ) -> torch.Tensor:
        """Codes -> natural-log mel [n_mels, frames] at 100 frames/s, time-stretched to the requested rate."""
        arr = as_code_array(codes, self.codebook_size)
        self._check_length(len(arr))
        st = self.resolve_style(style, reference, reference_rate)
        source = self.estimate_rate(arr)
        zq = self.codes_to_latents(torch.from_numpy(arr)).unsqueeze(0)
        mel = self.decode_mel(zq, self._cond(st, source[0]))[0]
        mel = mel * self.mel_std[:, None] + self.mel_mean[:, None]
        factor = self._stretch_factor(source, st.target_wpm)
        if factor != 1.0:
            n_out = max(1, round(mel.shape[1] * factor))
            mel = stretch_frames(mel, 0, n_out, factor)
        return mel

    def _check_length(self, n: int) -> None:
        limit = int(self.config.max_seconds * self.frame_rate * 2)
        if n > limit:
            raise OmnitokError(
                f"codes: {n} frames is {n / self.frame_rate:.1f} s of speech, more than the decoder's limit of "
                f"{limit} frames; decode it in pieces (decode_chunks streams any length)"
            )

    def vocode(self, log_mel: torch.Tensor) -> np.ndarray:
        """log-mel [n_mels, frames] -> float32 waveform (Griffin-Lim; weights-free)."""
        n = log_mel.shape[1] * self.mel.config.hop_length
        wave = self.mel.invert(log_mel, iters=self.config.gl_iters, length=n)
        return wave.numpy().astype(np.float32)

    def decode(
        self,
        codes: Any,
        style: dict[str, Any] | None = None,
        reference: np.ndarray | None = None,
        reference_rate: int = SAMPLE_RATE,
    ) -> np.ndarray:
        """Codes [N] -> float32 audio at ``sample_rate``.

        ``style``: ``{"voice", "pitch", "rate"}`` names (any subset); ``reference``: a clip whose voice, F0 and
        rate are used for the fields ``style`` leaves out. A requested rate different from the tokens' own
        stretches the output in time; pitch and voice are decoder inputs.
        """
        was_training = self.training
        self.eval()
        try:
            return self.vocode(self.decode_to_mel(codes, style, reference, reference_rate))
        finally:
            self.train(was_training)

    def decode_chunks(
        self,
        codes: Any,
        style: dict[str, Any] | None = None,
        chunk_frames: int = 10,
        reference: np.ndarray | None = None,
        source_rate: str | None = None,
        gl_context: int = 12,
    ) -> Iterator[np.ndarray]:
        """Stream audio while codes arrive: yields float32 chunks whose concatenation is the whole utterance.

        ``codes`` is an array or any iterable of ints (or of small arrays of ints), e.g. a generator fed by the
        language model. A chunk of ``chunk_frames`` tokens is decoded as soon as ``lookahead_tokens`` more
        tokens have arrived, with ``left_context_tokens`` of history, so its mel spectrogram equals that of a
        one-shot decode. Griffin-Lim then runs on the new frames plus ``gl_context`` frames of already
        emitted audio whose phase is held fixed, and the join is cross-faded: no click at chunk edges.

        Streamed tokens normally come from a language model that was already told the rate, so no time
        stretching is applied unless ``source_rate`` names the rate the tokens were spoken at.
        """
        if chunk_frames < 1:
            raise OmnitokError(f"decode_chunks: chunk_frames must be >= 1, got {chunk_frames}")
        self.eval()
        st = self.resolve_style(style, reference)
        src = source_rate or None
        if src is not None:
            self._rate_index(src)
        factor = self._stretch_factor((src, self.wpm_of(src)), st.target_wpm) if src else 1.0
        # the rate the decoder is told the tokens have: given, else the requested one (the LM was told it)
        cond_rate = src or (style or {}).get("rate")
        vocoder = _StreamingGriffinLim(self, gl_context)
        ds = self.config.downsample
        buf: list[int] = []
        done_tokens = 0  # tokens whose mel has been produced
        mel_src: torch.Tensor | None = None  # unstretched mel frames produced so far [n_mels, frames]
        out_frames = 0  # stretched frames handed to the vocoder
        L, R = self.left_context_tokens, self.lookahead_tokens

        def produce(end: int, final: bool) -> Iterator[np.ndarray]:
            nonlocal done_tokens, mel_src, out_frames, cond_rate
            arr = as_code_array(np.asarray(buf, dtype=np.int64), self.codebook_size)
            if cond_rate is None:
                cond_rate = self.estimate_rate(arr)[0]
            lo, hi = max(0, done_tokens - L), min(len(arr), end + R)
            with torch.no_grad():
                zq = self.codes_to_latents(torch.from_numpy(arr[lo:hi])).unsqueeze(0)
                mel = self.decode_mel(zq, self._cond(st, cond_rate))[0]
                mel = mel * self.mel_std[:, None] + self.mel_mean[:, None]
            new = mel[:, (done_tokens - lo) * ds : (end - lo) * ds]
            mel_src = new if mel_src is None else torch.cat([mel_src, new], 1)
            done_tokens = end
            n_src = mel_src.shape[1]
            if factor == 1.0:
                target = n_src
                frames = mel_src[:, out_frames:target]
            else:  # output frame j reads source position j / factor: only frames with both neighbours known
                target = round(n_src * factor) if final else int(max(0, n_src - 1) * factor)
                frames = stretch_frames(mel_src, out_frames, target, factor) if target > out_frames else None
            if target > out_frames:
                out_frames = target
                chunk = vocoder.push(frames, final)
                if chunk.size:
                    yield chunk
            elif final:
                chunk = vocoder.push(mel_src[:, :0], True)
                if chunk.size:
                    yield chunk

        source: Iterable[Any] = codes
        if isinstance(codes, np.ndarray | torch.Tensor):
            source = as_code_array(codes, self.codebook_size)
        for item in source:
            vals = np.asarray(item).reshape(-1)
            buf.extend(int(v) for v in vals)
            while len(buf) - done_tokens >= chunk_frames + R:
                yield from produce(done_tokens + chunk_frames, False)
        if not buf:
            raise OmnitokError("decode_chunks: the code stream was empty; expected at least one code")
        yield from produce(len(buf), True)

    # --- save/load
    def config_dict(self) -> dict[str, Any]:
        d = asdict(self.config)
        d["levels"] = list(self.config.levels)
        d["mel"] = self.mel.config.to_dict()
        return {
            "omnitok_tokenizer": KIND,
            "format_version": 1,
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "codebook_size": self.codebook_size,
            "arch": d,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        from omnitok.tokenizers.base import save_config_and_weights

        return save_config_and_weights(path, self.config_dict(), self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SpeechTokenizer:
        from omnitok.tokenizers.base import load_config_and_weights, resolve_tokenizer_dir

        p = resolve_tokenizer_dir(path)
        cfg, state = load_config_and_weights(p, "speech tokenizer")
        if cfg.get("omnitok_tokenizer") != KIND:
            raise OmnitokError(
                f"{p / 'config.json'}: field 'omnitok_tokenizer' is {cfg.get('omnitok_tokenizer')!r}, expected {KIND!r}"
            )
        arch = cfg.get("arch")
        if not isinstance(arch, dict):
            raise OmnitokError(f"{p / 'config.json'}: missing the 'arch' mapping")
        model = cls(SpeechTokenizerConfig.from_dict(dict(arch), f"{p / 'config.json'} arch"))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise OmnitokError(f"{p}: weights do not match the config ({str(e).splitlines()[0]})") from e
        return model.eval()


def stretch_frames(mel: torch.Tensor, start: int, end: int, factor: float) -> torch.Tensor:
    """Output frames ``[start, end)`` of ``mel`` [n_mels, frames] stretched by ``factor`` (linear interpolation).

    Output frame ``j`` samples input position ``j / factor`` on a grid fixed from the first frame, so a stream
    that asks for consecutive ranges gets exactly the frames a one-shot stretch would.
    """
    pos = torch.arange(start, end, dtype=torch.float64) / factor
    pos = pos.clamp(0, mel.shape[1] - 1)
    i0 = pos.floor().long()
    i1 = (i0 + 1).clamp(max=mel.shape[1] - 1)
    w = (pos - i0.double()).float()
    return mel[:, i0] * (1 - w) + mel[:, i1] * w


class _StreamingGriffinLim:
    """Griffin-Lim over a growing mel spectrogram; emitted audio is final and joins without phase jumps.

    Each push runs GL on the new frames plus ``context`` frames before them. The context frames start from the
    phase of the audio already produced (and keep it), so the new frames grow out of the old waveform. Audio
    within ``hold`` frames of the newest frame still lacks its right-hand overlap, so it is kept back and
    cross-faded with the next push's version of the same samples.
    """

    def __init__(self, tok: SpeechTokenizer, context: int) -> None:
        self.tok = tok
        self.mel = tok.mel
        self.hop = tok.mel.config.hop_length
        self.context = max(0, context)
        self.hold = math.ceil(tok.mel.config.win_length / 2 / self.hop)
        self.frames: torch.Tensor | None = None  # all log-mel frames so far
        self.audio = torch.zeros(0)  # synthesised samples: emitted ones followed by the held-back tail
        self.emitted = 0
        self.pushes = 0

    def push(self, new: torch.Tensor, final: bool) -> np.ndarray:
        self.frames = new if self.frames is None else torch.cat([self.frames, new], 1)
        self.pushes += 1
        total = self.frames.shape[1]
        if total == 0:
            return np.zeros(0, np.float32)
        first_new = total - new.shape[1]
        w0 = max(0, first_new - self.hold - self.context)
        mag = self.mel.mel_to_linear(self.frames[:, w0:])
        n = (total - w0) * self.hop
        init, fixed = None, 0
        known = self.audio.numel() - w0 * self.hop
        if w0 > 0 or known > 0:
            prev = torch.zeros(n)
            take = min(max(known, 0), n)
            prev[:take] = self.audio[w0 * self.hop : w0 * self.hop + take]
            init = self.mel.stft(prev)[:, : mag.shape[1]]
            g = torch.Generator().manual_seed(self.pushes)
            rand = torch.polar(torch.ones_like(mag), torch.rand(mag.shape, generator=g) * (2 * math.pi))
            init = torch.where(init.abs() > 1e-8, init, rand)
            fixed = max(0, min(first_new - self.hold, total) - w0)
        wave = self.mel.griffin_lim(mag, iters=self.tok.config.gl_iters, init_phase=init, fixed_frames=fixed, length=n)
        end = total * self.hop if final else max(self.emitted, (total - self.hold) * self.hop)
        # samples [self.emitted, end): cross-fade the held-back tail of the previous push into the new version
        seg = wave[self.emitted - w0 * self.hop : end - w0 * self.hop].clone()
        tail = self.audio[self.emitted :]
        k = min(tail.numel(), seg.numel())
        if k:
            ramp = torch.linspace(0, 1, k + 2)[1:-1]
            seg[:k] = tail[:k] * (1 - ramp) + seg[:k] * ramp
        full_end = total * self.hop
        self.audio = torch.cat([self.audio[: self.emitted], seg, wave[end - w0 * self.hop : full_end - w0 * self.hop]])
        self.emitted = end
        return seg.numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------- loading


def load_speech_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Open a saved speech tokenizer: omnitok's own (``speech_fsq``) or a transformers codec adapter."""
    from omnitok.io import read_json
    from omnitok.tokenizers.base import CONFIG_NAME, resolve_tokenizer_dir

    p = resolve_tokenizer_dir(path)
    cfg = read_json(p / CONFIG_NAME, "speech tokenizer config")
    kind = cfg.get("omnitok_tokenizer") if isinstance(cfg, dict) else None
    if kind == KIND:
        return SpeechTokenizer.load(p)
    if kind is None and isinstance(cfg, dict) and cfg.get("model_type") in ("encodec", "mimi", "dac"):
        from omnitok.tokenizers.hf_speech import load_hf_speech_tokenizer

        return load_hf_speech_tokenizer(p)
    raise OmnitokError(
        f"{p / CONFIG_NAME}: not a speech tokenizer (omnitok_tokenizer={kind!r}, "
        f"model_type={cfg.get('model_type') if isinstance(cfg, dict) else None!r}); expected {KIND!r} or a "
        "transformers Encodec/Mimi/DAC directory"
    )
