"""Scenes of the toy world: what is in a picture, how it is drawn, and how scenes are sampled.

A scene is a short list of flat-coloured shapes on a plain background, each at one cell of a 3x3 grid.
Everything is rasterised from analytic shapes on integer pixel centres without anti-aliasing, so a scene
renders to the same bytes on every machine and the scene parser can explain every pixel. Objects are listed
back to front: drawing order *is* the depth order, and occlusion is what later objects do to earlier ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import cache
from typing import Any

import numpy as np
from scipy import ndimage

from omnitok.errors import OmnitokError

IMAGE_SIZE = 64
GRID = 3
BACKGROUND = (232, 232, 226)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 94, 220),
    "yellow": (238, 204, 34),
    "purple": (148, 72, 196),
    "orange": (250, 128, 14),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SIZES: dict[str, int] = {"small": 6, "large": 10}  # template radius in pixels
CELL_CENTERS: tuple[int, ...] = (11, 32, 53)
CELL_EDGES: tuple[float, ...] = (IMAGE_SIZE / 3, 2 * IMAGE_SIZE / 3)
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")

# Generator constraints that keep every scene unambiguous to read back.
MIN_VISIBLE_FRACTION = 0.6
MAX_JITTER = 2
CONNECTIVITY = np.ones((3, 3), dtype=bool)  # 8-connected: star tips touch their body only diagonally


@dataclass(frozen=True)
class SceneObject:
    """One shape. ``dx``/``dy`` nudge it off its cell centre (nuisance, not an attribute)."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    dx: int = 0
    dy: int = 0

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    @property
    def center(self) -> tuple[int, int]:
        """(x, y) pixel centre, clipped so the whole template stays inside the image."""
        r = SIZES[self.size]
        x = int(min(max(CELL_CENTERS[self.col] + self.dx, r), IMAGE_SIZE - 1 - r))
        y = int(min(max(CELL_CENTERS[self.row] + self.dy, r), IMAGE_SIZE - 1 - r))
        return x, y

    def key(self) -> tuple[str, str, str, int, int]:
        """The attributes a caption or the parser can state (what 'same object' means)."""
        return (self.shape, self.color, self.size, self.row, self.col)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> SceneObject:
        obj = SceneObject(
            shape=d["shape"],
            color=d["color"],
            size=d["size"],
            row=int(d["row"]),
            col=int(d["col"]),
            dx=int(d.get("dx", 0)),
            dy=int(d.get("dy", 0)),
        )
        validate_object(obj)
        return obj


Scene = tuple[SceneObject, ...]


def validate_object(obj: SceneObject) -> None:
    for field, value, allowed in (
        ("shape", obj.shape, SHAPES),
        ("color", obj.color, COLORS),
        ("size", obj.size, tuple(SIZES)),
    ):
        if value not in allowed:
            raise OmnitokError(f"scene object field {field!r}: expected one of {list(allowed)}, got {value!r}")
    for field, value in (("row", obj.row), ("col", obj.col)):
        if not 0 <= value < GRID:
            raise OmnitokError(f"scene object field {field!r}: expected 0..{GRID - 1}, got {value}")


def scene_to_json(scene: Scene) -> list[dict[str, Any]]:
    return [o.to_json() for o in scene]


def scene_from_json(items: list[dict[str, Any]]) -> Scene:
    return tuple(SceneObject.from_json(d) for d in items)


def cell_name(row: int, col: int) -> str:
    """Canonical English name of a grid cell ('top left', 'center', 'bottom')."""
    if (row, col) == (1, 1):
        return "center"
    if row == 1:
        return f"middle {COL_NAMES[col]}"
    if col == 1:
        return ROW_NAMES[row]
    return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


# --- shapes -------------------------------------------------------------------------------------------


