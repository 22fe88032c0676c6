"""Discrete bottlenecks: finite scalar quantization (FSQ), residual FSQ and an EMA vector quantizer.

FSQ (Mentzer et al., 2023, arXiv:2309.15505) is the default because it has no codebook to collapse: every
latent channel is squashed to a bounded range and rounded to one of ``L_i`` values, and the code id is the
mixed-radix number formed by the per-channel level indices. Nothing to initialise, no commitment loss, no
dead codes, which is what lets a tokenizer train in a few CPU minutes. The EMA VQ (van den Oord et al. 2017,
Razavi et al. 2019) is kept for comparison and for users who want a learned codebook.

All quantizers take channel-last input ``[..., d]`` and return ``(quantized, indices, ...)``; gradients
pass straight through the rounding. Conventions (level order, index basis, rounding offsets) are chosen to
agree with ``vector-quantize-pytorch`` so that codes are interchangeable; the tests check this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omnitok.errors import OmnitokError


def _round_ste(z: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (the straight-through estimator)."""
    return z + (z.round() - z).detach()


def _floor_ste(z: torch.Tensor) -> torch.Tensor:
    return z + (z.floor() - z).detach()


def _check_levels(levels: Sequence[int], minimum: int) -> list[int]:
    levels = [int(v) for v in levels]
    if not levels or any(v < minimum for v in levels):
        raise OmnitokError(f"FSQ levels must be a non-empty list of integers >= {minimum}, got {levels}")
    return levels


