from omnitok.world.language import parse_caption
from omnitok.world.parser import parse_scene, scene_match
from omnitok.world.scene import render_image, sample_scene, scene_is_valid
from omnitok.world.tasks import EDITS, construction_steps, sample_edit
from omnitok.world.video import (
    EVENTS,
    MAX_FRAMES,
    MIN_FRAMES,
    event_caption,
    event_key,
    parse_event_caption,
    sample_clip,
)


def test_clips_and_their_captions(rng):
    seen = set()
    for _ in range(150):
        frames, event = sample_clip(rng)
        seen.add(event["type"])
        assert MIN_FRAMES <= len(frames) <= MAX_FRAMES
        assert scene_is_valid(frames[0]) and scene_is_valid(frames[-1])
        assert parse_event_caption(event_caption(event)) == event_key(event)
        first, last = parse_scene(render_image(frames[0])), parse_scene(render_image(frames[-1]))
        if event["type"] == "appear":
            assert len(last) == len(first) + 1
        elif event["type"] == "disappear":
            assert len(last) == len(first) - 1
        elif event["type"] == "move":
            assert tuple(event["to"]) in {o.cell for o in last}
        else:
            assert event["to"] in {o.color for o in last}
    assert seen == set(EVENTS)
    assert parse_event_caption("Nothing happens here.") is None


def test_edits_are_valid_and_described(rng):
    seen = set()
    for _ in range(200):
        scene = sample_scene(rng)
        text, edited, record = sample_edit(scene, rng)
        seen.add(record["type"])
        assert scene_is_valid(edited) and not scene_match(edited, scene)
        assert text.endswith(".")
        if record["type"] == "add":
            assert len(edited) == len(scene) + 1
            assert scene_match(parse_caption(text), (edited[-1],))
    assert seen == set(EDITS)


def test_construction_adds_one_object_per_step(rng):
    scene = sample_scene(rng, n_objects=3, occlusion_prob=0.0)
    steps = construction_steps(scene, rng)
    assert len(steps) == 4 and steps[0][1] == ()
    for k, (text, partial) in enumerate(steps[1:], start=1):
        assert len(partial) == k
        assert scene_match(parse_caption(text), (scene[k - 1],))
        assert scene_match(parse_scene(render_image(partial)), partial)
