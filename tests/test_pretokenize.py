"""World -> token shards: every task encodes, decodes back to its segments, and reruns resume."""

import json
import shutil
from pathlib import Path

import pytest

from omnitok.data.pretokenize import pretokenize
from omnitok.data.shards import TokenDataset, load_manifest
from omnitok.errors import OmnitokError
from omnitok.sequence import Image, Text, Video, decode
from omnitok.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from omnitok.tokenizers.text import TextTokenizer
from omnitok.vocab import Vocabulary
from omnitok.world.build import WorldConfig, build_world

TASKS = ["caption", "t2i", "interleaved", "edit", "video_caption", "caption_filter", "text", "vqa"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("pretok")
    build_world(root / "world", WorldConfig(n=30, seed=0, speech=False, samples_per_shard=20), workers=1)
    cfg = ImageTokenizerConfig(widths=(8, 8, 8, 8), depths=(1, 1, 1, 1), levels=(4, 4, 4))
    ImageTokenizer(cfg).save(root / "imgtok")
    pretokenize(root / "world", root / "tokens", root / "imgtok", tasks=TASKS, text_vocab_size=300, batch_size=8)
    return root / "world", root / "tokens", root / "imgtok"


def test_every_task_is_tokenized_and_decodes(setup):
    _, tokens, _ = setup
    manifest = load_manifest(tokens)
    vocab = Vocabulary.load(tokens)
    text = TextTokenizer.load(tokens / "text_tokenizer")
    assert manifest["vocab_size"] == vocab.size == text.vocab_size + len(vocab.specials) + 64
    for task in TASKS:
        ds = TokenDataset(tokens, "train", task)
        assert len(ds) > 0
        ids, mask = ds[0]
        assert ids.max() < vocab.size and mask.any()
        segs = decode(ids, vocab, text)
        assert segs, task
        if task == "t2i":
            assert isinstance(segs[-1], Image) and segs[-1].role == "assistant" and len(segs[-1].codes) == 64
            assert mask[ids == vocab.special("<|assistant|>")].sum() == 0
        if task == "caption":
            assert isinstance(segs[-1], Text) and segs[-1].role == "assistant"
        if task == "video_caption":
            assert isinstance(segs[0], Video) and 4 <= len(segs[0].frames) <= 8
        if task == "interleaved":
            assert all(s.role is None for s in segs) and mask[1:].all()
        if task == "vqa":  # a world without speech still asks its questions, typed
            assert [type(s) for s in segs] == [Image, Text, Text]
            assert [s.role for s in segs] == ["user", "user", "assistant"]
            assert segs[1].text.endswith("?") and not mask[ids == vocab.special("<|user|>")].any()


def test_rerun_resumes_without_rewriting(setup):
    world, tokens, imgtok = setup
    shard = tokens / "train" / "caption" / "shard-00000.ids.npy"
    before = shard.stat().st_mtime_ns
    pretokenize(world, tokens, imgtok, tasks=TASKS, text_vocab_size=300)
    assert shard.stat().st_mtime_ns == before


def test_two_ranks_cover_the_same_documents(setup, tmp_path):
    world, tokens, imgtok = setup
    out = tmp_path / "tok"
    text_dir = tokens / "text_tokenizer"
    # rank 0 prepares the vocabulary, rank 1 tokenizes its half, rank 0 reruns (resuming) to write the manifest;
    # under torchrun barriers order the same steps
    for rank in (0, 1, 0):
        pretokenize(world, out, imgtok, text_tokenizer=text_dir, tasks=["caption"], rank=rank, world_size=2)
    single = TokenDataset(tokens, "train", "caption")
    split = TokenDataset(out, "train", "caption")
    assert len(split) == len(single)
    a = sorted(tuple(single[i][0].tolist()) for i in range(len(single)))
    b = sorted(tuple(split[i][0].tolist()) for i in range(len(split)))
    assert a == b


def test_bad_requests_are_named(setup, tmp_path):
    world, _, imgtok = setup
    with pytest.raises(OmnitokError, match="unknown task"):
        pretokenize(world, tmp_path / "a", imgtok, tasks=["podcast"])
    with pytest.raises(OmnitokError, match="speech-tokenizer"):
        pretokenize(world, tmp_path / "b", imgtok, tasks=["asr"])
    with pytest.raises(OmnitokError, match="not a built omnitok world"):
        pretokenize(tmp_path, tmp_path / "c", imgtok)
    with pytest.raises(OmnitokError, match="splits"):
        pretokenize(world, tmp_path / "d", imgtok, splits=["dev"])
    with pytest.raises(OmnitokError, match="built with --no-speech: drop the flag"):
        pretokenize(world, tmp_path / "e", imgtok, tmp_path / "any_speech_tokenizer")
    assert not any((tmp_path / name).exists() for name in "abcde")  # a refused run leaves no folder behind


def test_resuming_with_other_settings_is_refused(setup, tmp_path, monkeypatch):
    world, tokens, imgtok = setup
    # finished shards are skipped on a rerun: one made with another seed or rank count would be mixed in silently
    with pytest.raises(OmnitokError, match="holds tokens made with seed 0, not 7"):
        pretokenize(world, tokens, imgtok, tasks=TASKS, text_vocab_size=300, seed=7)
    with pytest.raises(OmnitokError, match="world_size 1, not 2"):
        pretokenize(world, tokens, imgtok, tasks=TASKS, rank=1, world_size=2)
    other = tmp_path / "imgtok2"
    shutil.copytree(imgtok, other)
    with pytest.raises(OmnitokError, match="image_tokenizer"):
        pretokenize(world, tokens, other, tasks=TASKS)
    # the TTS layout is recorded (the trainer carries it into the bundle) and is part of what a rerun must keep;
    # tokens made before it was recorded were made in the plain layout
    record = json.loads((tokens / "config.json").read_text())
    assert record["config"]["read_aloud_words"] == 2
    with pytest.raises(OmnitokError, match="read_aloud_words 2, not 0"):
        pretokenize(world, tokens, imgtok, tasks=TASKS, read_aloud_words=0)
    # so is whether clips without the world's onsets are cut where the speech tokenizer aligns their words
    assert record["config"]["align_words"] is True
    with pytest.raises(OmnitokError, match="align_words True, not False"):
        pretokenize(world, tokens, imgtok, tasks=TASKS, align_words=False)
    # and the caption task's picture drop (the bundle passes it on: generation guides reading only where it was)
    from omnitok.data import tasks

    shipped = tasks.CAPTION_IMAGE_DROP
    assert record["config"]["caption_image_drop"] == shipped
    monkeypatch.setattr(tasks, "CAPTION_IMAGE_DROP", 0.5)
    with pytest.raises(OmnitokError, match=f"caption_image_drop {shipped}, not 0.5"):
        pretokenize(world, tokens, imgtok, tasks=TASKS)
    monkeypatch.undo()
    older = tmp_path / "older"
    shutil.copytree(tokens, older)
    del record["config"]["read_aloud_words"]
    (older / "config.json").write_text(json.dumps(record))
    with pytest.raises(OmnitokError, match="read_aloud_words 0, not 2"):
        pretokenize(world, older, imgtok, tasks=TASKS)
    with pytest.raises(OmnitokError, match="read_aloud_words must be an int >= 0"):
        pretokenize(world, tmp_path / "neg", imgtok, tasks=TASKS, read_aloud_words=-1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"command": "omnitok eval", "config": {}}))
    with pytest.raises(OmnitokError, match="holds another command's output"):
        pretokenize(world, tmp_path / "run", imgtok, tasks=TASKS)


