"""Frame-level F0 contour (YIN, batched in torch) aligned with the mel frames.

The speech tokenizer conditions its decoder on an F0 contour so that the harmonics it draws agree with one
pitch track: a decoder that only knows the median F0 has to average over possible intonations and smears the
harmonics, which Griffin-Lim then turns into a rough, weakly periodic sound (low male voices lost their pitch
altogether). The contour is measured here on training audio and predicted from tokens + style at decode time.

Same estimator family as :func:`omnitok.world.speech.estimate_f0` (difference function, cumulative-mean
normalisation, absolute threshold), but one value per 10 ms mel frame, computed for all frames at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def f0_contour(
    wave: torch.Tensor | np.ndarray,
    sample_rate: int = 16000,
    hop: int = 160,
    fmin: float = 55.0,
    fmax: float = 500.0,
    threshold: float = 0.2,
    silence_db: float = 40.0,
    decimate: int = 2,
) -> torch.Tensor:
    """F0 in Hz per frame centred at ``m * hop`` (the mel frames of a centred STFT); 0 where unvoiced.

    Returns ``len(wave) // hop + 1`` values. Frames quieter than ``silence_db`` below the loudest frame count as
    unvoiced, as do frames whose normalised difference never drops below ``threshold``. ``decimate`` first
    averages and drops samples (16 kHz -> 8 kHz by default): F0 lives far below 4 kHz and the cost halves.
    """
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32) if isinstance(wave, np.ndarray) else wave).float()
    n_frames = x.numel() // hop + 1
    if decimate > 1 and hop % decimate == 0:
        usable = x.numel() // decimate * decimate
        x = x[:usable].view(-1, decimate).mean(1)
        sample_rate, hop = sample_rate // decimate, hop // decimate
    tau_min = max(2, int(sample_rate / fmax))
    tau_max = math.ceil(sample_rate / fmin)
    win = tau_max
    span = win + tau_max + 1
    pad_left = span // 2
    xp = torch.nn.functional.pad(x, (pad_left, span))
    frames = xp.unfold(0, span, hop)[:n_frames]  # [frames, span], a strided view (a gather cost 2x more)
    frames = frames - frames.mean(1, keepdim=True)
    energy = frames[:, :win].pow(2).mean(1).sqrt()
    loud = (
        energy > energy.max() * 10 ** (-silence_db / 20) if energy.max() > 0 else torch.zeros_like(energy, dtype=bool)
    )
    n_fft = 1 << math.ceil(math.log2(span + win))  # linear (not circular) correlation
    spec_full = torch.fft.rfft(frames, n_fft)
    spec_win = torch.fft.rfft(frames[:, :win], n_fft)
    cross = torch.fft.irfft(spec_win.conj() * spec_full, n_fft)[:, : tau_max + 1]
    sq = torch.cat([torch.zeros(n_frames, 1), frames.pow(2).cumsum(1)], 1)
    taus = torch.arange(tau_max + 1)
    e_tau = sq[:, win : win + tau_max + 1] - sq[:, : tau_max + 1]
    diff = (sq[:, win : win + 1] + e_tau - 2 * cross).clamp(min=0)
    cum = diff[:, 1:].cumsum(1) / torch.arange(1, tau_max + 1)
    cmnd = torch.ones_like(diff)
    cmnd[:, 1:] = diff[:, 1:] / cum.clamp(min=1e-12)
    below = cmnd[:, tau_min:tau_max] < threshold
    found = below.any(1)
    first = below.float().argmax(1) + tau_min
    # walk down to the local minimum after the first crossing: first tau >= first with cmnd[tau+1] >= cmnd[tau]
    rising = cmnd[:, 1:] >= cmnd[:, :-1]  # [frames, tau_max]: at tau, the next value is not lower
    after = taus[None, :-1] >= first[:, None]
    cand = rising & after
    best = torch.where(cand.any(1), cand.float().argmax(1), first)
    best = best.clamp(1, tau_max - 1)
    a = cmnd.gather(1, (best - 1)[:, None])[:, 0]
    b = cmnd.gather(1, best[:, None])[:, 0]
    c = cmnd.gather(1, (best + 1)[:, None])[:, 0]
    den = a - 2 * b + c
    shift = torch.where(den > 0, 0.5 * (a - c) / den.clamp(min=1e-12), torch.zeros_like(den)).clamp(-1, 1)
    f0 = sample_rate / (best.float() + shift)
    return torch.where(found & loud, f0, torch.zeros_like(f0))


class HarmonicComb:
    """The mel-domain ripple that a harmonic source at a given F0 leaves in a frame (0 where unvoiced).

    A log-mel frame of voiced speech is roughly a smooth envelope plus this comb: peaks at the harmonics
    ``k * F0`` (each as wide as the analysis window's main lobe) and dips between them, resolved in the low mel
    bands and averaged away in the wide high ones. A neural decoder finds it hard to draw such a comb from F0
    given as a number (a comb is a rapidly varying function of F0), so the decoder receives it ready-made and
    adds it to its output with learned per-band gains: source-filter synthesis in the mel domain.
    """

    def __init__(self, sample_rate: int, n_fft: int, win_length: int, filterbank: torch.Tensor) -> None:
        self.sample_rate, self.n_fft = sample_rate, n_fft
        self.freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float32) * (sample_rate / n_fft)
        # power response of the analysis window to a sinusoid offset by delta Hz (1 Hz grid, peak 1)
        window = torch.hann_window(win_length, dtype=torch.float64)
        resp = torch.fft.rfft(window, sample_rate).abs().pow(2)
        self.response = (resp / resp[0]).float()[: sample_rate // 2]
        self.reach = float(min(len(self.response) - 2, 8 * sample_rate / win_length))
        self.fb = filterbank
        self.flat = (filterbank @ torch.ones(len(self.freqs))).clamp(min=1e-8)
        # combs are tabulated every 1/8 semitone from 40 to 800 Hz and interpolated: exact evaluation costs
        # ~1500 window lookups per frame, which would double a training step
        self.steps_per_octave = 96
        self.log2_lo = math.log2(40.0)
        n = math.ceil((math.log2(800.0) - self.log2_lo) * self.steps_per_octave) + 1
        grid = 2.0 ** (self.log2_lo + torch.arange(n, dtype=torch.float64) / self.steps_per_octave)
        self.table = self._exact(grid.float())

    def _lookup(self, delta: torch.Tensor) -> torch.Tensor:
        d = delta.abs()
        i0 = d.floor().long().clamp(max=len(self.response) - 2)
        w = d - i0.float()
        val = self.response[i0] * (1 - w) + self.response[i0 + 1] * w
        return torch.where(d < self.reach, val, torch.zeros_like(val))

    def __call__(self, f0: torch.Tensor) -> torch.Tensor:
        """F0 [..., T] in Hz (<= 0 unvoiced) -> log comb [..., T, n_mels] (tabulated, interpolated)."""
        shape = f0.shape
        f = f0.reshape(-1).float()
        voiced = f > 0
        pos = ((torch.log2(f.clamp(min=1e-3)) - self.log2_lo) * self.steps_per_octave).clamp(0, len(self.table) - 1)
        i0 = pos.floor().long().clamp(max=len(self.table) - 2)
        w = (pos - i0.float())[:, None]
        out = self.table[i0] * (1 - w) + self.table[i0 + 1] * w
        out = torch.where(voiced[:, None], out, torch.zeros_like(out))
        return out.reshape(*shape, self.fb.shape[0])

    def _exact(self, f: torch.Tensor) -> torch.Tensor:
        """Log comb [len(f), n_mels] for voiced F0 values ``f`` (Hz, all > 0)."""
        fv = f[:, None]
        k = torch.round(self.freqs[None, :] / fv)
        power = torch.zeros(fv.shape[0], len(self.freqs))
        for m in (-1.0, 0.0, 1.0):  # the nearest harmonic and its two neighbours
            harmonic = k - m
            term = self._lookup(self.freqs[None, :] - harmonic * fv)
            power = power + torch.where(harmonic >= 1, term, torch.zeros_like(term))
        power = power / power.mean(1, keepdim=True).clamp(min=1e-8)
        return torch.log((power @ self.fb.t()) / self.flat + 1e-2)
