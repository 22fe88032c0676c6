import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from omnitok.errors import OmnitokError
from omnitok.world import build as build_mod
from omnitok.world.build import HELDOUT_COMBOS, KINDS, SPLITS, WorldConfig, build_world
from omnitok.world.parser import parse_scene, scene_match
from omnitok.world.read import iter_samples, load_manifest
from omnitok.world.scene import scene_from_json

SMALL = WorldConfig(n=40, seed=3, speech=False, samples_per_shard=8)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "config.json"
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    build_world(out, SMALL, workers=2)
    return out


def test_same_seed_same_bytes_whatever_the_worker_count(world, tmp_path):
    build_world(tmp_path, SMALL, workers=1)
    assert _digests(tmp_path) == _digests(world)


def test_other_seed_other_bytes(world, tmp_path):
    build_world(tmp_path, WorldConfig(n=40, seed=4, speech=False, samples_per_shard=8), workers=1)
    assert _digests(tmp_path) != _digests(world)


def test_manifest_counts_and_shards(world):
    m = load_manifest(world)
    assert m["seed"] == 3 and m["generator_version"] == build_mod.GENERATOR_VERSION
    assert m["heldout"]["combos"] == [list(c) for c in HELDOUT_COMBOS]
    for split in SPLITS:
        for kind in KINDS:
            listed = [s for s in m["shards"][split] if s["kind"] == kind]
            assert sum(s["count"] for s in listed) == m["counts"][split][kind]
            for s in listed:
                assert hashlib.sha256((world / s["path"]).read_bytes()).hexdigest() == s["sha256"]
    assert sum(m["counts"][s]["scene"] for s in SPLITS) == 40


def test_samples_decode_and_agree_with_their_annotations(world):
    samples = list(iter_samples(world, "val", "scene"))
    assert len(samples) == load_manifest(world)["counts"]["val"]["scene"]
    for s in samples:
        scene = scene_from_json(s["meta"]["scene"])
        assert s["png"].shape == (64, 64, 3) and s["png"].dtype == np.uint8
        assert scene_match(parse_scene(s["png"]), scene)
        assert s["mask.png"].max() == len(scene)
        assert len(s["meta"]["captions"]) == SMALL.captions_per_scene
    clip = next(iter_samples(world, "train", "video"))
    assert clip["video.png"].shape == (64, 64 * clip["meta"]["n_frames"], 3)
    doc = next(iter_samples(world, "train", "construction"))
    images = [seg["file"] for seg in doc["meta"]["segments"] if seg["type"] == "image"]
    assert all(doc[f].shape == (64, 64, 3) for f in images)


def test_train_split_never_shows_heldout_combos(world):
    held = {tuple(c) for c in HELDOUT_COMBOS}
    for kind in KINDS:
        for s in iter_samples(world, "train", kind, decode=False):
            meta = json.loads(s["json"])
            assert not meta["heldout_combo"]
            text = json.dumps(meta)
            assert not any(f"{c} {sh}" in text for c, sh in held), (kind, meta["key"])


def test_test_split_holds_heldout_combos(tmp_path):
    cfg = WorldConfig(n=200, seed=1, speech=False, samples_per_shard=100, kind_ratios={"scene": 1.0})
    build_world(tmp_path, cfg, workers=1)
    flags = [json.loads(s["json"])["heldout_combo"] for s in iter_samples(tmp_path, "test", "scene", decode=False)]
    assert 0 < sum(flags) < len(flags)


def test_resume_rebuilds_only_missing_shards_identically(world, tmp_path):
    build_world(tmp_path, SMALL, workers=1)
    victim = sorted(tmp_path.glob("train/scene-*.tar"))[1]
    victim.unlink()
    (tmp_path / "manifest.json").unlink()
    manifest = build_world(tmp_path, SMALL, workers=1)
    assert manifest["_built_samples"] == SMALL.samples_per_shard
    assert _digests(tmp_path) == _digests(world)


