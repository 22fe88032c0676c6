import numpy as np
import pytest

from omnitok.errors import OmnitokError
from omnitok.world.parser import classify_pixels, parse_scene, scene_match, score_scene
from omnitok.world.scene import (
    BACKGROUND,
    COLORS,
    IMAGE_SIZE,
    PALETTE,
    SHAPES,
    SIZES,
    SceneObject,
    object_mask,
    occlusions,
    render,
    sample_scene,
    scene_from_json,
    scene_is_valid,
    scene_to_json,
    template,
)


def test_templates_are_distinct_and_centred():
    masks = {(s, z): template(s, z) for s in SHAPES for z in SIZES}
    keys = list(masks)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if masks[a].shape == masks[b].shape:
                assert (masks[a] != masks[b]).sum() > 5, (a, b)
    for z, r in SIZES.items():
        for s in SHAPES:
            t = template(s, z)
            assert t.shape == (2 * r + 1, 2 * r + 1)
            assert t[r, r], f"{s}/{z} does not cover its centre"


def test_render_is_deterministic_and_annotated(rng):
    scene = sample_scene(rng, n_objects=3)
    a, b = render(scene), render(scene)
    assert a.image.dtype == np.uint8 and a.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(a.image, b.image)
    for i, obj in enumerate(scene):
        visible = a.instance == i + 1
        assert visible.any()
        assert (a.image[visible] == PALETTE[obj.color]).all()
        assert (a.depth[visible] == i + 1).all()
    assert (a.image[a.instance == 0] == BACKGROUND).all()


def test_sampled_scenes_are_valid_and_cover_the_attribute_space(rng):
    scenes = [sample_scene(rng) for _ in range(400)]
    assert all(scene_is_valid(s) for s in scenes)
    objs = [o for s in scenes for o in s]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.color for o in objs} == set(COLORS)
    assert {o.size for o in objs} == set(SIZES)
    assert {o.cell for o in objs} == {(r, c) for r in range(3) for c in range(3)}
    assert {len(s) for s in scenes} == {1, 2, 3}
    assert sum(bool(occlusions(s)) for s in scenes) > 10, "occlusion should occur"


def test_forbidden_pairs_never_sampled(rng):
    forbidden = frozenset({("red", "star"), ("blue", "circle")})
    for _ in range(300):
        assert not any((o.color, o.shape) in forbidden for o in sample_scene(rng, forbidden=forbidden))


def test_scene_json_round_trip_and_validation(rng):
    scene = sample_scene(rng, n_objects=2)
    assert scene_from_json(scene_to_json(scene)) == scene
    bad = scene_to_json(scene)
    bad[0]["color"] = "mauve"
    with pytest.raises(OmnitokError, match="color"):
        scene_from_json(bad)


def test_parser_reads_clean_renders_exactly(rng):
    scenes = [sample_scene(rng) for _ in range(300)]
    assert all(scene_match(parse_scene(render(s).image), s) for s in scenes)


def test_parser_recovers_depth_order_of_occluding_pairs(rng):
    checked = 0
    for _ in range(400):
        scene = sample_scene(rng, occlusion_prob=1.0)
        pairs = [(f, b) for f, b in occlusions(scene) if (object_mask(scene[f]) & object_mask(scene[b])).sum() > 3]
        if not pairs:
            continue
        order = [o.key() for o in parse_scene(render(scene).image)]
        for front, back in pairs:
            checked += 1
            assert order.index(scene[front].key()) > order.index(scene[back].key())
    assert checked > 20


def test_parser_on_empty_and_noise_images(rng):
    empty = np.empty((64, 64, 3), np.uint8)
    empty[:] = BACKGROUND
    assert parse_scene(empty) == ()
    speckle = empty.copy()
    ys, xs = rng.integers(0, 64, 30), rng.integers(0, 64, 30)
    speckle[ys, xs] = PALETTE["red"]  # isolated pixels are not objects
    assert parse_scene(speckle) == ()


def test_parser_rejects_bad_input():
    with pytest.raises(OmnitokError, match="64x64x3"):
        parse_scene(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(OmnitokError, match="uint8"):
        parse_scene(np.zeros((64, 64, 3), np.float32))


def test_pixel_classifier_assigns_background_blends_to_the_colour():
    bg, red = np.array(BACKGROUND, float), np.array(PALETTE["red"], float)
    img = np.empty((64, 64, 3), np.uint8)
    img[:] = np.round(0.3 * bg + 0.7 * red).astype(np.uint8)  # a blurred edge pixel, mostly red
    labels, cover = classify_pixels(img)
    assert (labels == COLORS.index("red")).all()
    assert np.allclose(cover, 0.7, atol=0.02)


def test_graded_score_counts_each_attribute():
    truth = (SceneObject("circle", "red", "large", 0, 0), SceneObject("star", "blue", "small", 2, 2))
    pred = (SceneObject("circle", "green", "large", 0, 0), SceneObject("star", "blue", "small", 2, 2))
    s = score_scene(pred, truth)
    assert s["exact"] == 0.0 and s["count"] == 1.0
    assert s["shape_f1"] == s["size_f1"] == s["cell_f1"] == 1.0
    assert s["color_f1"] == pytest.approx(0.5)
    assert s["object_f1"] == pytest.approx(0.5)
    assert score_scene(truth, truth)["exact"] == 1.0
    assert score_scene((), truth)["object_f1"] == 0.0