class FSQ(nn.Module):
    """Finite scalar quantization over ``len(levels)`` channels; ``prod(levels)`` implicit codes.

    ``symmetric=False`` is the paper's quantizer (tanh bound with a half-step shift for even ``L``, so the
    grid is ``{-L//2 .. L - L//2 - 1} / (L//2)``). ``symmetric=True`` is the symmetric grid of
    arXiv:2411.19842 (``L`` evenly spaced points in ``[-1, 1]``), which residual FSQ needs so that each
    stage can represent zero residual symmetrically. ``hard_clamp`` replaces tanh by a clamp, for inputs
    that are already bounded. Index of a code: ``sum_i level_index_i * prod(levels[:i])`` (first channel is
    the least significant digit).
    """

    def __init__(
        self, levels: Sequence[int], symmetric: bool = False, hard_clamp: bool = False, eps: float = 1e-3
    ) -> None:
        super().__init__()
        self.levels = _check_levels(levels, 2 if symmetric else 3)
        self.symmetric = symmetric
        self.hard_clamp = hard_clamp
        self.eps = eps
        lv = torch.tensor(self.levels, dtype=torch.long)
        self.register_buffer("_levels", lv, persistent=False)
        basis = torch.cumprod(torch.tensor([1, *self.levels[:-1]], dtype=torch.long), 0)
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _bound_fn(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(-1.0, 1.0) if self.hard_clamp else torch.tanh(z)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Map ``z`` [..., d] onto the grid (normalised to about [-1, 1]), straight-through gradients."""
        lv = self._levels.to(z.dtype)
        if self.symmetric:
            idx = _floor_ste((lv - 1) * (self._bound_fn(z) + 1) / 2 + 0.5)
            return idx * (2.0 / (lv - 1)) - 1.0
        half_l = (lv - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        if self.hard_clamp:
            bounded = (z + offset / half_l).clamp(-1.0, 1.0) * half_l - offset
        else:
            bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
        return _round_ste(bounded) / (self._levels // 2).to(z.dtype)

    def level_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        """Per-channel integer level in ``[0, L_i)`` for grid points ``zhat``."""
        lv = self._levels.to(zhat.dtype)
        if self.symmetric:
            return ((zhat + 1.0) * (lv - 1) / 2).round().long()
        half = (self._levels // 2).to(zhat.dtype)
        return (zhat * half + half).round().long()

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        return (self.level_indices(zhat) * self._basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`codes_to_indices`: ids [...] to grid points [..., d]."""
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels
        lv = self._levels.float()
        if self.symmetric:
            return digits.float() * (2.0 / (lv - 1)) - 1.0
        half = (self._levels // 2).float()
        return (digits.float() - half) / half

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.shape[-1] != self.dim:
            raise OmnitokError(f"FSQ expects {self.dim} channels last (one per level), got shape {list(z.shape)}")
        orig = z.dtype
        zhat = self.quantize(z.float())
        return zhat.to(orig), self.codes_to_indices(zhat.detach())


class ResidualFSQ(nn.Module):
    """``num_quantizers`` FSQ stages, each quantizing what the previous ones left over.

    The input is soft-clamped to ``±(1 + 1/(L-1))``; stage ``q`` sees the residual scaled up by ``L**q``
    (per channel) so the same symmetric grid resolves ever finer detail. ``indices`` has a trailing
    dimension of size ``num_quantizers``; each stage has ``prod(levels)`` codes.
    """

    def __init__(self, levels: Sequence[int], num_quantizers: int) -> None:
        super().__init__()
        levels = _check_levels(levels, 2)
        if num_quantizers < 1:
            raise OmnitokError(f"residual FSQ needs num_quantizers >= 1, got {num_quantizers}")
        self.levels = levels
        self.num_quantizers = int(num_quantizers)
        self.stages = nn.ModuleList(FSQ(levels, symmetric=True, hard_clamp=True) for _ in range(num_quantizers))
        lv = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("scales", torch.stack([lv ** (-q) for q in range(num_quantizers)]), persistent=False)
        self.register_buffer("soft_clamp", 1 + 1 / (lv - 1), persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        """Codes per stage."""
        return math.prod(self.levels)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.shape[-1] != self.dim:
            raise OmnitokError(f"residual FSQ expects {self.dim} channels last, got shape {list(z.shape)}")
        orig = z.dtype
        z = z.float()
        z = torch.tanh(z / self.soft_clamp) * self.soft_clamp
        residual = z
        out = torch.zeros_like(z)
        indices = []
        for stage, scale in zip(self.stages, self.scales, strict=True):
            q, idx = stage(residual / scale)
            q = q * scale
            residual = residual - q.detach()
            out = out + q
            indices.append(idx)
        return out.to(orig), torch.stack(indices, -1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Sum of the stages' scaled grid points for ``indices`` [..., num_quantizers]."""
        if indices.shape[-1] != self.num_quantizers:
            raise OmnitokError(
                f"residual FSQ indices need a last dimension of {self.num_quantizers}, got {list(indices.shape)}"
            )
        out = 0.0
        for q, stage in enumerate(self.stages):
            out = out + stage.indices_to_codes(indices[..., q]) * self.scales[q]
        return out  # type: ignore[return-value]


class EMAVectorQuantizer(nn.Module):
    """Nearest-neighbour VQ whose codebook follows an exponential moving average of its assignments.

    Codes whose smoothed usage falls below ``dead_code_threshold`` are restarted on random inputs from the
    current batch, the standard remedy for codebook collapse. Kept mainly as the baseline FSQ is compared
    against (FSQ needs none of this machinery).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.8,
        eps: float = 1e-5,
        dead_code_threshold: float = 2.0,
        commitment_weight: float = 0.25,
    ) -> None:
        super().__init__()
        if dim < 1 or codebook_size < 2:
            raise OmnitokError(f"EMA VQ needs dim >= 1 and codebook_size >= 2, got {dim}, {codebook_size}")
        if not 0.0 < decay < 1.0:
            raise OmnitokError(f"EMA VQ decay must be in (0, 1), got {decay}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.decay = decay
        self.eps = eps
        self.dead_code_threshold = dead_code_threshold
        self.commitment_weight = commitment_weight
        embed = torch.empty(codebook_size, dim)
        nn.init.kaiming_uniform_(embed)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("cluster_size", torch.ones(codebook_size))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t() + self.embed.pow(2).sum(1)[None, :]
        return dist.argmin(1)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, ind: torch.Tensor) -> None:
        onehot = F.one_hot(ind, self.codebook_size).to(flat.dtype)
        self.cluster_size.lerp_(onehot.sum(0), 1 - self.decay)
        self.embed_avg.lerp_(onehot.t() @ flat, 1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        if self.dead_code_threshold > 0:
            dead = self.cluster_size < self.dead_code_threshold
            n_dead = int(dead.sum())
            if n_dead:
                pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
                fresh = flat[pick]
                self.embed[dead] = fresh
                self.cluster_size[dead] = self.dead_code_threshold
                self.embed_avg[dead] = fresh * self.dead_code_threshold

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(quantized, indices, commitment_loss)``; updates the codebook in training mode."""
        if x.shape[-1] != self.dim:
            raise OmnitokError(f"EMA VQ expects {self.dim} channels last, got shape {list(x.shape)}")
        orig = x.dtype
        flat = x.detach().reshape(-1, self.dim).float()
        ind = self.nearest(flat)
        q = self.embed[ind].reshape(x.shape).to(orig)
        loss = F.mse_loss(x, q.detach()) * self.commitment_weight
        if self.training:
            self._update(flat, ind)
        return x + (q - x).detach(), ind.reshape(x.shape[:-1]), loss

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embed[indices.long()]


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of codes used and the perplexity (exp of code entropy) over a set of code ids.

    Perplexity says how many codes are effectively in use: a codebook of 64k where only a few hundred carry
    the mass wastes vocabulary rows in the language model.
    """
    counts = torch.bincount(indices.reshape(-1).long(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp(min=1)
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {
        "codes_used": int((counts > 0).sum()),
        "fraction_used": float((counts > 0).double().mean()),
        "perplexity": math.exp(entropy),
    }
