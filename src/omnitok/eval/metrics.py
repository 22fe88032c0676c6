"""Per-task scores of model outputs, each computed by an instrument of the toy world.

Text answers are read with the world's own grammar parsers (captions, events, answers) and images with
the scene parser, so every score says whether the output states the right facts — not whether it repeats
the reference wording. Speech is first transcribed by pocketsphinx (``omnitok.eval.asr``) and then scored
like text.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from omnitok.world.language import NUMBER_WORDS, parse_caption
from omnitok.world.parser import parse_scene, scene_match, score_scene
from omnitok.world.scene import COLORS, SHAPES, Scene
from omnitok.world.video import event_key, parse_event_caption

_WORD = re.compile(r"[a-z]+")
_POSITION_WORDS = {"top", "upper", "bottom", "lower", "left", "right", "center", "middle", "centre"}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}


def caption_correct(text: str, scene: Scene) -> bool:
    """The caption states exactly the scene's objects (any paraphrase of the grammar counts)."""
    return scene_match(parse_caption(text), scene)


def image_correct(image: np.ndarray, scene: Scene) -> bool:
    """The scene parser reads exactly the requested objects from the image."""
    return scene_match(parse_scene(image), scene)


def caption_object_f1(text: str, scene: Scene) -> float:
    """Partial credit for a caption: F1 of the objects it states with all four attributes right.

    ``caption_acc`` is all-or-nothing over every object; this one shows a model on its way there.
    """
    return score_scene(parse_caption(text), scene)["object_f1"]


def image_object_f1(image: np.ndarray, scene: Scene) -> float:
    """Partial credit for a generated image: F1 of the objects the scene parser reads, all attributes right."""
    return score_scene(parse_scene(image), scene)["object_f1"]


def event_correct(text: str, event: dict[str, Any]) -> bool:
    return parse_event_caption(text) == event_key(event)


def answer_key(text: str) -> tuple[str, ...]:
    """The facts an answer states, in order: yes/no, counts, sizes, colours, shapes, position words.

    Two answers with the same key say the same thing; filler words ('there is', 'it is') do not matter, which
    is what a transcribed spoken answer needs.
    """
    words = _WORD.findall(text.lower())
    key: list[str] = []
    for w in words:
        if w in ("yes", "no") or w in NUMBER_WORDS or w in COLORS or w in SHAPES or w in _POSITION_WORDS:
            key.append("center" if w == "centre" else w)
        elif w in _SIZE_WORDS:
            key.append(_SIZE_WORDS[w])
    return tuple(key)


def answer_correct(text: str, reference: str) -> bool:
    return bool(answer_key(reference)) and answer_key(text) == answer_key(reference)


def rate(values: list[bool]) -> float | None:
    """Fraction of True, or None when a split has no examples (reported as missing, never as 0)."""
    return float(np.mean(values)) if values else None
