"""Instruction data built on scenes: image edits and step-by-step construction documents.

Each edit is an exact function of (scene, instruction), so an edited image produced by a model can be
scored by parsing it and comparing with :func:`apply_edit`'s result.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from omnitok.world.language import object_phrase, position_phrase, referring_phrase
from omnitok.world.scene import COLORS, GRID, Scene, sample_object, scene_is_valid

EDITS = ("recolor", "move", "remove", "add", "resize")
MAX_OBJECTS = 3


def sample_edit(
    scene: Scene, rng: np.random.Generator, forbidden: frozenset[tuple[str, str]] = frozenset()
) -> tuple[str, Scene, dict[str, Any]]:
    """(instruction, edited scene, edit record) with a valid edited scene."""
    for _ in range(100):
        kind = EDITS[int(rng.integers(len(EDITS)))]
        free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in {o.cell for o in scene}]
        if kind == "add":
            if len(scene) >= MAX_OBJECTS:
                continue
            new = sample_object(rng, free, forbidden)
            edited = (*scene, new)
            text = f"Add {object_phrase(new, rng)} {position_phrase(new.row, new.col, rng)}."
            record = {"type": kind, "object": new.to_json()}
        else:
            i = int(rng.integers(len(scene)))
            obj = scene[i]
            ref = referring_phrase(obj, scene)
            rest = scene[:i] + scene[i + 1 :]
            if kind == "remove":
                if len(scene) == 1:
                    continue
                edited, text = rest, f"Remove {ref}."
                record = {"type": kind, "object": obj.to_json()}
            elif kind == "recolor":
                color = [c for c in COLORS if c != obj.color][int(rng.integers(len(COLORS) - 1))]
                if (color, obj.shape) in forbidden:
                    continue
                edited = (*scene[:i], replace(obj, color=color), *scene[i + 1 :])
                text = f"Make {ref} {color}." if rng.random() < 0.5 else f"Change the color of {ref} to {color}."
                record = {"type": kind, "object": obj.to_json(), "to": color}
            elif kind == "move":
                row, col = free[int(rng.integers(len(free)))]
                edited = (*scene[:i], replace(obj, row=row, col=col, dx=0, dy=0), *scene[i + 1 :])
                text = f"Move {ref} to the {position_phrase(row, col).split(' the ', 1)[1]}."
                record = {"type": kind, "object": obj.to_json(), "to": [row, col]}
            else:  # resize
                size = "small" if obj.size == "large" else "large"
                edited = (*scene[:i], replace(obj, size=size), *scene[i + 1 :])
                text = f"Make {ref} {'bigger' if size == 'large' else 'smaller'}."
                record = {"type": kind, "object": obj.to_json(), "to": size}
        if scene_is_valid(edited):
            return text, edited, record
    raise RuntimeError("could not sample a valid edit")


def construction_steps(scene: Scene, rng: np.random.Generator) -> list[tuple[str, Scene]]:
    """Texts and the partial scene after each: empty canvas, then one object added per step."""
    steps: list[tuple[str, Scene]] = [("Start with an empty canvas.", ())]
    openers = ("Add", "Now add", "Then add", "Next, draw", "Place")
    for k, obj in enumerate(scene):
        verb = "Add" if k == 0 else openers[int(rng.integers(len(openers)))]
        steps.append((f"{verb} {object_phrase(obj, rng)} {position_phrase(obj.row, obj.col, rng)}.", scene[: k + 1]))
    return steps
