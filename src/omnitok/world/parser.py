"""The scene parser: reads any 64x64 RGB image back into objects.

It is the instrument that scores generated images, so it explains pixels instead of guessing: each pixel
is classified against the palette by where it falls on the line between the background and a colour
(blur and resampling mix a colour with the background, they do not invent a third colour); each colour
blob is then explained by the shape template, size and position that leave the fewest unexplained
pixels, where pixels covered by *other* colours may be hidden parts of the object (occlusion). Which
object hides which gives the depth order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import ndimage
from scipy.signal import fftconvolve

from omnitok.errors import OmnitokError
from omnitok.world.scene import (
    BACKGROUND,
    CELL_CENTERS,
    CELL_EDGES,
    COLORS,
    CONNECTIVITY,
    IMAGE_SIZE,
    PALETTE,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    template,
)

MIN_BLOB_PIXELS = 12
OCCLUDED_PIXEL_COST = 0.1  # prefer hypotheses that need less hidden area
MAX_UNEXPLAINED_FRACTION = 0.5  # a blob no template explains this well is noise, not an object

_BG = np.asarray(BACKGROUND, dtype=np.float32)
_DIRS = np.stack([np.asarray(PALETTE[c], dtype=np.float32) - _BG for c in COLORS])  # [C, 3]
_TEMPLATES = [(shape, size) for shape in SHAPES for size in SIZES]


@cache
def _flipped_template(shape: str, size: str) -> np.ndarray:
    return template(shape, size)[::-1, ::-1].astype(np.float32)


def _as_image(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise OmnitokError(f"parse_scene expects a {IMAGE_SIZE}x{IMAGE_SIZE}x3 image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise OmnitokError(f"parse_scene expects dtype uint8, got {arr.dtype}")
    return arr.astype(np.float32)


def classify_pixels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the palette index it most plausibly shows (-1 for background) and its coverage alpha."""
    px = _as_image(image).reshape(-1, 3) - _BG  # [N, 3]
    alpha = np.clip(px @ _DIRS.T / (_DIRS**2).sum(1), 0.0, 1.0)  # [N, C]
    residual = ((px[:, None, :] - alpha[:, :, None] * _DIRS[None]) ** 2).sum(-1)  # [N, C]
    best = residual.argmin(1)
    cover = alpha[np.arange(len(best)), best]
    labels = np.where(cover > 0.5, best, -1)
    return labels.reshape(IMAGE_SIZE, IMAGE_SIZE), cover.reshape(IMAGE_SIZE, IMAGE_SIZE)


@dataclass(frozen=True)
class _Fit:
    obj: SceneObject
    mask: np.ndarray  # the template placed on the canvas
    visible: np.ndarray  # the blob it explains
    unexplained: float


def _cell_of(v: float) -> int:
    return int(np.searchsorted(CELL_EDGES, v, side="right"))


def _place(shape: str, size: str, x: int, y: int) -> np.ndarray:
    r = SIZES[size]
    canvas = np.zeros((IMAGE_SIZE + 2 * r, IMAGE_SIZE + 2 * r), dtype=bool)
    canvas[y : y + 2 * r + 1, x : x + 2 * r + 1] = template(shape, size)
    return canvas[r:-r, r:-r]


