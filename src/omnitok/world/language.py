"""The toy world's language: captions with paraphrases, and the parser that reads a caption back.

Captions are sampled from a small grammar (several sentence frames, synonyms for sizes and positions,
varying object order), but every sentence keeps each object's full description in one clause. That is
what makes ``parse_caption`` exact: a clause names one object with its size, colour, shape and position,
so any caption a model writes in this language can be scored against the scene it describes.
"""

from __future__ import annotations

import re

import numpy as np

from omnitok.world.scene import COLORS, GRID, SHAPES, SIZES, Scene, SceneObject, occlusions

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Position phrases per cell; the first is canonical. Vertical and horizontal synonyms are resolved by
# `_cell_from_words`, so the parser accepts any of these and more.
_CELL_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left", "in the top left corner", "in the upper left"),
    (0, 1): ("at the top", "at the top center", "in the top middle"),
    (0, 2): ("in the top right", "in the top right corner", "in the upper right"),
    (1, 0): ("on the left", "in the middle left", "on the left side"),
    (1, 1): ("in the center", "in the middle", "at the center"),
    (1, 2): ("on the right", "in the middle right", "on the right side"),
    (2, 0): ("in the bottom left", "in the bottom left corner", "in the lower left"),
    (2, 1): ("at the bottom", "at the bottom center", "in the bottom middle"),
    (2, 2): ("in the bottom right", "in the bottom right corner", "in the lower right"),
}
_ROW_WORDS = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_COL_WORDS = {"left": 0, "right": 2}
_CENTER_WORDS = {"center", "middle", "centre"}


def position_phrase(row: int, col: int, rng: np.random.Generator | None = None) -> str:
    options = _CELL_PHRASES[(row, col)]
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _pick(rng: np.random.Generator | None, options: tuple[str, ...]) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def object_phrase(obj: SceneObject, rng: np.random.Generator | None = None, article: str = "a") -> str:
    """'a large red circle' (the size word varies with ``rng``)."""
    return f"{article} {_pick(rng, SIZE_WORDS[obj.size])} {obj.color} {obj.shape}"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def count_phrase(n: int) -> str:
    return f"{NUMBER_WORDS[n]} object" + ("" if n == 1 else "s")


