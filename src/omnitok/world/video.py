"""Short clips: one scene in which a single event happens, and the sentence that says what happened.

Every clip is fully determined by (start scene, event), so a caption can be checked against the event
exactly with :func:`parse_event_caption`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import numpy as np

from omnitok.world.scene import (
    CELL_CENTERS,
    CELL_EDGES,
    COLORS,
    GRID,
    SHAPES,
    Scene,
    SceneObject,
    cell_name,
    sample_object,
    sample_scene,
    scene_is_valid,
)

EVENTS = ("move", "appear", "disappear", "recolor")
MIN_FRAMES, MAX_FRAMES = 4, 8


def _at_pixel(obj: SceneObject, x: float, y: float) -> SceneObject:
    """The same object centred at pixel (x, y), expressed as a cell plus offset."""
    col = int(np.searchsorted(CELL_EDGES, x, side="right"))
    row = int(np.searchsorted(CELL_EDGES, y, side="right"))
    return replace(obj, row=row, col=col, dx=round(x) - CELL_CENTERS[col], dy=round(y) - CELL_CENTERS[row])


def _describe(obj: SceneObject) -> str:
    return f"{obj.size} {obj.color} {obj.shape}"


def event_caption(event: dict[str, Any]) -> str:
    obj = SceneObject.from_json(event["object"])
    where = cell_name(obj.row, obj.col)
    if event["type"] == "move":
        dest = cell_name(*event["to"])
        return f"The {_describe(obj)} moves from the {where} to the {dest}."
    if event["type"] == "appear":
        return f"A {_describe(obj)} appears in the {where}."
    if event["type"] == "disappear":
        return f"The {_describe(obj)} in the {where} disappears."
    return f"The {obj.size} {obj.shape} in the {where} changes from {obj.color} to {event['to']}."


def sample_clip(
    rng: np.random.Generator, forbidden: frozenset[tuple[str, str]] = frozenset()
) -> tuple[list[Scene], dict[str, Any]]:
    """Frames (as scenes) and the event; start and end scenes are valid, motion frames may overlap."""
    n_frames = int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1))
    for _ in range(100):
        kind = EVENTS[int(rng.integers(len(EVENTS)))]
        scene = sample_scene(rng, n_objects=int(rng.integers(1, 3)), forbidden=forbidden, occlusion_prob=0.0)
        free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in {o.cell for o in scene}]
        at = int(rng.integers(1, n_frames))  # first frame that shows the change
        if kind == "appear":
            new = sample_object(rng, free, forbidden)
            end = (*scene, new)
            if not scene_is_valid(end):
                continue
            frames = [scene if t < at else end for t in range(n_frames)]
            return frames, {"type": kind, "object": new.to_json(), "frame": at}
        target_i = int(rng.integers(len(scene)))
        target = scene[target_i]
        if kind == "disappear":
            end = scene[:target_i] + scene[target_i + 1 :]
            frames = [scene if t < at else end for t in range(n_frames)]
            return frames, {"type": kind, "object": target.to_json(), "frame": at}
        if kind == "recolor":
            color = [c for c in COLORS if c != target.color][int(rng.integers(len(COLORS) - 1))]
            changed = replace(target, color=color)
            if (color, target.shape) in forbidden:
                continue
            end = (*scene[:target_i], changed, *scene[target_i + 1 :])
            if not scene_is_valid(end):
                continue
            frames = [scene if t < at else end for t in range(n_frames)]
            return frames, {"type": kind, "object": target.to_json(), "to": color, "frame": at}
        # move: glide in a straight line from the first to the last frame
        row, col = free[int(rng.integers(len(free)))]
        dest = replace(target, row=row, col=col, dx=0, dy=0)
        end = (*scene[:target_i], dest, *scene[target_i + 1 :])
        if not scene_is_valid(end):
            continue
        (x0, y0), (x1, y1) = target.center, dest.center
        frames = []
        for t in range(n_frames):
            a = t / (n_frames - 1)
            moving = _at_pixel(target, x0 + a * (x1 - x0), y0 + a * (y1 - y0))
            frames.append((*scene[:target_i], moving, *scene[target_i + 1 :]))
        frames[-1] = end
        return frames, {"type": kind, "object": target.to_json(), "to": [row, col], "frame": 1}
    raise RuntimeError("could not sample a valid clip")


_CELL_WORDS = r"(top left|top right|bottom left|bottom right|middle left|middle right|top|bottom|center)"
_OBJ = rf"(small|large) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_PATTERNS = {
    "move": re.compile(rf"the {_OBJ} moves from the {_CELL_WORDS} to the {_CELL_WORDS}"),
    "appear": re.compile(rf"an? {_OBJ} appears in the {_CELL_WORDS}"),
    "disappear": re.compile(rf"the {_OBJ} in the {_CELL_WORDS} disappears"),
    "recolor": re.compile(
        rf"the (small|large) ({'|'.join(SHAPES)}) in the {_CELL_WORDS} changes from "
        rf"({'|'.join(COLORS)}) to ({'|'.join(COLORS)})"
    ),
}
_CELLS_BY_NAME = {cell_name(r, c): (r, c) for r in range(GRID) for c in range(GRID)}


def parse_event_caption(text: str) -> dict[str, Any] | None:
    """The event a caption states, in the comparable form of :func:`event_key`; None if it states none."""
    t = text.lower().strip()
    if m := _PATTERNS["move"].search(t):
        size, color, shape, a, b = m.groups()
        return {"type": "move", "object": (shape, color, size, *_CELLS_BY_NAME[a]), "to": _CELLS_BY_NAME[b]}
    if m := _PATTERNS["appear"].search(t):
        size, color, shape, a = m.groups()
        return {"type": "appear", "object": (shape, color, size, *_CELLS_BY_NAME[a])}
    if m := _PATTERNS["disappear"].search(t):
        size, color, shape, a = m.groups()
        return {"type": "disappear", "object": (shape, color, size, *_CELLS_BY_NAME[a])}
    if m := _PATTERNS["recolor"].search(t):
        size, shape, a, c1, c2 = m.groups()
        return {"type": "recolor", "object": (shape, c1, size, *_CELLS_BY_NAME[a]), "to": c2}
    return None


def event_key(event: dict[str, Any]) -> dict[str, Any]:
    """An event reduced to what a caption can state (no frame index, no jitter)."""
    obj = SceneObject.from_json(event["object"])
    out: dict[str, Any] = {"type": event["type"], "object": obj.key()}
    if event["type"] == "move":
        out["to"] = tuple(event["to"])
    elif event["type"] == "recolor":
        out["to"] = event["to"]
    return out