def test_crash_leaves_no_partial_shard(tmp_path, monkeypatch):
    real = build_mod.make_sample

    def flaky(cfg, split, kind, index):
        if kind == "edit" and index == 2:
            raise RuntimeError("disk on fire")
        return real(cfg, split, kind, index)

    monkeypatch.setattr(build_mod, "make_sample", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_world(tmp_path, SMALL, workers=1)
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    for shard in tmp_path.rglob("*.tar"):  # whatever exists is whole
        with tarfile.open(shard) as tf:
            assert len(tf.getnames()) > 0
    assert not (tmp_path / "train" / "edit-00000.tar").exists()


def test_changed_settings_are_refused(world):
    with pytest.raises(OmnitokError, match=r"different settings.*n"):
        build_world(world, WorldConfig(n=41, seed=3, speech=False, samples_per_shard=8))


def test_a_world_from_before_a_new_config_field_still_resumes(world):
    # config.json written by a builder that did not know speech_fraction: the missing field reads as its default
    path = world / "config.json"
    saved = path.read_text()
    raw = json.loads(saved)
    del raw["config"]["speech_fraction"]
    path.write_text(json.dumps(raw))
    try:
        assert build_world(world, SMALL)["_built_samples"] == 0
    finally:
        path.write_text(saved)


def test_speech_fraction_speaks_only_some_scenes(tmp_path):
    from omnitok.tokenizers.speech_train import load_world_clips

    cfg = WorldConfig(n=40, seed=5, speech_fraction=0.3, samples_per_shard=40, kind_ratios={"scene": 1.0})
    build_world(tmp_path, cfg, workers=1)
    scenes = list(iter_samples(tmp_path, "train", "scene"))
    spoken = [s for s in scenes if "wav" in s]
    assert 0 < len(spoken) < len(scenes) // 2
    assert all("speech" in s["meta"] for s in spoken)
    assert not any("speech" in s["meta"] for s in scenes if "wav" not in s)
    assert len(load_world_clips(tmp_path, "train", kinds=("scene",))) == len(spoken)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (WorldConfig(n=0, speech=False), "--n must be a positive"),
        (WorldConfig(n=10, seed=-1, speech=False), "--seed"),
        (WorldConfig(n=10, speech=False, kind_ratios={"podcast": 1.0}), "unknown kinds"),
        (WorldConfig(n=10, speech=False, caption_error_rate=1.5), "caption_error_rate"),
        (WorldConfig(n=10, speech=False, speech_fraction=-0.1), "speech_fraction"),
    ],
)
def test_bad_config_is_refused_before_any_work(tmp_path, cfg, message):
    with pytest.raises(OmnitokError, match=message):
        build_world(tmp_path / "w", cfg)
    assert not (tmp_path / "w").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omnitok", *args], capture_output=True, text=True, timeout=120)


def test_cli_reports_bad_arguments_on_one_line(tmp_path):
    r = _cli("world", "build", "--out", str(tmp_path / "w"), "--n", "-3", "--no-speech")
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == ["error: --n must be a positive number of scene samples, got -3"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli("world", "build", "--out", str(blocker / "sub"), "--n", "5", "--no-speech")
    assert r.returncode == 2 and "not writable" in r.stderr


def test_cli_build_writes_config_and_summary(tmp_path):
    r = _cli("world", "build", "--out", str(tmp_path), "--n", "12", "--no-speech", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "scene" in r.stdout and "samples/s" in r.stdout
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["command"] == "omnitok world build" and record["config"]["n"] == 12
    r = _cli("world", "info", str(tmp_path))
    assert r.returncode == 0 and "caption_filter" in r.stdout


def test_spoken_clips_record_where_their_words_start(tmp_path):
    """The read-aloud layout cuts a clip at its words (omnitok.sequence): the world keeps eSpeak's word onsets."""
    cfg = WorldConfig(n=10, seed=0, samples_per_shard=20, kind_ratios={"scene": 1.0, "spoken_qa": 0.3})
    build_world(tmp_path, cfg, workers=1)
    records = [s["meta"]["speech"] for s in iter_samples(tmp_path, "train", "scene")]
    records += [
        s["meta"][k] for s in iter_samples(tmp_path, "train", "spoken_qa") for k in ("question_speech", "answer_speech")
    ]
    assert len(records) >= 10
    for rec in records:
        onsets, words = rec["word_onsets"], rec["text"].split()
        assert len(onsets) == len(words) and onsets == sorted(onsets) and onsets[-1] < rec["num_samples"]
        # a sentence of several words is spoken over most of its clip, its last word well after its first
        assert len(words) < 3 or onsets[-1] - onsets[0] > 0.4 * rec["num_samples"]
