"""How hard is it to *read* a scene from image tokens? A probe that the LM's caption task is an indirect version of.

The longer LM run captions a quarter of seen-composition test scenes exactly and binds colours and shapes to the
wrong objects. Is that the tokenizer (its codes hide what a reader needs), the number of distinct scenes, or just
LM compute? This probe answers it without an LM: a small transformer reads one image (64 code ids, each code's
latent vector, or the raw 8x8 pixel patches in the same raster order) and names the front object of each of the 9
cells (empty, or colour x shape x size), with dense supervision — a far easier signal than a caption. Same probe,
same steps and batch for each input; only the input or the number of training scenes differs.

    python benchmarks/image_readability.py --world runs/world8k --tokenizer runs/image-tok-4k \
        --train-scenes 6000 --inputs ids pixels --steps 1500

Inputs: ``ids`` (a free embedding row per code, random init), ``ids-codec`` (rows start as the LM's
``code_embeddings: codec`` starts them: random + a projection of the code's latent), ``ids-proj`` (rows start as the
projection alone), ``vectors`` (the fixed latent through a learned linear map: rows that stay a function of the
code), ``pixels``.

Reading off the table: if pixels beat ids by a wide margin, the tokenizer is what limits reading; if more training
scenes lift test accuracy where fewer plateau, the world is too small for the image tasks; if ``vectors`` beat
``ids``, the LM should see what the codec knows about each code.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from _common import command, machine, table
from omnitok.tokenizers.base import load_split_images
from omnitok.tokenizers.image import ImageTokenizer
from omnitok.world.scene import COLORS, GRID, SHAPES, Scene, scene_from_json

PATCH = 8
N_LABELS = 1 + len(COLORS) * len(SHAPES) * 2


def _cell_labels(scenes: list[Scene]) -> torch.Tensor:
    """[n, 9]: 0 for an empty cell, else 1 + (colour, shape, size) of the front-most object in it."""
    y = torch.zeros(len(scenes), GRID * GRID, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for o in scene:  # drawn back to front: a later object in the same cell is in front
            y[i, o.row * GRID + o.col] = (
                1 + (COLORS.index(o.color) * len(SHAPES) + SHAPES.index(o.shape)) * 2 + (o.size == "large")
            )
    return y


def _load(world: str, split: str, n: int) -> tuple[np.ndarray, list[Scene]]:
    images, samples = load_split_images(world, split, limit=n, with_meta=True)
    return images, [scene_from_json(s.meta["scene"]) for s in samples]


def _inputs(images: np.ndarray, kind: str, tok: ImageTokenizer) -> torch.Tensor:
    out = []
    for lo in range(0, len(images), 256):
        b = images[lo : lo + 256]
        if kind == "pixels":  # raster order of 8x8 patches, like the tokenizer's grid: [n, 64, 192]
            x = torch.from_numpy(b).float() / 255
            h = x.shape[1] // PATCH
            out.append(x.reshape(len(b), h, PATCH, h, PATCH, 3).permute(0, 1, 3, 2, 4, 5).reshape(len(b), h * h, -1))
        elif kind == "vectors":  # each code's latent (what `code_embeddings: codec` starts the LM's rows from)
            out.append(tok.code_vectors()[tok.encode(b).reshape(len(b), -1)])
        else:
            out.append(tok.encode(b).reshape(len(b), -1))
    return torch.cat(out)


class Probe(nn.Module):
    """Encoder over the 64 positions (learned positions), then one query per cell."""

    def __init__(self, kind: str, vocab_or_dim: int, positions: int, d: int = 128) -> None:
        super().__init__()
        if kind.startswith("ids"):
            self.embed: nn.Module = nn.Embedding(vocab_or_dim, d)
        else:
            self.embed = nn.Sequential(nn.Linear(vocab_or_dim, d), nn.GELU(), nn.Linear(d, d))
        self.pos = nn.Parameter(torch.randn(positions, d) * 0.02)
        self.queries = nn.Parameter(torch.randn(GRID * GRID, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d, 4, 4 * d, 0.0, batch_first=True, norm_first=True), 1
        )
        self.head = nn.Linear(d, N_LABELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x) + self.pos)
        return self.head(self.decoder(self.queries.expand(x.shape[0], -1, -1), h))


def _run(kind: str, x_tr, y_tr, x_te, y_te, tok: ImageTokenizer, args) -> list[tuple[int, float, float]]:
    torch.manual_seed(args.seed)
    probe = Probe(kind, tok.codebook_size if kind.startswith("ids") else x_tr.shape[-1], x_tr.shape[1])
    if kind in ("ids-codec", "ids-proj"):  # as omnitok.model.init_code_embeddings does for the LM's rows
        with torch.no_grad():
            v = tok.code_vectors().float()
            v = (v - v.mean(0)) / v.std(0).clamp(min=1e-6)
            w = probe.embed.weight
            proj = torch.randn(v.shape[1], w.shape[1]) * (float(w.std()) / v.shape[1] ** 0.5)
            if kind == "ids-proj":
                w.zero_()
            w += v @ proj
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.01)
    curve = []
    for step in range(args.steps + 1):
        if step % args.every == 0:
            with torch.no_grad():
                hit = probe(x_te).argmax(-1) == y_te
            curve.append((step, hit.float().mean().item(), hit.all(1).float().mean().item()))
            print(f"{kind} step {step}: cell {curve[-1][1]:.3f} scene {curve[-1][2]:.3f}", flush=True)
        idx = torch.randint(0, len(x_tr), (args.batch,))  # the seeded global generator
        loss = nn.functional.cross_entropy(probe(x_tr[idx]).flatten(0, 1), y_tr[idx].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", required=True)
    ap.add_argument("--tokenizer", required=True, help="an omnitok image tokenizer directory")
    ap.add_argument("--train-scenes", type=int, default=6000)
    ap.add_argument("--test-scenes", type=int, default=600)
    ap.add_argument(
        "--inputs", nargs="+", default=["ids", "pixels"], choices=["ids", "ids-codec", "ids-proj", "vectors", "pixels"]
    )
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = ImageTokenizer.load(args.tokenizer)
    img_tr, sc_tr = _load(args.world, "train", args.train_scenes)
    img_te, sc_te = _load(args.world, "test", args.test_scenes)
    y_tr, y_te = _cell_labels(sc_tr), _cell_labels(sc_te)
    rows = []
    for kind in args.inputs:
        t0 = time.perf_counter()
        curve = _run(kind, _inputs(img_tr, kind, tok), y_tr, _inputs(img_te, kind, tok), y_te, tok, args)
        best = max(curve, key=lambda c: c[2])
        secs = round(time.perf_counter() - t0)
        rows.append([kind, len(sc_tr), curve[-1][2], curve[-1][1], f"{best[2]:.3f} @ {best[0]}", secs])
    print(f"\n{command()}\n{machine()}; {args.threads} torch thread(s); test scenes {len(sc_te)}\n")
    print(table(["input", "train scenes", "scene acc", "cell acc", "best scene acc @ step", "s"], rows))


if __name__ == "__main__":
    main()
