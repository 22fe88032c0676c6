"""omnitok's own image tokenizer: a small convolutional autoencoder with an FSQ bottleneck.

Design, for images that are mostly flat colour regions with sharp edges (the toy world) and for CPU budgets:

* **Overlapping convolutional stem** (3x3 stride-2 convs, as LeViT found better than non-overlapping patch
  embedding for low-level detail): the first layer already works at half resolution, so no convolution ever
  runs at full resolution in the encoder.
* **Gated-CNN blocks** (MambaOut's block without the SSM): a 1x1 expansion split into a gate and a value, a
  depthwise 7x7 conv on part of the value, a 1x1 projection back, residual. Large receptive field for little
  compute, which matters at 2 CPU cores.
* **FSQ bottleneck** (``quantizers.FSQ``; optionally residual FSQ): no codebook to collapse, nothing to tune.
* **Decoder** mirrors the encoder (or takes its own ``decoder_depths``) and ends in a pixel shuffle, again
  avoiding full-resolution convolutions.

Training (``train_image_tokenizer``, ``omnitok tokenizer train image``) is tuned for minutes on a CPU: 32x32
crops chosen for content, L1 + MSE weighted up on content pixels and, strongly, on pixels next to colour
edges (where a square's corners and a star's arms are decided), AdamW with warmup and cosine decay, and one
intra-op thread when other processes keep the cores busy. A patch discriminator is available for GPU runs.

Token layout: codes are row-major over the ``grid`` (``h x w``). With residual FSQ (``num_quantizers = Q >
1``) each position contributes ``Q`` consecutive tokens, stage ``q`` using ids ``q * K + code`` where ``K =
prod(levels)``; so ``codebook_size = Q * K``, every stage owns its own contiguous id range (a vocabulary can
give each its own block) and ``tokens_per_item = h * w * Q``.

Videos reuse the contract per frame: a clip [T, H, W, 3] is a batch, ``encode`` returns [T, tokens].
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnitok.errors import OmnitokError, check_numbers
from omnitok.optim import adamw, load_state, save_state
from omnitok.tokenizers.base import (
    TRAIN_NON_NEGATIVE,
    TRAIN_POSITIVE,
    ImageInput,
    as_code_batch,
    as_image_batch,
    from_uint8_images,
    load_config_and_weights,
    read_checkpoint,
    resolve_tokenizer_dir,
    save_config_and_weights,
    to_uint8_images,
)
from omnitok.tokenizers.quantizers import FSQ, ResidualFSQ

FORMAT_VERSION = 1
KIND = "image_fsq"


@dataclass
class ImageTokenizerConfig:
    """Architecture of the FSQ image tokenizer; everything needed to rebuild it from ``config.json``."""

    image_size: int = 64
    downsample: int = 8
    widths: tuple[int, ...] = (24, 48, 96, 128)  # per stage, fine to coarse; f4 uses 2 stages, f16 all 4
    depths: tuple[int, ...] = (0, 1, 2, 2)  # gated-CNN blocks per stage (none at the stem's resolution)
    levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)
    num_quantizers: int = 1
    expansion: float = 2.0
    kernel_size: int = 7
    decoder_depths: tuple[int, ...] | None = None  # blocks per decoder stage, coarse to fine; None mirrors

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        self.depths = tuple(int(d) for d in self.depths)
        self.levels = tuple(int(v) for v in self.levels)
        if self.decoder_depths is not None:
            self.decoder_depths = tuple(int(d) for d in self.decoder_depths)
            if len(self.decoder_depths) != self.num_stages:
                raise OmnitokError(
                    f"image tokenizer: decoder_depths needs {self.num_stages} entries (coarse to fine) for "
                    f"downsample {self.downsample}, got {list(self.decoder_depths)}"
                )
        if self.downsample not in (4, 8, 16):
            raise OmnitokError(f"image tokenizer downsample must be 4, 8 or 16, got {self.downsample}")
        n = self.num_stages
        if len(self.widths) < n or len(self.depths) < n:
            raise OmnitokError(
                f"image tokenizer: downsample {self.downsample} needs {n} stages, got widths {list(self.widths)}"
                f" and depths {list(self.depths)}"
            )
        if self.image_size % self.downsample:
            raise OmnitokError(
                f"image tokenizer: image_size {self.image_size} is not a multiple of downsample {self.downsample}"
            )
        if self.num_quantizers < 1:
            raise OmnitokError(f"image tokenizer: num_quantizers must be >= 1, got {self.num_quantizers}")
        if any(v < (2 if self.num_quantizers > 1 else 3) for v in self.levels) or not self.levels:
            raise OmnitokError(f"image tokenizer: FSQ levels must be integers >= 3, got {list(self.levels)}")

    @property
    def num_stages(self) -> int:
        return int(math.log2(self.downsample))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> ImageTokenizerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise OmnitokError(f"{where}: unknown image tokenizer fields {unknown}; known: {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise OmnitokError(f"{where}: bad image tokenizer config: {e}") from e


# ----------------------------------------------------------------------------------------------- layers


class ChannelNorm(nn.Module):
    """LayerNorm over channels of a [B, C, H, W] map (per position, as in ConvNeXt/MambaOut)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        x = (x - mu) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class GatedCNNBlock(nn.Module):
    """MambaOut's gated CNN block: ``x + proj(act(gate) * [identity | dwconv](value))``."""

    def __init__(self, dim: int, expansion: float = 2.0, kernel_size: int = 7, conv_ratio: float = 0.5) -> None:
        super().__init__()
        hidden = int(expansion * dim)
        self.conv_ch = max(1, int(conv_ratio * hidden))
        self.hidden = hidden
        self.norm = ChannelNorm(dim)
        self.fc1 = nn.Conv2d(dim, 2 * hidden, 1)
        self.conv = nn.Conv2d(self.conv_ch, self.conv_ch, kernel_size, padding=kernel_size // 2, groups=self.conv_ch)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, v = self.fc1(self.norm(x)).chunk(2, dim=1)
        keep, c = v.split([self.hidden - self.conv_ch, self.conv_ch], dim=1)
        v = torch.cat([keep, self.conv(c)], dim=1)
        return x + self.fc2(self.act(g) * v)


class Encoder(nn.Module):
    def __init__(self, cfg: ImageTokenizerConfig) -> None:
        super().__init__()
        w = cfg.widths[: cfg.num_stages]
        d = cfg.depths[: cfg.num_stages]
        # overlapping stem: 3x3 stride 2, then a 3x3 at half resolution
        self.stem = nn.Sequential(
            nn.Conv2d(3, w[0], 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(w[0], w[0], 3, padding=1)
        )
        stages: list[nn.Module] = []
        for i in range(cfg.num_stages):
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(nn.Conv2d(w[i - 1], w[i], 3, stride=2, padding=1))
            layers += [GatedCNNBlock(w[i], cfg.expansion, cfg.kernel_size) for _ in range(d[i])]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.out = nn.Sequential(ChannelNorm(w[-1]), nn.Conv2d(w[-1], len(cfg.levels), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.stages(self.stem(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: ImageTokenizerConfig) -> None:
        super().__init__()
        w = cfg.widths[: cfg.num_stages][::-1]
        d = cfg.decoder_depths or cfg.depths[: cfg.num_stages][::-1]
        self.inp = nn.Conv2d(len(cfg.levels), w[0], 3, padding=1)
        stages: list[nn.Module] = []
        for i in range(len(w)):
            layers: list[nn.Module] = [GatedCNNBlock(w[i], cfg.expansion, cfg.kernel_size) for _ in range(d[i])]
            if i + 1 < len(w):  # upsample x2 by sub-pixel convolution
                layers += [nn.Conv2d(w[i], 4 * w[i + 1], 3, padding=1), nn.PixelShuffle(2)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.out = nn.Sequential(
            ChannelNorm(w[-1]), nn.GELU(), nn.Conv2d(w[-1], 3 * 4, 3, padding=1), nn.PixelShuffle(2)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.stages(self.inp(z)))


class PatchDiscriminator(nn.Module):
    """A small PatchGAN critic (hinge loss) for GPU recipes; sharpens texture, unnecessary for flat scenes."""

    def __init__(self, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = width
        for _ in range(1, layers):
            mods += [nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1), nn.GroupNorm(8, ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        mods.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------------------------- tokenizer


class ImageTokenizer(nn.Module):
    """FSQ image tokenizer meeting omnitok's modality-tokenizer contract (see module docstring)."""

    def __init__(self, config: ImageTokenizerConfig | None = None) -> None:
        super().__init__()
        self.config = config or ImageTokenizerConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        if self.config.num_quantizers > 1:
            self.quantizer: FSQ | ResidualFSQ = ResidualFSQ(self.config.levels, self.config.num_quantizers)
        else:
            self.quantizer = FSQ(self.config.levels)
        self.encode_batch_size = 128
        # channels-last is several times faster for depthwise convolutions on CPU (oneDNN)
        self.to(memory_format=torch.channels_last)

    # --- contract properties
    @property
    def level_codebook_size(self) -> int:
        """Codes per residual stage (``prod(levels)``)."""
        return math.prod(self.config.levels)

    @property
    def num_levels(self) -> int:
        """Residual FSQ stages (1 for plain FSQ); each position yields this many consecutive tokens."""
        return self.config.num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.level_codebook_size * self.num_levels

    @torch.no_grad()
    def code_vectors(self, level: int = 0) -> torch.Tensor:
        """The latent every code of ``level`` stands for, [level codebook size, len(levels)].

        What the decoder sees for a code: neighbouring grid points decode to similar patches. The trainer can start
        the LM's embedding rows from these (``code_embeddings: codec``), so the LM begins knowing which codes are
        alike instead of learning thousands of unrelated rows from scratch.
        """
        if not 0 <= level < self.num_levels:
            raise OmnitokError(f"image tokenizer has levels 0..{self.num_levels - 1}, got {level}")
        ids = torch.arange(self.level_codebook_size)
        q = self.quantizer
        if isinstance(q, ResidualFSQ):
            return q.stages[level].indices_to_codes(ids) * q.scales[level]
        return q.indices_to_codes(ids)

    @property
    def grid(self) -> tuple[int, int]:
        s = self.config.image_size // self.config.downsample
        return (s, s)

    @property
    def tokens_per_item(self) -> int:
        h, w = self.grid
        return h * w * self.num_levels

    def level_offsets(self) -> list[int]:
        """First id of each residual stage's range."""
        return [q * self.level_codebook_size for q in range(self.num_levels)]

    # --- differentiable path (training)
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` float [B, 3, H, W] in [-1, 1] -> (reconstruction in the same range, indices [B, h, w(, Q)])."""
        z = self.encoder(x).permute(0, 2, 3, 1)
        zq, idx = self.quantizer(z)
        return self.decoder(zq.permute(0, 3, 1, 2)), idx

    # --- contract
    def _check_size(self, h: int, w: int) -> None:
        f = self.config.downsample
        if h % f or w % f:
            raise OmnitokError(
                f"images: height and width must be multiples of {f} (the tokenizer's downsampling), got {h}x{w};"
                f" this tokenizer was trained at {self.config.image_size}x{self.config.image_size}"
            )

    @torch.inference_mode()
    def encode(self, images: ImageInput) -> torch.Tensor:
        """uint8 images [B, H, W, 3] (or one [H, W, 3]) -> int64 codes [B, tokens] (or [tokens])."""
        x, single = as_image_batch(images)
        self._check_size(x.shape[1], x.shape[2])
        was_training = self.training
        self.eval()
        out = []
        for i in range(0, x.shape[0], self.encode_batch_size):
            xb = from_uint8_images(x[i : i + self.encode_batch_size]).contiguous(memory_format=torch.channels_last)
            z = self.encoder(xb).permute(0, 2, 3, 1)
            _, idx = self.quantizer(z)
            if self.num_levels > 1:
                idx = idx + torch.tensor(self.level_offsets(), dtype=idx.dtype)
            out.append(idx.reshape(idx.shape[0], -1))
        self.train(was_training)
        codes = torch.cat(out).long()
        return codes[0] if single else codes

    def _grid_for(self, n: int) -> tuple[int, int]:
        per_pos = n // self.num_levels
        if n == self.tokens_per_item:
            return self.grid
        side = math.isqrt(per_pos) if n % self.num_levels == 0 else 0
        if side and side * side * self.num_levels == n:
            return (side, side)
        raise OmnitokError(
            f"codes: expected {self.tokens_per_item} tokens per image (grid {self.grid[0]}x{self.grid[1]}"
            f" x {self.num_levels} level(s)), got {n}; pass [B, h, w] codes for non-square grids"
        )

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Flat or gridded codes -> quantized latents [B, d, h, w] (checks ranges per residual level)."""
        codes = as_code_batch(codes, self.codebook_size)
        if codes.ndim == 1:
            codes = codes[None]
        if codes.ndim == 2:
            h, w = self._grid_for(codes.shape[1])
            codes = codes.reshape(codes.shape[0], h, w * self.num_levels)
        if codes.ndim != 3:
            raise OmnitokError(f"codes: expected shape [tokens], [B, tokens] or [B, h, w], got {list(codes.shape)}")
        b, h, wq = codes.shape
        if wq % self.num_levels:
            raise OmnitokError(f"codes: last dimension {wq} is not a multiple of the {self.num_levels} levels")
        codes = codes.reshape(b, h, wq // self.num_levels, self.num_levels)
        k = self.level_codebook_size
        level = codes // k
        expect = torch.arange(self.num_levels).view(1, 1, 1, -1)
        if (level != expect).any():
            raise OmnitokError(f"codes out of range for their residual level: level q must use ids [q*{k}, (q+1)*{k})")
        local = codes - expect * k
        if self.num_levels == 1:
            zq = self.quantizer.indices_to_codes(local[..., 0])
        else:
            zq = self.quantizer.indices_to_codes(local)
        return zq.permute(0, 3, 1, 2).float()

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Codes [B, tokens], [tokens] or [B, h, w] -> uint8 images [B, H, W, 3] (or [H, W, 3])."""
        single = isinstance(codes, torch.Tensor | np.ndarray) and codes.ndim == 1
        zq = self.codes_to_latents(codes).contiguous(memory_format=torch.channels_last)
        was_training = self.training
        self.eval()
        out = [
            to_uint8_images(self.decoder(zq[i : i + self.encode_batch_size]))
            for i in range(0, zq.shape[0], self.encode_batch_size)
        ]
        self.train(was_training)
        images = torch.cat(out)
        return images[0] if single else images

    @torch.inference_mode()
    def reconstruct(self, images: ImageInput) -> torch.Tensor:
        return self.decode(self.encode(images))

    # --- persistence
    def config_dict(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        return {
            "omnitok_tokenizer": KIND,
            "format_version": FORMAT_VERSION,
            "modality": "image",
            "codebook_size": self.codebook_size,
            "level_codebook_size": self.level_codebook_size,
            "num_levels": self.num_levels,
            "tokens_per_item": self.tokens_per_item,
            "grid": list(self.grid),
            "architecture": cfg,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``path`` (created if needed)."""
        return save_config_and_weights(path, self.config_dict(), self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ImageTokenizer:
        p = resolve_tokenizer_dir(path)
        cfg, state = load_config_and_weights(p, "image tokenizer")
        if cfg.get("omnitok_tokenizer") != KIND:
            raise OmnitokError(f"{p}/config.json: not an omnitok FSQ image tokenizer (field omnitok_tokenizer)")
        if int(cfg.get("format_version", -1)) > FORMAT_VERSION:
            raise OmnitokError(
                f"{p}/config.json: format_version {cfg.get('format_version')} is newer than this omnitok"
                f" reads ({FORMAT_VERSION}); upgrade omnitok"
            )
        arch = cfg.get("architecture")
        if not isinstance(arch, dict):
            raise OmnitokError(f"{p}/config.json: missing 'architecture' object")
        model = cls(ImageTokenizerConfig.from_dict(arch, f"{p}/config.json architecture"))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise OmnitokError(f"{p}/model.safetensors does not match config.json: {e}") from e
        model.eval()
        return model


# ----------------------------------------------------------------------------------------------- losses


def edge_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences of reconstruction and target.

    Kept as an option (``edge_weight``): on the toy world at CPU budgets it slowed learning (parser
    exact-match after 500 steps: 29 % without it, 19 % at weight 0.3, 12 % at 1.0), because matching
    gradients of a still-blurry output pulls towards thin, misplaced ridges. :func:`boundary_mask` weighting
    of the pixel losses is the edge term the default recipe uses instead.
    """
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def boundary_mask(target: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """1 within two pixels of a colour edge of the target [B, 3, H, W], else 0.

    Shape is decided at boundaries (a square's corners, a star's arms), and boundary pixels are a few percent
    of an image, so pixel losses learn them last; weighting them (``boundary_weight``) raised the parser's
    exact-match after 500 steps from 29 % to 87 % in our runs.
    """
    dx = (target[..., :, 1:] - target[..., :, :-1]).abs().amax(1, keepdim=True)
    dy = (target[..., 1:, :] - target[..., :-1, :]).abs().amax(1, keepdim=True)
    e = F.pad(dx, (0, 1)).maximum(F.pad(dy, (0, 0, 0, 1)))
    e = e.maximum(F.pad(dx, (1, 0))).maximum(F.pad(dy, (0, 0, 1, 0)))
    return (F.max_pool2d(e, 3, stride=1, padding=1) > threshold).to(target.dtype)


def foreground_weights(target: torch.Tensor, strength: float, scale: float = 0.1) -> torch.Tensor | None:
    """Per-pixel weights ``1 + strength * min(1, |x - median colour| / scale)`` for [B, 3, H, W] targets.

    In scenes of small objects on a plain background almost every pixel is background, and an autoencoder
    first settles into drawing background only (a deep local minimum for L1). Weighting pixels by how far
    they are from the image's median colour puts the gradient where the content is; on natural images it
    is a mild contrast weighting.
    """
    if strength <= 0:
        return None
    med = target.flatten(2).median(dim=2).values[:, :, None, None]
    d = (target - med).abs().mean(1, keepdim=True)
    return 1.0 + strength * (d / scale).clamp(max=1.0)


def reconstruction_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    l1: float = 1.0,
    mse: float = 1.0,
    edge: float = 1.0,
    foreground: float = 0.0,
    boundary: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + MSE, weighted per pixel by content (``foreground``) and edges (``boundary``), plus the optional
    gradient-difference term (``edge``); returns the total and its parts (for the log)."""
    w = foreground_weights(target, foreground)
    if boundary > 0:
        w = (1.0 if w is None else w) + boundary * boundary_mask(target)
    if w is None:
        parts = {"l1": F.l1_loss(recon, target), "mse": F.mse_loss(recon, target)}
    else:
        norm = w.mean() * recon.shape[1]
        diff = recon - target
        parts = {
            "l1": (diff.abs() * w).sum(1).mean() / norm,
            "mse": (diff.pow(2) * w).sum(1).mean() / norm,
        }
    parts["edge"] = edge_loss(recon, target)
    total = l1 * parts["l1"] + mse * parts["mse"] + edge * parts["edge"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Mean per-image PSNR (dB) of two uint8 batches [B, H, W, 3]; identical images count as 100 dB."""
    a = torch.as_tensor(np.asarray(a)).double()
    b = torch.as_tensor(np.asarray(b)).double()
    mse = (a - b).pow(2).flatten(1).mean(1)
    val = 10 * torch.log10(255.0**2 / mse.clamp(min=1e-10))
    return float(val.clamp(max=100.0).mean())


def ssim(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, window: int = 7) -> float:
    """Mean SSIM (Wang et al. 2004) of uint8 batches [B, H, W, 3]: uniform 7x7 window per channel, C1/C2 as
    in the paper (K1=0.01, K2=0.03, L=255), averaged over valid positions, channels and images."""
    x = torch.as_tensor(np.asarray(a)).double().permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(b)).double().permute(0, 3, 1, 2)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, window, stride=1)

    n = window * window
    cov_norm = n / (n - 1)
    mx, my = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - mx * mx)
    vy = cov_norm * (mean(y * y) - my * my)
    cxy = cov_norm * (mean(x * y) - mx * my)
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


# ----------------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """How to train; recorded in the run's config.json and checkpoint so a resume continues the same run."""

    steps: int = 1800
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.02
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    edge_weight: float = 0.0
    foreground_weight: float = 4.0
    boundary_weight: float = 20.0
    disc_weight: float = 0.0
    disc_start: int = 0
    flip: bool = True
    crop: int | None = 32
    crop_candidates: int = 4
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 250
    max_images: int | None = None
    val_images: int = 256
    max_minutes: float | None = None
    threads: int | None = None
    device: str = "cpu"
    arch: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_numbers(
            self,
            "image tokenizer train config",
            positive=(*TRAIN_POSITIVE, "batch_size", "max_images"),
            non_negative=(*TRAIN_NON_NEGATIVE, "disc_weight", "disc_start"),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "train config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise OmnitokError(f"{where}: unknown training fields {unknown}; known: {sorted(known)}")
        return cls(**d)


# Fields that change how a run is executed or observed, not what it computes: a resume may change them.
_OPERATIONAL = frozenset({"max_minutes", "threads", "device", "log_every", "checkpoint_every", "val_images"})


def lr_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``: fast early progress, a clean finish.

    With ``max_minutes`` set, the decay follows whichever is further along, steps or the time budget, so a
    run cut short by its budget still ends annealed instead of at a high learning rate (such a run then
    depends on the machine's speed; without a budget it is reproducible).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.max_minutes:
        t = max(t, elapsed_s / (cfg.max_minutes * 60))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def content_crops(images: torch.Tensor, size: int, gen: torch.Generator, candidates: int, align: int) -> torch.Tensor:
    """Crop uint8 images [B, H, W, 3] to ``size``, keeping the busiest of ``candidates`` random crops.

    The autoencoder is convolutional, so it can learn from crops; choosing crops that hold content (pixels
    away from the median colour) spends the compute of a step on objects and edges rather than on empty
    background, about 3x more edge pixels per second of training on the toy world. Offsets are multiples
    of ``align`` (the downsampling factor) so crops keep the token grid's phase.
    """
    b, h, w, _ = images.shape
    if size >= h and size >= w:
        return images
    med = images.flatten(1, 2).float().median(1).values
    fg = ((images.float() - med[:, None, None, :]).abs().mean(-1) > 12).float()
    ny, nx = (h - size) // align + 1, (w - size) // align + 1
    oy = torch.randint(0, ny, (b, candidates), generator=gen) * align
    ox = torch.randint(0, nx, (b, candidates), generator=gen) * align
    integral = F.pad(fg.cumsum(1).cumsum(2), (1, 0, 1, 0))
    bi = torch.arange(b)[:, None]
    score = (
        integral[bi, oy + size, ox + size]
        - integral[bi, oy, ox + size]
        - integral[bi, oy + size, ox]
        + integral[bi, oy, ox]
    )
    best = score.argmax(1)
    y0, x0 = oy[torch.arange(b), best], ox[torch.arange(b), best]
    rows = (y0[:, None] + torch.arange(size)[None, :])[:, :, None]
    cols = (x0[:, None] + torch.arange(size)[None, :])[:, None, :]
    return images[bi[:, :, None], rows, cols]


def _augment(x: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    if not flip:
        return x
    m = torch.rand(x.shape[0], generator=gen) < 0.5
    if m.any():
        x = x.clone()
        x[m] = x[m].flip(-1)
    return x


def evaluate_reconstruction(tok: ImageTokenizer, images: np.ndarray) -> dict[str, float]:
    rec = tok.reconstruct(images).numpy()
    return {"psnr": psnr(images, rec), "ssim": ssim(images, rec)}


def train_image_tokenizer(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    train: TrainConfig | None = None,
    resume: bool = True,
    progress: bool = True,
    images: np.ndarray | None = None,
    val_images: np.ndarray | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train an FSQ image tokenizer on a world's ``train`` split (PNG samples in WebDataset shards).

    Layout of ``out``: ``config.json`` (the run record), ``log.json`` (one entry per ``log_every`` steps),
    ``checkpoint/`` (model + optimizer as safetensors, ``state.json``; resumed automatically),
    ``tokenizer/`` (the final tokenizer: ``config.json`` + ``model.safetensors``), ``summary.json``.
    Batches are drawn by a generator seeded with ``(seed, step)``, so a resumed run sees the same data as an
    uninterrupted one.
    """
    from omnitok.threads import auto_threads, torch_threads

    train = train or TrainConfig()
    with torch_threads(train.threads or auto_threads()):
        return _train_image_tokenizer(data, out, train, resume, progress, images, val_images, on_log)


def _train_image_tokenizer(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    train: TrainConfig,
    resume: bool,
    progress: bool,
    images: np.ndarray | None,
    val_images: np.ndarray | None,
    on_log: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from safetensors.torch import save_file

    from omnitok.io import atomic_path, atomic_write_json, ensure_writable_dir, read_json, write_run_config
    from omnitok.tokenizers.base import load_split_images

    out_dir = ensure_writable_dir(out, "tokenizer training output directory")
    arch = ImageTokenizerConfig.from_dict(dict(train.arch), "arch")
    device = torch.device(train.device)

    if images is None:
        images, _ = load_split_images(data, "train", limit=train.max_images)
    if val_images is None:
        try:
            val_images, _ = load_split_images(data, "val", limit=train.val_images)
        except OmnitokError:
            val_images = images[-min(len(images), train.val_images) :]
    if images.shape[1] % arch.downsample or images.shape[2] % arch.downsample:
        raise OmnitokError(
            f"{data}: images are {images.shape[1]}x{images.shape[2]}, not multiples of {arch.downsample}"
        )
    if images.shape[1] != arch.image_size:
        arch.image_size = int(images.shape[1])

    config_record = {"data": str(data), "train": asdict(train) | {"arch": asdict(arch)}, "n_train": len(images)}
    identity = {k: v for k, v in config_record["train"].items() if k not in _OPERATIONAL}
    ckpt = out_dir / "checkpoint"
    state_path = ckpt / "state.json"
    torch.manual_seed(train.seed)
    model = ImageTokenizer(arch).to(device)
    disc = PatchDiscriminator().to(device) if train.disc_weight > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, device, lr=train.lr, betas=(0.9, 0.99), weight_decay=train.weight_decay)
    opt_d = adamw(disc.parameters(), device, lr=train.lr * 0.5, betas=(0.5, 0.9)) if disc else None
    start, log, elapsed_before = 0, [], 0.0

    if resume and state_path.is_file():
        st = read_json(state_path, "checkpoint state")
        if st.get("identity") != json.loads(json.dumps(identity)):
            raise OmnitokError(
                f"{out_dir}: a checkpoint from a different configuration exists ({state_path}); "
                "use a new --out directory or --no-resume"
            )
        tensors, opt_t = read_checkpoint(ckpt)
        model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
        load_state(opt, "opt", opt_t, st["optimizer"])
        if disc is not None and opt_d is not None:
            disc.load_state_dict({k[len("disc.") :]: v for k, v in tensors.items() if k.startswith("disc.")})
            load_state(opt_d, "optd", opt_t, st["optimizer_d"])
        start, elapsed_before = int(st["step"]), float(st.get("elapsed_s", 0.0))
        log = read_json(out_dir / "log.json", "training log") if (out_dir / "log.json").is_file() else []
        log = [e for e in log if e.get("step", 0) <= start]
    write_run_config(out_dir, "omnitok tokenizer train image", config_record)

    def save_checkpoint(step: int, elapsed: float) -> None:
        ckpt.mkdir(exist_ok=True)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        opt_t, opt_meta = save_state(opt, "opt")
        st: dict[str, Any] = {
            "step": step,
            "elapsed_s": elapsed,
            "identity": identity,
            "train": config_record["train"],
            "optimizer": opt_meta,
        }
        if disc is not None and opt_d is not None:
            tensors |= {f"disc.{k}": v for k, v in disc.state_dict().items()}
            t2, m2 = save_state(opt_d, "optd")
            opt_t |= t2
            st["optimizer_d"] = m2
        for name, t in (("model.safetensors", tensors), ("optimizer.safetensors", opt_t)):
            with atomic_path(ckpt / name) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in t.items()}, str(tmp))
        atomic_write_json(state_path, st)  # written last: it vouches for the two files above
        atomic_write_json(out_dir / "log.json", log)

    data_t = torch.from_numpy(images)
    n = len(data_t)
    t0 = time.perf_counter()
    step = start
    model.train()

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]image tokenizer"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    stopped_early = False
    done = start
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=train.steps, completed=start, info="")
        try:
            for step in range(start, train.steps):
                gen = torch.Generator().manual_seed(train.seed * 1_000_003 + step)
                idx = torch.randint(0, n, (train.batch_size,), generator=gen)
                xb = data_t[idx]
                if train.crop:
                    xb = content_crops(xb, train.crop, gen, train.crop_candidates, arch.downsample)
                x = _augment(from_uint8_images(xb), gen, train.flip)
                x = x.to(device).contiguous(memory_format=torch.channels_last)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, train, elapsed_before + time.perf_counter() - t0)
                recon, _ = model(x)
                loss, parts = reconstruction_loss(
                    recon,
                    x,
                    train.l1_weight,
                    train.mse_weight,
                    train.edge_weight,
                    train.foreground_weight,
                    train.boundary_weight,
                )
                if disc is not None and opt_d is not None and step >= train.disc_start:
                    g_loss = -disc(recon).mean()
                    loss = loss + train.disc_weight * g_loss
                    parts["gen"] = float(g_loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
                opt.step()
                if disc is not None and opt_d is not None and step >= train.disc_start:
                    d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean()
                    opt_d.zero_grad(set_to_none=True)
                    d_loss.backward()
                    opt_d.step()
                    parts["disc"] = float(d_loss)
                done = step + 1
                elapsed = elapsed_before + time.perf_counter() - t0
                if done % train.log_every == 0 or done == train.steps:
                    entry = {
                        "step": done,
                        "loss": float(loss.detach()),
                        "lr": opt.param_groups[0]["lr"],
                        "elapsed_s": round(elapsed, 2),
                    }
                    entry |= {k: round(v, 6) for k, v in parts.items()}
                    log.append(entry)
                    if on_log:
                        on_log(entry)
                    atomic_write_json(out_dir / "log.json", log)
                    bar.update(task, info=f"loss {float(loss.detach()):.4f}")
                if done % train.checkpoint_every == 0 and done < train.steps:
                    save_checkpoint(done, elapsed)
                bar.update(task, completed=done)
                if train.max_minutes is not None and elapsed > train.max_minutes * 60:
                    stopped_early = done < train.steps
                    break
        except KeyboardInterrupt:
            save_checkpoint(done, elapsed_before + time.perf_counter() - t0)
            raise
    step = max(start, done)
    elapsed = elapsed_before + time.perf_counter() - t0
    save_checkpoint(step, elapsed)
    model.eval()
    tok_dir = model.save(out_dir / "tokenizer")
    metrics = evaluate_reconstruction(model, val_images)
    summary = {
        "steps": step,
        "completed": step >= train.steps,
        "stopped_by_time_limit": stopped_early,
        "train_seconds": round(elapsed, 2),
        "threads": torch.get_num_threads(),
        "n_train": n,
        "val": metrics,
        "codebook_size": model.codebook_size,
        "tokens_per_item": model.tokens_per_item,
        "tokenizer": str(tok_dir),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def shapes_demo_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Flat-colour rectangles and discs on a plain background: a stand-in for the toy world in tests."""
    rng = np.random.default_rng(seed)
    palette = np.array(
        [[230, 40, 40], [40, 180, 60], [40, 80, 230], [240, 210, 40], [160, 60, 200], [250, 140, 30]], np.uint8
    )
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = (235, 235, 235)
        for _ in range(rng.integers(1, 4)):
            c = palette[rng.integers(len(palette))]
            r = int(rng.integers(size // 10, size // 4))
            cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
            if rng.random() < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            img[mask] = c
        out[i] = img
    return out


def default_config(**overrides: Any) -> ImageTokenizerConfig:
    return ImageTokenizerConfig(**overrides)


__all__: Sequence[str] = (
    "ImageTokenizer",
    "ImageTokenizerConfig",
    "PatchDiscriminator",
    "TrainConfig",
    "edge_loss",
    "psnr",
    "shapes_demo_images",
    "ssim",
    "train_image_tokenizer",
)