def test_a_tts_clip_carries_the_words_it_says():
    """So the encoding can lay them beside their speech (omnitok.sequence's read-aloud layout)."""
    import numpy as np

    from omnitok.data.tasks import TTS_ASKS, sample_rng, tts
    from omnitok.sequence import Audio

    rec = {"text": "a small blue star", "voice": "us_m1", "pitch": "mid", "rate": "fast", "sample_rate": 16000}
    [[ask, clip]] = tts({"wav": np.zeros(160, np.float32), "meta": {"speech": rec}}, sample_rng(0, "k", "tts"))
    assert isinstance(clip, Audio) and clip.words == "a small blue star" and clip.role == "assistant"
    assert any(ask.text == a + "a small blue star" for a in TTS_ASKS)
    assert clip.word_onsets is None and clip.phonemes is None  # a world made before eSpeak's word events, no phonemes
    rec["phonemes"] = "ɐ s_m_ˈɔː_l b_l_ˈuː s_t_ˈɑː_ɹ"
    [[_, clip]] = tts({"wav": np.zeros(160, np.float32), "meta": {"speech": rec}}, sample_rng(0, "k", "tts"))
    assert clip.word_onsets is None and clip.phonemes == rec["phonemes"]  # pretokenization aligns the words from them
    rec |= {"num_samples": 160, "word_onsets": [0, 40, 80, 120]}
    [[_, clip]] = tts({"wav": np.zeros(160, np.float32), "meta": {"speech": rec}}, sample_rng(0, "k", "tts"))
    assert clip.word_onsets == (0.0, 0.25, 0.5, 0.75)  # fractions of the clip, as the layout cuts by them
    assert clip.phonemes is None  # eSpeak's own onsets: nothing to align


def test_caption_answers_are_canonical_and_draw_prompts_paraphrase():
    import numpy as np

    from omnitok.data import tasks
    from omnitok.world.language import canonical_caption, captions, parse_caption
    from omnitok.world.parser import scene_match
    from omnitok.world.scene import sample_scene

    rng = np.random.default_rng(0)
    scene = sample_scene(rng, n_objects=3)
    sample = {"png": np.zeros((64, 64, 3), np.uint8), "meta": {"captions": captions(scene, rng, n=3)}}
    answers, prompts = set(), set()
    for seed in range(20):
        answers.add(tasks.caption(sample, np.random.default_rng(seed))[0][-1].text)
        prompts.add(tasks.t2i(sample, np.random.default_rng(seed))[0][0].text)
    assert answers == {canonical_caption(scene)}
    assert scene_match(parse_caption(answers.pop()), scene)
    assert any(c in p for p in prompts for c in sample["meta"]["captions"][1:])
