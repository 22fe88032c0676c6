"""The evaluation suite runs every task end to end and writes its report (speech tasks: eSpeak as the model)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import omnitok
from omnitok.bundle import save_bundle
from omnitok.errors import OmnitokError
from omnitok.eval import metrics as M
from omnitok.eval.suite import EvalConfig, evaluate
from omnitok.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from omnitok.tokenizers.text import TextTokenizer
from omnitok.vocab import Vocabulary
from omnitok.world.build import WorldConfig, build_world
from omnitok.world.language import canonical_caption
from omnitok.world.read import iter_samples
from omnitok.world.scene import SceneObject, render_image, scene_from_json


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    build_world(root / "world", WorldConfig(n=80, seed=0, speech=False, samples_per_shard=100), workers=1)
    text = TextTokenizer.train(["a large red circle in the top left"] * 20, vocab_size=280)
    text.save(root / "text")
    img = ImageTokenizer(ImageTokenizerConfig(widths=(8, 8, 8, 8), depths=(1, 1, 1, 1), levels=(4, 4, 4)))
    img.save(root / "image")
    vocab = Vocabulary.build(text.vocab_size, {"image": img.codebook_size})
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab.size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
        )
    )
    save_bundle(root / "bundle", lm, vocab, root / "text", root / "image")
    return root


def test_suite_writes_metrics_and_report(setup):
    model = omnitok.load(str(setup / "bundle"))
    cfg = EvalConfig(limit=3, batch_size=3)
    metrics = evaluate(model, setup / "world", setup / "out", cfg)
    for name in (
        "caption_acc",
        "caption_object_f1",
        "t2i_acc",
        "t2i_object_f1",
        "video_caption_acc",
        "edit_acc",
        "interleaved_acc",
        "vqa_acc",
    ):
        assert name in metrics and set(metrics[name]) >= {"all", "seen", "heldout", "n"}
        assert 1 <= metrics[name]["n"]["all"] <= 3
        assert 0.0 <= metrics[name]["all"] <= 1.0
    assert set(metrics["_meta"]["skipped"]) == {"asr", "tts", "spoken_qa"}
    saved = json.loads((setup / "out" / "metrics.json").read_text())
    assert saved["caption_acc"] == metrics["caption_acc"]
    page = (setup / "out" / "report.html").read_text()
    assert "<table>" in page and "data:image/png;base64," in page and "caption_acc" in page
    assert json.loads((setup / "out" / "config.json").read_text())["config"]["limit"] == 3


def test_metrics_accept_right_answers_and_reject_wrong_ones(setup):
    s = next(iter_samples(setup / "world", "test", "scene"))
    scene = scene_from_json(s["meta"]["scene"])
    assert M.caption_correct(canonical_caption(scene), scene)
    assert all(M.caption_correct(c, scene) for c in s["meta"]["captions"])
    assert not M.caption_correct("An empty picture.", scene)
    # partial credit: all objects right is 1, none stated is 0, one object of a two-object scene is 2/3
    assert M.caption_object_f1(canonical_caption(scene), scene) == 1.0
    assert M.caption_object_f1("An empty picture.", scene) == 0.0
    pair = (SceneObject("circle", "red", "large", 0, 0), SceneObject("star", "blue", "small", 2, 2))
    assert M.caption_object_f1(canonical_caption(pair[:1]), pair) == pytest.approx(2 / 3)  # P 1, R 1/2
    assert M.image_object_f1(render_image(scene), scene) == 1.0
    assert M.image_correct(render_image(scene), scene)
    assert not M.image_correct(np.full((64, 64, 3), 230, np.uint8), scene)
    assert M.answer_correct("there are two objects", "There are two objects.")
    assert M.answer_correct("um two objects", "There are two objects.")
    assert not M.answer_correct("there are three objects", "There are two objects.")
    assert M.answer_correct("yes there is", "Yes, there is.") and not M.answer_correct("no", "Yes, there is.")
    assert M.rate([]) is None


def test_unknown_task_is_named(setup):
    model = omnitok.load(str(setup / "bundle"))
    with pytest.raises(OmnitokError, match="unknown task"):
        evaluate(model, setup / "world", setup / "o2", EvalConfig(tasks=["karaoke"]))


def test_time_box_scores_a_prefix_of_each_task(setup, tmp_path):
    model = omnitok.load(str(setup / "bundle"))
    cfg = EvalConfig(limit=6, batch_size=2, tasks=["caption", "t2i"], max_minutes=1e-6)
    metrics = evaluate(model, setup / "world", tmp_path / "out", cfg)
    # the share is spent at once, so each task scores exactly its first batch and says so
    assert metrics["caption_acc"]["n"]["all"] == 2 and metrics["t2i_acc"]["n"]["all"] == 2
    assert metrics["_meta"]["max_minutes"] == 1e-6 and metrics["_meta"]["seconds"] >= 0
    assert set(metrics["_meta"]["task_seconds"]) == {"caption", "t2i"}


def test_batches_are_sized_to_what_is_left_of_the_share(tmp_path, monkeypatch):
    """Under a cap a task starts small, then sizes each batch from its cost per prompt so far, and stops at 0."""
    from omnitok.eval import suite as suite_module
    from omnitok.eval.suite import FIRST_BATCH, Suite

    # a clock that stands still: with the real one a pause of a second (a loaded machine) changed the sizes below
    monkeypatch.setattr(suite_module.time, "monotonic", lambda: 1000.0)
    suite = Suite(model=None, world=tmp_path, cfg=EvalConfig(max_minutes=1.0, batch_size=16))
    suite.deadline = 1000.0 + 10.0
    assert suite._batch_size(done=0, seconds_per_prompt=0.0, left=30) == FIRST_BATCH  # the first always runs
    assert suite._batch_size(done=0, seconds_per_prompt=0.0, left=2) == 2
    assert suite._batch_size(done=4, seconds_per_prompt=20.0, left=26) == 0  # one more prompt would overrun
    assert suite._batch_size(done=4, seconds_per_prompt=2.0, left=26) == 5  # 10 s left at 2 s a prompt
    assert suite._batch_size(done=4, seconds_per_prompt=0.01, left=26) == 16  # never above batch_size
    assert suite._batch_size(done=20, seconds_per_prompt=0.01, left=10) == 10
    # a batch costs at least what the cheapest one so far did, however few prompts it takes
    assert suite._batch_size(done=4, seconds_per_prompt=1.0, left=26, least=8.0) == 10
    assert suite._batch_size(done=4, seconds_per_prompt=1.0, left=26, least=11.0) == 0
    suite.deadline = None
    assert suite._batch_size(done=4, seconds_per_prompt=1e9, left=26) == 16  # no cap: full batches


def test_sampling_overrides_reach_generation_and_the_run_record(setup, tmp_path):
    from omnitok.decoding import Sampling

    model = omnitok.load(str(setup / "bundle"))
    seen = []
    generate_batch = model.generate_batch
    model.generate_batch = lambda prompts, **kw: seen.append(kw) or generate_batch(prompts, **kw)
    hot = Sampling(temperature=0.9, top_k=8)
    cfg = EvalConfig(limit=2, tasks=["caption", "t2i"], sampling={"image": hot})
    evaluate(model, setup / "world", tmp_path / "out", cfg)
    assert len(seen) == 2 and all(kw["image"] == hot for kw in seen)
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())["config"]["sampling"]
    assert recorded == {"image": {"temperature": 0.9, "top_k": 8, "top_p": 1.0}}
    with pytest.raises(OmnitokError, match="eval sampling"):
        evaluate(model, setup / "world", tmp_path / "o2", EvalConfig(tasks=["t2i"], sampling={"pixels": hot}))


def test_caption_best_of_reaches_generation_and_is_checked(setup, tmp_path):
    model = omnitok.load(str(setup / "bundle"))
    seen = []
    generate_batch = model.generate_batch
    model.generate_batch = lambda prompts, **kw: seen.append(kw) or generate_batch(prompts, **kw)
    metrics = evaluate(
        model, setup / "world", tmp_path / "out", EvalConfig(limit=2, tasks=["caption"], caption_best_of=2)
    )
    assert seen[0]["output"] == "text" and seen[0]["best_of"] == 2 and metrics["caption_acc"]["n"]["all"] == 2
    with pytest.raises(OmnitokError, match=r"caption_best_of \(--caption-best-of\) must be an int >= 1, got 0"):
        evaluate(model, setup / "world", tmp_path / "o2", EvalConfig(tasks=["caption"], caption_best_of=0))
    with pytest.raises(OmnitokError, match=r"tts_best_of \(--tts-best-of\) must be an int >= 1, got 0"):
        evaluate(model, setup / "world", tmp_path / "o3", EvalConfig(tasks=["caption"], tts_best_of=0))
    with pytest.raises(OmnitokError, match=r"spoken_qa_best_of \(--spoken-qa-best-of\) must be an int >= 1, got 0"):
        evaluate(model, setup / "world", tmp_path / "o3", EvalConfig(tasks=["caption"], spoken_qa_best_of=0))
    with pytest.raises(OmnitokError, match=r"limit \(--limit\) must be an int >= 1, got 0"):  # it scored one
        evaluate(model, setup / "world", tmp_path / "o3", EvalConfig(tasks=["caption"], limit=0))
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_held_out_voices_are_given_a_mid_pitch_reference_of_their_speaker(monkeypatch):
    from omnitok.eval import suite as S

    def clip(key, voice, pitch, rate="normal", heldout=True):
        speech = {"voice": voice, "pitch": pitch, "rate": rate, "heldout_voice": heldout}
        return {"key": key, "meta": {"speech": speech}, "wav": np.full(4, float(len(key)), np.float32), "id": key}

    samples = [
        clip("a", "v1", "high"),
        clip("bb", "v1", "low", "slow"),
        clip("ccc", "v1", "mid", "fast"),
        clip("dddd", "v1", "mid"),
        clip("eeeee", "v2", "high"),
        clip("ffffff", "seen", "low", heldout=False),
    ]
    # v2 has no other clip among the evaluated: the test split is searched for one at mid pitch
    rest = [clip("g" * 7, "v2", "low"), clip("h" * 8, "v2", "mid", "slow"), clip("i" * 9, "v2", "mid")]
    monkeypatch.setattr(S, "iter_samples", lambda world, split, kind: iter(samples + rest))
    refs = S.Suite(None, Path("w"), EvalConfig())._voice_references(samples)
    assert set(refs) == {"a", "bb", "ccc", "dddd", "eeeee"}  # held-out voices only
    got = {k: int(v[0]) for k, v in refs.items()}  # the reference's key length
    assert got == {"a": 4, "bb": 4, "ccc": 4, "dddd": 3, "eeeee": 8}  # mid and normal first; never itself


class EspeakModel:
    """Answers every speech request with eSpeak's own audio of the right words in the asked-for style.

    The speech tasks' instruments must then score it as they score eSpeak: intelligible, every style right, every
    spoken answer correct. The suite's bundles here have no speech tokenizer, so this is where TTS and spoken QA run.
    """

    def __init__(self, world: Path) -> None:
        from omnitok.world.speech import Speaker

        self.speaker = Speaker()
        self.voice_of: dict[str, str] = {}
        self.answer_to: dict[bytes, str] = {}
        for s in iter_samples(world, "test", "scene"):
            if "wav" in s:
                self.voice_of[s["meta"]["speech"]["text"]] = s["meta"]["speech"]["voice"]
        for s in iter_samples(world, "test", "spoken_qa"):
            if "question.wav" in s:
                self.answer_to[s["question.wav"].tobytes()] = s["meta"]["answer"]
        self.batches: list[int] = []
        self.options: list[dict] = []  # each batch's generation options

    def _say(self, text: str, voice: str, pitch: str = "mid", rate: str = "normal"):
        from omnitok.sequence import Audio
        from omnitok.world.speech import Style

        return Audio(samples=self.speaker.synthesize(text, Style(voice, pitch, rate)), sample_rate=16000)

    def generate_batch(self, prompts, seed=0, output="auto", style=None, reference=None, **opts):
        from omnitok.sequence import Text

        self.batches.append(len(prompts))
        self.options.append({"output": output, "style": style, **opts})
        out = []
        for i, prompt in enumerate(prompts):
            if output == "speech":  # TTS: [Text("Say this: ...")], the voice from the style or the reference
                text = prompt[0].text.removeprefix("Say this: ")
                st = style[i]
                out.append([self._say(text, self.voice_of[text], st["pitch"], st["rate"])])
            else:  # spoken QA: [Image, Audio(question)] -> the answer written and spoken
                answer = self.answer_to[prompt[1].samples.tobytes()]
                out.append([Text(answer), self._say(answer, "us_m1")])
        return out


def test_speech_tasks_score_espeak_as_espeak(tmp_path):
    from omnitok.eval.suite import Suite, _summarise

    build_world(tmp_path / "world", WorldConfig(n=40, seed=0, samples_per_shard=100), workers=1)
    model = EspeakModel(tmp_path / "world")
    suite = Suite(model, tmp_path / "world", EvalConfig(limit=4, batch_size=3))
    tts = {name: _summarise(name, recs) for name, recs in suite.tts().items()}
    spoken = min(4, len(model.voice_of))
    assert spoken >= 2 and tts["tts_wer"]["n"]["all"] == tts["tts_style_acc"]["n"]["all"] == spoken
    assert model.batches == [3, spoken - 3] if spoken > 3 else [spoken]  # no cap: full batches
    assert tts["tts_style_acc"]["all"] == 1.0  # every clip's pitch and rate classified as asked
    assert tts["tts_wer"]["all"] <= tts["tts_wer_ref"]["all"] + 0.15  # heard as well as the world's own recordings
    model.options.clear()
    qa = suite.spoken_qa()["spoken_qa_acc"]
    assert len(qa) >= 1 and sum(bool(r.score) for r in qa) >= len(qa) - 1  # answers spoken by eSpeak are heard
    # one reply, words then the clip, in the model's own voice; best_of 1 unless asked
    assert {(o["output"], o["style"], o["best_of"]) for o in model.options} == {("text+speech", None, 1)}
    model.options.clear()
    again = Suite(model, tmp_path / "world", EvalConfig(limit=2, spoken_qa_best_of=3), suite.transcriber)
    assert len(again.spoken_qa()["spoken_qa_acc"]) == min(2, len(qa))
    assert [o["best_of"] for o in model.options] == [3] and model.options[0]["output"] == "text+speech"


def test_typed_questions_are_asked_with_the_picture_and_the_answer_checked(setup):
    """vqa_acc: the spoken-QA questions typed; an answering model scores 1, one that captions instead scores 0."""
    from omnitok.eval.suite import Suite, _summarise
    from omnitok.sequence import Image, Text

    truth = {
        (s["png"].tobytes(), s["meta"]["question"]): s["meta"]["answer"]
        for s in iter_samples(setup / "world", "test", "spoken_qa")
    }

    class Answers:
        def __init__(self, right: bool) -> None:
            self.right, self.outputs = right, []

        def generate_batch(self, prompts, output="auto", **opts):
            self.outputs.append(output)
            out = []
            for picture, question in prompts:
                assert isinstance(picture, Image) and isinstance(question, Text)
                answer = truth[(picture.pixels.tobytes(), question.text)]
                out.append([Text(answer if self.right else "A large red circle in the top left.")])
            return out

    for right, expected in ((True, 1.0), (False, 0.0)):
        model = Answers(right)
        recs = Suite(model, setup / "world", EvalConfig(limit=4)).vqa()["vqa_acc"]
        got = _summarise("vqa_acc", recs)
        assert got["n"]["all"] == min(4, len(truth)) >= 1 and got["all"] == expected
        assert set(model.outputs) == {"text"}
