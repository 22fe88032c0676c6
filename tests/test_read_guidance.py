"""Guidance for text about a picture: the caption task's picture drop, the bundle that records it, and the decoder
that reads against the request without its pictures only where that is what the bundle was trained for."""

import json
import math

import numpy as np
import pytest
import torch

import omnitok
import omnitok.generate as generate
from omnitok.bundle import save_bundle
from omnitok.data import tasks
from omnitok.decoding import READ_CFG_PLAUSIBLE, guided_reading
from omnitok.errors import OmnitokError
from omnitok.generate import TextDelta
from omnitok.sequence import Image, Text
from serve_helpers import IMAGE_SIZE


def test_guided_reading_reorders_only_what_the_picture_makes_plausible():
    # cond: the picture says "star" (1) nearly as much as the habit "square" (0); without it, "square" is certain
    cond = torch.log(torch.tensor([[0.50, 0.40, 0.09, 0.01]]))
    uncond = torch.log(torch.tensor([[0.90, 0.01, 0.01, 0.08]]))
    assert int(cond.argmax()) == 0
    g = guided_reading(cond, uncond, 3.0)
    assert int(g.argmax()) == 1  # guidance lets the picture's evidence win over the text's habit
    # token 3 gains most from guidance (0.01 against 0.08 is a *loss*, but token 2's 0.09 vs 0.01 is a big gain) yet
    # only tokens within READ_CFG_PLAUSIBLE of the conditional best are candidates
    assert math.isinf(float(g[0, 3])) and float(g[0, 3]) < 0
    assert READ_CFG_PLAUSIBLE < 0.09 / 0.50 and math.isfinite(float(g[0, 2]))
    # scale 1 is the conditional row's own log-probabilities among the plausible tokens
    one = guided_reading(cond, uncond, 1.0)
    keep = torch.isfinite(one)
    assert torch.allclose(one[keep], cond.log_softmax(-1)[keep])


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from serve_helpers import build_tiny_bundle

    root = tmp_path_factory.mktemp("read")
    build_tiny_bundle(root, speech=False)  # root/bundle-text-image: captions never trained without their picture
    build_tiny_bundle(root, speech=False, caption_image_drop=0.15)
    (root / "plain").symlink_to(root / "bundle-text-image")
    (root / "dropped").symlink_to(root / "bundle-text-image-drop")
    return root


def _spy(monkeypatch):
    rows = []
    decode = generate.iter_decode

    def iter_decode(lm, prompts, constraint, cfg, uncond, gen):
        rows.append((prompts, uncond, cfg))
        return decode(lm, prompts, constraint, cfg, uncond, gen)

    monkeypatch.setattr(generate, "iter_decode", iter_decode)
    return rows


def test_reading_is_guided_against_the_request_without_its_picture(bundles, monkeypatch):
    plain, dropped = omnitok.load(str(bundles / "plain")), omnitok.load(str(bundles / "dropped"))
    assert json.loads((bundles / "dropped" / "omnitok.json").read_text())["caption_image_drop"] == 0.15
    assert (plain.bundle.caption_image_drop, dropped.bundle.caption_image_drop) == (0.0, 0.15)
    picture = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    ask = [Image(pixels=picture), Text("describe the picture")]
    rows = _spy(monkeypatch)
    dropped.generate(ask, output="text", max_new_tokens=4)  # off by default
    dropped.generate(ask, output="text", max_new_tokens=4, text_cfg_scale=3.0)
    dropped.generate([Text("describe the picture")], output="text", max_new_tokens=4, text_cfg_scale=3.0)  # no picture
    dropped.generate(ask, output="image", text_cfg_scale=3.0, cfg_scale=1.0)  # drawing: text guidance does not apply
    assert [r[1] is None for r in rows] == [True, False, True, True]
    # a bundle that never learned the request without a picture is guided all the same, with a warning that says so
    with pytest.warns(UserWarning, match="was not trained with captions without their picture"):
        plain.generate(ask, output="text", max_new_tokens=4, text_cfg_scale=3.0)
    assert rows[-1][1] is not None
    (cond,), (uncond,), cfg = rows[1]
    assert cfg.text_cfg_scale == 3.0 and cfg.cfg_scale == 1.0
    kinds = [dropped.vocab.kind(t) for t in uncond.tolist()]
    assert "image" not in kinds and "image" in [dropped.vocab.kind(t) for t in cond.tolist()]
    # the guidance row is the same request without its picture span
    ids = cond.tolist()
    start, end = ids.index(dropped.vocab.special("<image>")), ids.index(dropped.vocab.special("</image>"))
    assert ids[:start] + ids[end + 1 :] == uncond.tolist()