def canonical_caption(scene: Scene) -> str:
    """One fixed wording per scene (objects in reading order): the form targets use when they must be exact."""
    objs = sorted(scene, key=lambda o: (o.row, o.col))
    if not objs:
        return "An empty picture."
    parts = [f"{object_phrase(o)} {position_phrase(o.row, o.col)}" for o in objs]
    return _cap(_join(parts)) + "."


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption drawn from the grammar; every object is described with all four attributes."""
    objs = list(scene)
    order = rng.permutation(len(objs))
    objs = [objs[int(i)] for i in order]
    if not objs:
        return "An empty picture."
    clauses = [(object_phrase(o, rng), position_phrase(o.row, o.col, rng)) for o in objs]
    frame = int(rng.integers(5))
    if frame == 0:
        text = _cap(_join([f"{obj} {pos}" for obj, pos in clauses])) + "."
    elif frame == 1:
        verb = "is" if len(objs) == 1 else "are"
        text = f"There {verb} " + _join([f"{obj} {pos}" for obj, pos in clauses]) + "."
    elif frame == 2:
        text = " ".join(f"{_cap(pos)} there is {obj}." for obj, pos in clauses)
    elif frame == 3:
        lead = _pick(rng, ("This picture shows", "The image shows", "A picture of"))
        text = f"{lead} {count_phrase(len(objs))}: " + _join([f"{obj} {pos}" for obj, pos in clauses]) + "."
    else:
        text = _cap(_join([f"{pos} {obj}" for obj, pos in clauses])) + "."
    for front, back in occlusions(scene):
        f, b = scene[front], scene[back]
        if rng.random() < 0.5:
            text += f" The {f.color} {f.shape} is in front of the {b.color} {b.shape}."
        else:
            text += f" The {b.color} {b.shape} is partly hidden behind the {f.color} {f.shape}."
    return text


def captions(scene: Scene, rng: np.random.Generator, n: int = 3) -> list[str]:
    """The canonical caption first, then ``n - 1`` distinct paraphrases where the grammar allows."""
    out = [canonical_caption(scene)]
    for _ in range(8 * n):
        if len(out) >= n:
            break
        c = caption(scene, rng)
        if c not in out:
            out.append(c)
    return out


# --- reading captions back ----------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")
_SIZE_LOOKUP = {w: size for size, words in SIZE_WORDS.items() for w in words}
_RELATION = re.compile(r"\b(in front of|behind)\b")


def _cell_from_words(words: list[str]) -> tuple[int, int] | None:
    row = next((_ROW_WORDS[w] for w in words if w in _ROW_WORDS), None)
    col = next((_COL_WORDS[w] for w in words if w in _COL_WORDS), None)
    if row is None and col is None:
        return (1, 1) if any(w in _CENTER_WORDS for w in words) else None
    return (1 if row is None else row, 1 if col is None else col)


def _clauses(text: str) -> list[str]:
    text = text.lower()
    text = re.sub(r"^[^:]*:", " ", text) if re.match(r"^(this picture|the image|a picture)", text) else text
    return [c for c in re.split(r"[.,;:]|\band\b", text) if c.strip()]


def parse_caption(text: str) -> Scene:
    """Read the objects a caption states (shape, colour, size, cell); unknown clauses are ignored.

    Relation sentences ('the red circle is in front of the blue star') add no objects. A clause that names
    a shape without a colour, size or position yields nothing: an incomplete description does not match.
    """
    objs: list[SceneObject] = []
    for clause in _clauses(text):
        if _RELATION.search(clause):
            continue
        words = _WORD.findall(clause)
        shapes = [w for w in words if w in SHAPES]
        colors = [w for w in words if w in COLORS]
        sizes = [_SIZE_LOOKUP[w] for w in words if w in _SIZE_LOOKUP]
        cell = _cell_from_words(words)
        if len(shapes) != 1 or len(colors) != 1 or len(sizes) != 1 or cell is None:
            continue
        objs.append(SceneObject(shape=shapes[0], color=colors[0], size=sizes[0], row=cell[0], col=cell[1]))
    return tuple(objs)


# --- questions and answers ----------------------------------------------------------------------------


def _unique(scene: Scene, pred) -> SceneObject | None:
    hits = [o for o in scene if pred(o)]
    return hits[0] if len(hits) == 1 else None


def question_answer(
    scene: Scene, rng: np.random.Generator, forbidden: frozenset[tuple[str, str]] = frozenset()
) -> tuple[str, str, str]:
    """A (question, answer, type) about the scene whose answer is exactly determined by it."""
    kinds = ["count", "where", "what_at", "exists", "color_of"]
    for _ in range(20):
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "count":
            n = len(scene)
            verb = "is" if n == 1 else "are"
            return "How many objects are there?", f"There {verb} {count_phrase(n)}.", kind
        obj = scene[int(rng.integers(len(scene)))]
        if kind == "where" and _unique(scene, lambda o, t=obj: (o.color, o.shape) == (t.color, t.shape)):
            return (
                f"Where is the {obj.color} {obj.shape}?",
                f"The {obj.color} {obj.shape} is {position_phrase(obj.row, obj.col)}.",
                kind,
            )
        if kind == "what_at":
            pos = position_phrase(obj.row, obj.col)
            return f"What is {pos}?", f"There is {object_phrase(obj)} {pos}.", kind
        if kind == "color_of" and _unique(scene, lambda o, t=obj: o.shape == t.shape):
            return f"What color is the {obj.shape}?", f"The {obj.shape} is {obj.color}.", kind
        if kind == "exists":
            color = COLORS[int(rng.integers(len(COLORS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            if (color, shape) in forbidden:
                continue
            present = any((o.color, o.shape) == (color, shape) for o in scene)
            answer = "Yes, there is." if present else "No, there is not."
            return f"Is there a {color} {shape}?", answer, kind
    n = len(scene)
    return "How many objects are there?", f"There {'is' if n == 1 else 'are'} {count_phrase(n)}.", "count"


def referring_phrase(obj: SceneObject, scene: Scene) -> str:
    """The shortest 'the ...' phrase that picks out ``obj`` in ``scene``."""
    if _unique(scene, lambda o: (o.color, o.shape) == (obj.color, obj.shape)):
        return f"the {obj.color} {obj.shape}"
    return f"the {obj.color} {obj.shape} {position_phrase(obj.row, obj.col)}"


def corrupt_scene(
    scene: Scene, rng: np.random.Generator, forbidden: frozenset[tuple[str, str]] = frozenset()
) -> tuple[Scene, dict[str, str]]:
    """Change exactly one attribute of one object (caption-filtering data describe the result).

    ``forbidden`` (colour, shape) pairs are never produced, so held-out compositions stay out of train text.
    """
    for _ in range(50):
        field = ("color", "shape", "size", "position")[int(rng.integers(4))]
        obj = scene[int(rng.integers(len(scene)))]
        if field == "position":
            free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in {o.cell for o in scene}]
            if not free:
                continue
            r, c = free[int(rng.integers(len(free)))]
            wrong = SceneObject(obj.shape, obj.color, obj.size, r, c)
            old, new = position_phrase(obj.row, obj.col), position_phrase(r, c)
        else:
            pool = {"color": COLORS, "shape": SHAPES, "size": tuple(SIZES)}[field]
            old = getattr(obj, field)
            new = [v for v in pool if v != old][int(rng.integers(len(pool) - 1))]
            wrong = SceneObject(**{**obj.to_json(), field: new})
        if (wrong.color, wrong.shape) in forbidden:
            continue
        return tuple(wrong if o is obj else o for o in scene), {"field": field, "from": old, "to": new}
    raise RuntimeError("could not corrupt scene without producing a forbidden pair")