def _polygon_mask(xs: np.ndarray, ys: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test at pixel centres (vectorised over pixels)."""
    inside = np.zeros(xs.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        crosses = (y1 > ys) != (y2 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x2 - x1) * (ys - y1) / (y2 - y1) + x1
        inside ^= crosses & (xs < x_at)
    return inside


@cache
def template(shape: str, size: str) -> np.ndarray:
    """Boolean mask of a shape, (2r+1) pixels square, centred on its middle pixel."""
    if shape not in SHAPES or size not in SIZES:
        raise OmnitokError(f"unknown shape/size {shape!r}/{size!r}")
    r = SIZES[size]
    ys, xs = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    if shape == "circle":
        mask = xs**2 + ys**2 <= (r + 0.3) ** 2
    elif shape == "square":
        h = round(0.8 * r)
        mask = (np.abs(xs) <= h) & (np.abs(ys) <= h)
    elif shape == "diamond":
        mask = np.abs(xs) + np.abs(ys) <= r + 0.3
    elif shape == "triangle":
        poly = np.array([(0.0, -r - 0.5), (r + 0.5, 0.8 * r + 0.5), (-r - 0.5, 0.8 * r + 0.5)])
        mask = _polygon_mask(xs, ys, poly)
    else:  # star: five points, inner radius chosen so the arms survive at the small size
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r + 0.5, 0.5 * r)
        poly = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        mask = _polygon_mask(xs, ys, poly)
    mask.setflags(write=False)
    return mask


def object_mask(obj: SceneObject) -> np.ndarray:
    """Full (amodal) mask of one object on the image canvas."""
    t = template(obj.shape, obj.size)
    r = SIZES[obj.size]
    x, y = obj.center
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    canvas[y - r : y + r + 1, x - r : x + r + 1] = t
    return canvas


# --- rendering ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """A drawn scene with its per-pixel annotations."""

    image: np.ndarray  # [H, W, 3] uint8
    instance: np.ndarray  # [H, W] uint8: 0 background, i+1 for visible pixels of scene[i]
    depth: np.ndarray  # [H, W] uint8: 0 background, k = k-th layer from the back (1 = farthest)


def render(scene: Scene) -> Rendered:
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    instance = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, obj in enumerate(scene):
        validate_object(obj)
        m = object_mask(obj)
        image[m] = PALETTE[obj.color]
        instance[m] = i + 1
    depth = instance.copy()  # objects are stored back to front, so the index is the layer
    return Rendered(image=image, instance=instance, depth=depth)


def render_image(scene: Scene) -> np.ndarray:
    return render(scene).image


# --- validity and sampling ------------------------------------------------------------------------------


def scene_is_valid(scene: Scene) -> bool:
    """True when the scene can be read back unambiguously.

    One object per cell; every object keeps most of its pixels visible in one connected piece; objects of
    the same colour never touch (else they would merge into one blob).
    """
    if len({o.cell for o in scene}) != len(scene):
        return False
    rendered = render(scene)
    for i, obj in enumerate(scene):
        full = object_mask(obj)
        visible = rendered.instance == i + 1
        if visible.sum() < MIN_VISIBLE_FRACTION * full.sum():
            return False
        if ndimage.label(visible, structure=CONNECTIVITY)[1] != 1:
            return False
    for i, a in enumerate(scene):
        for b in scene[i + 1 :]:
            if a.color == b.color:
                grown = ndimage.binary_dilation(object_mask(a), structure=CONNECTIVITY, iterations=2)
                if (grown & object_mask(b)).any():
                    return False
    return True


def occlusions(scene: Scene) -> list[tuple[int, int]]:
    """Pairs (front, back) of object indices where the front object hides part of the back one."""
    masks = [object_mask(o) for o in scene]
    return [(j, i) for i in range(len(scene)) for j in range(i + 1, len(scene)) if (masks[i] & masks[j]).any()]


def sample_object(
    rng: np.random.Generator,
    free_cells: list[tuple[int, int]],
    forbidden: frozenset[tuple[str, str]] = frozenset(),
    require: tuple[str, str] | None = None,
) -> SceneObject:
    """Draw one object in a free cell; ``forbidden`` holds (color, shape) pairs kept out of this split."""
    row, col = free_cells[rng.integers(len(free_cells))]
    while True:
        color, shape = require or (COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))])
        if (color, shape) not in forbidden:
            break
    size = tuple(SIZES)[rng.integers(len(SIZES))]
    dx, dy = (int(v) for v in rng.integers(-MAX_JITTER, MAX_JITTER + 1, size=2))
    return SceneObject(shape=shape, color=color, size=size, row=int(row), col=int(col), dx=dx, dy=dy)


def _push_together(rng: np.random.Generator, scene: Scene) -> Scene:
    """Slide two neighbouring objects towards each other so one partly hides the other."""
    pairs = [
        (i, j)
        for i in range(len(scene))
        for j in range(i + 1, len(scene))
        if max(abs(scene[i].row - scene[j].row), abs(scene[i].col - scene[j].col)) == 1
    ]
    if not pairs:
        return scene
    i, j = pairs[rng.integers(len(pairs))]
    a, b = scene[i], scene[j]
    step = int(rng.integers(2, 5))
    sx, sy = np.sign(b.col - a.col), np.sign(b.row - a.row)
    objs = list(scene)
    objs[i] = replace(a, dx=int(sx * step), dy=int(sy * step))
    objs[j] = replace(b, dx=int(-sx * step), dy=int(-sy * step))
    return tuple(objs)


def sample_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    forbidden: frozenset[tuple[str, str]] = frozenset(),
    require: tuple[str, str] | None = None,
    occlusion_prob: float = 0.3,
    max_tries: int = 200,
) -> Scene:
    """Draw a valid scene of 1-3 objects (rejection sampling on :func:`scene_is_valid`)."""
    for _ in range(max_tries):
        n = int(n_objects if n_objects is not None else rng.choice([1, 2, 3], p=[0.25, 0.4, 0.35]))
        cells = [(r, c) for r in range(GRID) for c in range(GRID)]
        objs: list[SceneObject] = []
        for k in range(n):
            obj = sample_object(rng, cells, forbidden, require if k == 0 else None)
            cells.remove(obj.cell)
            objs.append(obj)
        order = rng.permutation(n)  # the required object must not always be the back layer
        scene: Scene = tuple(objs[int(k)] for k in order)
        if n > 1 and rng.random() < occlusion_prob:
            scene = _push_together(rng, scene)
        if scene_is_valid(scene):
            return scene
    raise RuntimeError("could not sample a valid scene; constraints are too tight")