def test_guided_replies_stream_as_they_are_generated(bundles, monkeypatch):
    model = omnitok.load(str(bundles / "dropped"))
    picture = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 200, np.uint8)
    ask = [Image(pixels=picture), Text("describe the picture")]
    (reply,) = model.generate(ask, output="text", max_new_tokens=8, text_cfg_scale=3.0)
    rows = _spy(monkeypatch)
    events = model.stream(ask, output="text", max_new_tokens=8, text_cfg_scale=3.0)
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert rows and rows[0][1] is not None and streamed == reply.text


def test_a_request_without_a_picture_is_not_guided_in_a_batch_with_one(bundles, monkeypatch):
    """Sampled, with a plausibility cut that leaves only the likeliest token (a random LM's rows are flat): the
    text-only request samples as it does alone, while its guided neighbour is cut to greedy."""
    import omnitok.decoding as decoding

    monkeypatch.setattr(decoding, "READ_CFG_PLAUSIBLE", 0.999)
    model = omnitok.load(str(bundles / "dropped"))
    hot = {"text": generate.Sampling(temperature=1.0)}
    picture = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    ask, shown = [Text("describe the picture")], [Image(pixels=picture), Text("a large red circle")]

    def texts(requests, **kw):
        return [r[0].text for r in model.generate_batch(requests, output="text", max_new_tokens=12, seed=3, **kw)]

    alone = texts([ask, [Text("a large red circle")]], **hot)
    mixed = texts([ask, shown], text_cfg_scale=1.0, **hot)
    guided = texts([ask, shown], text_cfg_scale=3.0, **hot)
    assert alone[0] == mixed[0] == guided[0]
    (greedy,) = texts([shown], text_cfg_scale=1.0)
    assert guided[1] != mixed[1] and guided[1] == greedy


def test_bad_guidance_values_are_refused_by_name(bundles, tmp_path):
    model = omnitok.load(str(bundles / "dropped"))
    for bad in (-1.0, float("nan"), "3"):
        with pytest.raises(OmnitokError, match="text_cfg_scale"):
            model.generate([Text("hi")], output="text", text_cfg_scale=bad)
    with pytest.raises(OmnitokError, match="caption_image_drop"):
        save_bundle(tmp_path / "b", model.lm, model.vocab, bundles / "text", bundles / "image", caption_image_drop=1.0)
    assert not (tmp_path / "b").exists()
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(bundles / "dropped", broken)
    manifest = json.loads((broken / "omnitok.json").read_text())
    (broken / "omnitok.json").write_text(json.dumps({**manifest, "caption_image_drop": "lots"}))
    with pytest.raises(OmnitokError, match=r"omnitok.json: field 'caption_image_drop'"):
        omnitok.load(str(broken))


def test_the_caption_task_drops_its_picture_at_the_set_share(monkeypatch):
    sample = {"png": np.zeros((8, 8, 3), np.uint8), "meta": {"captions": ["A red circle.", "Red circle."]}}
    monkeypatch.setattr(tasks, "CAPTION_IMAGE_DROP", 0.0)
    rng = np.random.default_rng(0)
    assert all(isinstance(tasks.caption(sample, rng)[0][0], Image) for _ in range(20))
    monkeypatch.setattr(tasks, "CAPTION_IMAGE_DROP", 0.5)
    docs = [tasks.caption(sample, np.random.default_rng(i))[0] for i in range(200)]
    dropped = [d for d in docs if not any(isinstance(s, Image) for s in d)]
    assert 60 < len(dropped) < 140
    assert all(d[-1].text == "A red circle." and d[-1].role == "assistant" for d in docs)  # the answer is the same
