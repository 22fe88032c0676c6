import numpy as np

from omnitok.world.language import (
    canonical_caption,
    caption,
    captions,
    corrupt_scene,
    parse_caption,
    question_answer,
)
from omnitok.world.parser import scene_match
from omnitok.world.scene import SceneObject, sample_scene


def test_every_paraphrase_parses_back_to_its_scene(rng):
    for _ in range(300):
        scene = sample_scene(rng)
        for text in captions(scene, rng, n=4):
            assert scene_match(parse_caption(text), scene), text


def test_grammar_gives_varied_wordings(rng):
    scene = sample_scene(rng, n_objects=2)
    texts = {caption(scene, rng) for _ in range(40)}
    assert len(texts) >= 15
    openings = {t.split()[0] for t in texts}
    assert len(openings) >= 4


def test_canonical_caption_is_order_free(rng):
    scene = sample_scene(rng, n_objects=3)
    assert canonical_caption(scene) == canonical_caption(tuple(reversed(scene)))


def test_incomplete_or_foreign_text_yields_no_objects():
    assert parse_caption("A red circle.") == ()
    assert parse_caption("Hello there, how are you?") == ()
    assert parse_caption("The red circle is in front of the blue star.") == ()
    got = parse_caption("a big green diamond at the bottom and a tiny orange square in the upper right")
    assert set(got) == {SceneObject("diamond", "green", "large", 2, 1), SceneObject("square", "orange", "small", 0, 2)}


def test_corruption_changes_exactly_one_attribute(rng):
    fields = set()
    for _ in range(200):
        scene = sample_scene(rng)
        wrong, error = corrupt_scene(scene, rng)
        fields.add(error["field"])
        assert not scene_match(wrong, scene)
        diffs = sum(a.key() != b.key() for a, b in zip(scene, wrong, strict=True))
        assert diffs == 1
        assert scene_match(parse_caption(caption(wrong, rng)), wrong)
    assert fields == {"color", "shape", "size", "position"}


def test_questions_have_exact_answers(rng):
    seen = set()
    for _ in range(300):
        scene = sample_scene(rng)
        q, a, kind = question_answer(scene, rng)
        seen.add(kind)
        if kind == "count":
            words = {1: "one", 2: "two", 3: "three"}
            assert words[len(scene)] in a
        elif kind == "what_at":
            assert scene_match(parse_caption(a), tuple(o for o in scene if o.key() == parse_caption(a)[0].key()))
        elif kind == "exists":
            color, shape = q.rstrip("?").split()[-2:]
            present = any((o.color, o.shape) == (color, shape) for o in scene)
            assert a.startswith("Yes") == present
    assert seen == {"count", "where", "what_at", "exists", "color_of"}


def test_forbidden_pairs_stay_out_of_questions_and_corruptions(rng):
    forbidden = frozenset({("red", "star"), ("green", "square")})
    for _ in range(300):
        scene = sample_scene(rng, forbidden=forbidden)
        q, _, _ = question_answer(scene, rng, forbidden)
        assert "red star" not in q and "green square" not in q
        wrong, _ = corrupt_scene(scene, rng, forbidden)
        assert not any((o.color, o.shape) in forbidden for o in wrong)


def test_captions_are_reproducible():
    scene = sample_scene(np.random.default_rng(7), n_objects=3)
    assert captions(scene, np.random.default_rng(1)) == captions(scene, np.random.default_rng(1))