def _fit_blob(blob: np.ndarray, background: np.ndarray, others: np.ndarray, color: str) -> _Fit | None:
    ys, xs = np.nonzero(blob)
    cy, cx = ys.mean(), xs.mean()
    n_blob = float(len(ys))
    grid_y, grid_x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    best: tuple[float, str, str, int, int] | None = None
    for shape, size in _TEMPLATES:
        r = SIZES[size]
        k = _flipped_template(shape, size)
        covers_bg = fftconvolve(background, k, mode="same")
        covers_blob = fftconvolve(blob.astype(np.float32), k, mode="same")
        covers_other = fftconvolve(others, k, mode="same")
        score = covers_bg + (n_blob - covers_blob) + OCCLUDED_PIXEL_COST * covers_other
        near = (np.abs(grid_y - cy) <= r) & (np.abs(grid_x - cx) <= r)
        score = np.where(near, score, np.inf)
        i = int(np.argmin(score))
        if best is None or score.flat[i] < best[0] - 1e-6:
            best = (float(score.flat[i]), shape, size, i % IMAGE_SIZE, i // IMAGE_SIZE)
    assert best is not None
    score, shape, size, x, y = best
    mask = _place(shape, size, x, y)
    unexplained = (float((mask & (background > 0.5)).sum()) + float((blob & ~mask).sum())) / max(float(mask.sum()), 1.0)
    if unexplained > MAX_UNEXPLAINED_FRACTION:
        return None
    row, col = _cell_of(y), _cell_of(x)
    obj = SceneObject(
        shape=shape,
        color=color,
        size=size,
        row=row,
        col=col,
        dx=x - CELL_CENTERS[col],
        dy=y - CELL_CENTERS[row],
    )
    return _Fit(obj=obj, mask=mask, visible=blob, unexplained=unexplained)


def _depth_order(fits: list[_Fit]) -> list[_Fit]:
    """Back-to-front order: an object whose template covers another's visible pixels lies behind it."""
    n = len(fits)
    in_front = {i: set() for i in range(n)}  # i -> objects in front of i
    for i in range(n):
        for j in range(n):
            if i != j and (fits[i].mask & fits[j].visible).sum() > 1:
                in_front[i].add(j)
    order: list[int] = []
    remaining = set(range(n))
    while remaining:
        # the farthest object is one nothing remaining lies behind; break cycles by reading order
        backs = [i for i in remaining if not any(i in in_front[k] for k in remaining)]
        pick = min(backs or remaining, key=lambda i: (fits[i].obj.row, fits[i].obj.col))
        order.append(pick)
        remaining.remove(pick)
    return [fits[i] for i in order]


def parse_scene(image: np.ndarray) -> Scene:
    """Read objects (shape, colour, size, grid cell) back from an image, ordered back to front."""
    labels, _ = classify_pixels(image)
    background = (labels < 0).astype(np.float32)
    fits: list[_Fit] = []
    for ci, color in enumerate(COLORS):
        mine = labels == ci
        if mine.sum() < MIN_BLOB_PIXELS:
            continue
        others = ((labels >= 0) & ~mine).astype(np.float32)
        blobs, n = ndimage.label(mine, structure=CONNECTIVITY)
        for b in range(1, n + 1):
            blob = blobs == b
            if blob.sum() < MIN_BLOB_PIXELS:
                continue
            fit = _fit_blob(blob, background, others, color)
            if fit is not None:
                fits.append(fit)
    return tuple(f.obj for f in _depth_order(fits))


# --- scoring ------------------------------------------------------------------------------------------


def scene_match(a: Scene, b: Scene) -> bool:
    """Exact match: the same multiset of (shape, colour, size, cell); jitter and depth are not compared."""
    return sorted(o.key() for o in a) == sorted(o.key() for o in b)


def _f1(pred: list[tuple], truth: list[tuple]) -> float:
    if not pred and not truth:
        return 1.0
    from collections import Counter

    common = sum((Counter(pred) & Counter(truth)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(truth)
    return 2 * p * r / (p + r)


def score_scene(pred: Scene, truth: Scene) -> dict[str, float]:
    """Graded agreement for imperfect images: F1 per attribute, anchored on the grid cell.

    Cells are unique within a scene, so (cell, attribute) pairs identify which object an attribute belongs to
    without a matching step; ``object_f1`` needs every attribute right.
    """
    out = {"exact": float(scene_match(pred, truth)), "count": float(len(pred) == len(truth))}
    out["cell_f1"] = _f1([o.cell for o in pred], [o.cell for o in truth])
    for attr in ("shape", "color", "size"):
        out[f"{attr}_f1"] = _f1([(o.cell, getattr(o, attr)) for o in pred], [(o.cell, getattr(o, attr)) for o in truth])
    out["object_f1"] = _f1([o.key() for o in pred], [o.key() for o in truth])
    return out
