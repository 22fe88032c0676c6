"""``omnitok eval``: every task on the world's held-out test split, scored by independent instruments.

Each task generates with the bundle exactly as a user would (``OmniModel.generate_batch``), then scores the
output with the world's parsers or pocketsphinx, split by whether the example uses a composition or voice
that training never saw. Results go to ``metrics.json`` and a self-contained ``report.html``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omnitok.decoding import IMAGE_CFG_SCALE, SAMPLED_MODALITIES, Sampling
from omnitok.errors import OmnitokError, is_int
from omnitok.eval import metrics as M
from omnitok.io import atomic_write_json, ensure_writable_dir, write_run_config
from omnitok.sequence import Audio, Image, Segment, Text, Video, text_of
from omnitok.world.read import iter_samples, load_manifest
from omnitok.world.scene import scene_from_json

# The order they run in under a cap: each task's share is what is left split over the tasks still to run, so the
# cheap ones come first and what they leave passes to the costliest per prompt, TTS (generation, pocketsphinx on its
# clips and eSpeak's, the style instrument). Ahead of video captions it scored 4-5 clips of 30 in the demo's
# 1.7-minute box on a 2-core Xeon, the suite leaving 25 s of the box unused; last, 8-10 (docs/BENCHMARKS.md).
TASKS = (
    "caption",
    "vqa",
    "t2i",
    "asr",
    "video_caption",
    "edit",
    "interleaved",
    "spoken_qa",
    "tts",
)
SPEECH_TASKS = frozenset({"asr", "tts", "spoken_qa"})
# Prompts in a task's first batch under a time cap: enough to time a prompt, few enough to stop a slow task early.
FIRST_BATCH = 4


@dataclass
class EvalConfig:
    limit: int = 50  # examples per task (test split); evaluation is generation, so keep it modest on CPU
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    batch_size: int = 16
    seed: int = 0
    cfg_scale: float = IMAGE_CFG_SCALE
    # text about a picture (captions, typed answers, video captions) guided against the request without it (1: off;
    # omnitok.generate.GenerateOptions.text_cfg_scale)
    text_cfg_scale: float = 1.0
    t2i_best_of: int = 1  # text-to-image pictures drawn per caption, the one read back likeliest kept (1: plain)
    caption_best_of: int = 1  # captions written per picture, the reader + drawer likeliest kept (1: plain)
    tts_best_of: int = 1  # clips spoken per sentence, the one the LM hears the sentence in likeliest kept (1: plain)
    spoken_qa_best_of: int = 1  # clips spoken per written answer, the one the LM hears it in likeliest kept (1: plain)
    # Per-modality sampling instead of the generation defaults (omnitok.decoding), e.g. {"speech": Sampling(0.7)}:
    # the metrics depend on it, so it is part of the run's recorded config.
    sampling: dict[str, Sampling] = field(default_factory=dict)
    examples_in_report: int = 6
    # Wall-clock cap for the whole suite (None = none). Split evenly over the tasks still to run; a task stops
    # starting new batches once its share is spent (after at least one batch), and reports how many it scored.
    max_minutes: float | None = None


@dataclass
class Record:
    """One scored example; ``score`` is a bool (accuracy) or (reference, hypothesis) for WER."""

    group: str  # "seen" or "heldout"
    score: Any
    shown: dict[str, Any] = field(default_factory=dict)


def _group(flag: bool) -> str:
    return "heldout" if flag else "seen"


# The guidance for reading a run may choose (choose_text_cfg_scale): 3 was the val split's best on a 60-minute bundle.
# It must write READ_GUIDANCE_MARGIN of the val scenes more exact captions than no guidance: where the two are within
# a few scenes (a 15-minute demo's 20 of 200 against 21) the difference is noise, and no guidance is the plainer reply.
READ_GUIDANCE_TRY = 3.0
READ_GUIDANCE_MARGIN = 0.02


def choose_text_cfg_scale(
    model: Any, world: str | os.PathLike[str], limit: int = 200, try_scale: float = READ_GUIDANCE_TRY
) -> tuple[float, dict[str, float]]:
    """``(scale, exact captions by scale)``: guidance for reading at ``try_scale`` if it writes at least
    ``READ_GUIDANCE_MARGIN`` of the val split's first ``limit`` scenes more exact captions than none does, else 1
    (off); 1 without measuring for a bundle trained without captions without their picture, which guidance needs.

    Why measured per run: guidance lifted a 60-minute bundle's held-out captions and halved a 15-minute one's seen
    ones (docs/BENCHMARKS.md "Guidance for reading"), and which kind a run made is known only once it has trained.
    Chosen on val, so the test split's metrics stay unbiased.
    """
    if not getattr(model.bundle, "caption_image_drop", 0):
        return 1.0, {}
    samples = [s for _, s in zip(range(limit), iter_samples(world, "val", "scene"), strict=False)]
    if not samples:
        return 1.0, {}
    scenes = [scene_from_json(s["meta"]["scene"]) for s in samples]
    counts = {
        scale: sum(map(M.caption_correct, write_captions(model, samples, text_cfg_scale=scale), scenes))
        for scale in (1.0, float(try_scale))
    }
    margin = max(1, math.ceil(READ_GUIDANCE_MARGIN * len(samples)))
    best = float(try_scale) if counts[float(try_scale)] >= counts[1.0] + margin else 1.0
    return best, {str(k): v / len(samples) for k, v in counts.items()}


CAPTION_ASK = "Describe the picture."  # the caption task's first ask: the evaluation's question


def write_captions(model: Any, samples: list[dict[str, Any]], batch_size: int = 16, **opts: Any) -> list[str]:
    """Each scene sample's picture described (``CAPTION_ASK``), ``batch_size`` at a time, with generation ``opts``."""
    out: list[str] = []
    for lo in range(0, len(samples), batch_size):
        prompts = [[Image(pixels=s["png"]), Text(CAPTION_ASK)] for s in samples[lo : lo + batch_size]]
        out += [text_of(r) for r in model.generate_batch(prompts, output="text", **opts)]
    return out


def _take(world: Path, kind: str, limit: int, need: str | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` test samples of ``kind`` (that carry file ``need``: a world may speak only some scenes)."""
    out = []
    for s in iter_samples(world, "test", kind):
        if need is not None and need not in s:
            continue
        out.append(s)
        if len(out) >= limit:
            break
    return out


def _first(segs: list[Segment], kind: type) -> Any:
    return next((s for s in segs if isinstance(s, kind)), None)


class Suite:
    def __init__(self, model: Any, world: Path, cfg: EvalConfig, transcriber: Any | None = None) -> None:
        self.model = model
        self.world = world
        self.cfg = cfg
        self._transcriber = transcriber
        self.deadline: float | None = None  # time.monotonic() after which a task starts no new batch

    def _batch_size(self, done: int, seconds_per_prompt: float, left: int, least: float = 0.0) -> int:
        """How many prompts a task's next batch takes: 0 once its share cannot pay for one more.

        Without a cap, ``batch_size``. With one, a task starts on a few prompts (``FIRST_BATCH``) and sizes each later
        batch from the seconds a prompt has cost so far (generation and whatever the task does with the replies), to
        what is left of its share: checking only the clock before a full batch let a slow machine's suite run 45 s
        past its cap (a 2-core Xeon: 16 spoken clips, generated and transcribed, took 65 s of an 11 s share).
        ``least``: the seconds of the cheapest batch so far, which a batch costs however few prompts it takes: a
        batch generates until its longest reply ends, so on that Xeon a last TTS batch of 4 took 10.3 s where
        the average predicted 7.7 s, and the suite ran past its cap. The first batch always runs, so every task
        scores something.
        """
        if self.deadline is None:
            return min(self.cfg.batch_size, left)
        if not done:
            return min(self.cfg.batch_size, FIRST_BATCH, left)
        remaining = self.deadline - time.monotonic()
        if remaining < least:
            return 0
        fits = int(remaining / max(seconds_per_prompt, 1e-9))
        return max(0, min(self.cfg.batch_size, left, fits))

    # --- instruments ----------------------------------------------------------------------------
    @property
    def transcriber(self) -> Any:
        """pocketsphinx with a domain LM from the *train* split's texts (never the evaluated ones)."""
        if self._transcriber is None:
            from omnitok.eval.asr import Transcriber

            corpus: list[str] = []
            for s in iter_samples(self.world, "train", "scene", decode=False):
                import json

                meta = json.loads(s["json"])
                corpus += meta["captions"]
                if len(corpus) > 4000:
                    break
            for s in iter_samples(self.world, "train", "spoken_qa", decode=False):
                import json

                meta = json.loads(s["json"])
                corpus += [meta["question"], meta["answer"]]
                if len(corpus) > 6000:
                    break
            self._transcriber = Transcriber(corpus=corpus)
        return self._transcriber

    def _gen(
        self,
        prompts: list[list[Segment]],
        per_prompt: dict[str, list[Any]] | None = None,
        after: Callable[[int, list[list[Segment]]], None] | None = None,
        **opts: Any,
    ) -> list[list[Segment]]:
        """Replies for a prefix of ``prompts``: all of them, unless the task's time share ran out first.

        ``per_prompt``: options with one value per prompt (a style, a reference clip), sliced with each batch.
        ``after(first_index, replies)``: the task's work on each batch's replies (transcribing speech), timed with
        the batch so that the share's prediction includes it.
        """
        out: list[list[Segment]] = []
        spent: list[float] = []  # each batch's seconds
        while len(out) < len(prompts):
            each = sum(spent) / max(len(out), 1)
            n = self._batch_size(len(out), each, len(prompts) - len(out), min(spent, default=0.0))
            if n == 0:
                break
            lo, hi = len(out), len(out) + n
            sliced = {k: v[lo:hi] for k, v in (per_prompt or {}).items()}
            t = time.monotonic()
            replies = self.model.generate_batch(
                prompts[lo:hi],
                seed=self.cfg.seed,
                text_cfg_scale=self.cfg.text_cfg_scale,
                **self.cfg.sampling,
                **opts,
                **sliced,
            )
            if after is not None:
                after(lo, replies)
            out += replies
            spent.append(time.monotonic() - t)
        return out

    # --- tasks ------------------------------------------------------------------------------------
    def caption(self) -> dict[str, list[Record]]:
        samples = _take(self.world, "scene", self.cfg.limit)
        outs = self._gen(
            [[Image(pixels=s["png"]), Text(CAPTION_ASK)] for s in samples],
            output="text",
            best_of=self.cfg.caption_best_of,
        )
        recs, graded = [], []
        for s, o in zip(samples, outs, strict=False):  # outs: a prefix if the time share ran out
            text, scene, group = text_of(o), scene_from_json(s["meta"]["scene"]), _group(s["meta"]["heldout_combo"])
            recs.append(Record(group, M.caption_correct(text, scene), {"image": s["png"], "output": text}))
            graded.append(Record(group, M.caption_object_f1(text, scene)))
        return {"caption_acc": recs, "caption_object_f1": graded}

    def vqa(self) -> dict[str, list[Record]]:
        """The spoken-QA questions typed: the same test pictures, questions and answer check as ``spoken_qa``, read
        from the text, so a miss here is the reading or the answering, never the ears or the voice."""
        samples = _take(self.world, "spoken_qa", self.cfg.limit)
        outs = self._gen([[Image(pixels=s["png"]), Text(s["meta"]["question"])] for s in samples], output="text")
        recs = []
        for s, o in zip(samples, outs, strict=False):  # outs: a prefix if the time share ran out
            text = text_of(o)
            recs.append(
                Record(
                    _group(s["meta"]["heldout_combo"]),
                    M.answer_correct(text, s["meta"]["answer"]),
                    {"image": s["png"], "input": s["meta"]["question"], "output": text},
                )
            )
        return {"vqa_acc": recs}

    def t2i(self) -> dict[str, list[Record]]:
        samples = _take(self.world, "scene", self.cfg.limit)
        captions = [s["meta"]["captions"][0] for s in samples]
        outs = self._gen(
            [[Text(c)] for c in captions], output="image", cfg_scale=self.cfg.cfg_scale, best_of=self.cfg.t2i_best_of
        )
        recs, graded = [], []
        for s, c, o in zip(samples, captions, outs, strict=False):  # outs: a prefix if the time share ran out
            img = _first(o, Image)
            pixels = None if img is None else img.pixels
            scene, group = scene_from_json(s["meta"]["scene"]), _group(s["meta"]["heldout_combo"])
            ok = pixels is not None and M.image_correct(pixels, scene)
            recs.append(Record(group, ok, {"input": c, "image": pixels}))
            graded.append(Record(group, 0.0 if pixels is None else M.image_object_f1(pixels, scene)))
        return {"t2i_acc": recs, "t2i_object_f1": graded}

    def asr(self) -> dict[str, list[Record]]:
        samples = _take(self.world, "scene", self.cfg.limit, need="wav")
        prompts = [[Audio(samples=s["wav"], sample_rate=16000), Text("Transcribe the speech.")] for s in samples]
        outs = self._gen(prompts, output="text")
        recs = []
        for s, o in zip(samples, outs, strict=False):  # outs: a prefix if the time share ran out
            sp = s["meta"]["speech"]
            recs.append(
                Record(_group(sp["heldout_voice"]), (sp["text"], text_of(o)), {"audio": s["wav"], "output": text_of(o)})
            )
        return {"asr_wer": recs}

    def tts(self) -> dict[str, list[Record]]:
        from omnitok.eval import style as style_eval

        samples = _take(self.world, "scene", self.cfg.limit, need="wav")
        wer_recs, ref_recs, style_recs = [], [], []
        # Every clip is classified with its text, against that sentence's own references: the voices' centroids are
        # only a fallback, fitted if ever needed.
        reference = style_eval.StyleReference.fit([s["meta"]["speech"]["text"] for s in samples[:4]], lazy=True)
        styles = [{k: s["meta"]["speech"][k] for k in ("voice", "pitch", "rate")} for s in samples]
        # Held-out voices have no trained voice token: the LM gets pitch and rate only, and the decoder hears the
        # voice from a reference clip of that speaker (another test sample, so the content is not leaked).
        references = self._voice_references(samples)
        lm_styles, refs = [], []
        for s, st in zip(samples, styles, strict=True):
            if s["meta"]["speech"]["heldout_voice"]:
                lm_styles.append({"pitch": st["pitch"], "rate": st["rate"]})
                refs.append(references[s["key"]])
            else:
                lm_styles.append(st)
                refs.append(None)
        prompts = [[Text("Say this: " + s["meta"]["speech"]["text"])] for s in samples]
        # The instrument's one-off start (its domain language model from the train split: ~4.6 s on a 2-core Xeon)
        # is paid before the timed batches: inside the first, it made a prompt look that much dearer, and spoken QA,
        # the first task to hear, stopped after 4 of 30.
        transcriber = self.transcriber
        wavs: list[np.ndarray] = []
        heard_by: dict[int, str] = {}
        ref_heard: list[str] = []
        measured: list[dict[str, str | None]] = []

        def hear(lo: int, replies: list[list[Segment]]) -> None:
            """A batch's clips and eSpeak's own for the same texts, heard in one parallel pass, and their style
            measured: both inside the batch's timing, so that the task's share predicts them."""
            for o in replies:
                audio = _first(o, Audio)
                ok = audio is not None and audio.samples is not None
                wavs.append(audio.samples if ok else np.zeros(1600, np.float32))  # type: ignore[union-attr]
            spoken = [i for i in range(lo, len(wavs)) if len(wavs[i]) > 160]
            refs_wav = [s["wav"] for s in samples[lo : lo + len(replies)]]
            heard = transcriber.transcribe_many([wavs[i] for i in spoken] + refs_wav, 16000)
            heard_by.update(zip(spoken, heard[: len(spoken)], strict=True))
            ref_heard.extend(heard[len(spoken) :])
            for k in range(lo, len(wavs)):
                voice, text = styles[k]["voice"], samples[k]["meta"]["speech"]["text"]
                got: dict[str, str | None] = {}
                if len(wavs[k]) > 1600:
                    got = {
                        "pitch": reference.classify_pitch(wavs[k], 16000, voice, text),
                        "rate": reference.classify_rate(wavs[k], 16000, voice, text),
                    }
                measured.append(got)

        self._gen(
            prompts, {"style": lm_styles, "reference": refs}, after=hear, output="speech", best_of=self.cfg.tts_best_of
        )
        for k, (s, style, wav, got) in enumerate(zip(samples, styles, wavs, measured, strict=False)):
            sp = s["meta"]["speech"]
            heard = heard_by.get(k, "")
            g = _group(sp["heldout_voice"])
            wer_recs.append(Record(g, (sp["text"], heard), {"input": sp["text"], "audio": wav, "output": heard}))
            ref_recs.append(Record(g, (sp["text"], ref_heard[k])))
            ok = got.get("pitch") == style["pitch"] and got.get("rate") == style["rate"]
            style_recs.append(Record(g, ok, {"style": style, "measured": got}))
        return {"tts_wer": wer_recs, "tts_wer_ref": ref_recs, "tts_style_acc": style_recs}

    def _voice_references(self, samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """For each held-out-voice sample: another test clip of its speaker, at mid pitch where the split has one.

        Why mid: the speech decoder takes an unseen voice's F0 from its reference and assumes that is the speaker's
        mid pitch (``SpeechTokenizer.resolve_style``). A reference spoken high or low shifted every requested pitch
        by a class: 14 of 15 held-out style errors of one run (docs/BENCHMARKS.md, "Held-out voices"). Clips of the
        evaluated samples are preferred, then the rest of the test split is searched; any other clip is the fallback.
        """

        def rank(o: dict[str, Any]) -> int:  # mid pitch first, then normal rate
            sp = o["meta"]["speech"]
            return (sp["pitch"] != "mid") * 2 + (sp["rate"] != "normal")

        needed = [s for s in samples if s["meta"]["speech"]["heldout_voice"]]
        pool: dict[str, list[dict[str, Any]]] = {}
        for s in samples:
            pool.setdefault(s["meta"]["speech"]["voice"], []).append(s)

        def missing() -> set[str]:
            return {
                s["meta"]["speech"]["voice"]
                for s in needed
                if not any(rank(o) < 2 and o["key"] != s["key"] for o in pool[s["meta"]["speech"]["voice"]])
            }

        want = missing()
        if want:
            seen = {s["key"] for s in samples}
            for o in iter_samples(self.world, "test", "scene"):
                v = o.get("meta", {}).get("speech", {}).get("voice")
                if v in want and "wav" in o and o["key"] not in seen and o["meta"]["speech"]["pitch"] == "mid":
                    pool[v].append(o)
                    want = missing()
                    if not want:
                        break
        out = {}
        for s in needed:
            others = [o for o in pool[s["meta"]["speech"]["voice"]] if o["key"] != s["key"]] or [s]
            out[s["key"]] = min(others, key=rank)["wav"]
        return out

    def video_caption(self) -> dict[str, list[Record]]:
        samples = _take(self.world, "video", self.cfg.limit)
        prompts = []
        for s in samples:
            n = int(s["meta"]["n_frames"])
            w = s["video.png"].shape[1] // n
            frames = [s["video.png"][:, i * w : (i + 1) * w] for i in range(n)]
            prompts.append([Video(pixels=frames), Text("What happens in the video?")])
        outs = self._gen(prompts, output="text")
        recs = []
        for s, o in zip(samples, outs, strict=False):  # outs: a prefix if the time share ran out
            text = text_of(o)
            recs.append(
                Record(
                    _group(s["meta"]["heldout_combo"]),
                    M.event_correct(text, s["meta"]["event"]),
                    {"image": s["video.png"], "output": text},
                )
            )
        return {"video_caption_acc": recs}

    def edit(self) -> dict[str, list[Record]]:
        samples = _take(self.world, "edit", self.cfg.limit)
        prompts = [[Image(pixels=s["png"]), Text(s["meta"]["instruction"])] for s in samples]
        outs = self._gen(prompts, output="image", cfg_scale=1.0)
        recs = []
        for s, o in zip(samples, outs, strict=False):  # outs: a prefix if the time share ran out
            img = _first(o, Image)
            ok = img is not None and M.image_correct(img.pixels, scene_from_json(s["meta"]["edited_scene"]))
            recs.append(
                Record(
                    _group(s["meta"]["heldout_combo"]),
                    ok,
                    {
                        "image": s["png"],
                        "input": s["meta"]["instruction"],
                        "output_image": None if img is None else img.pixels,
                    },
                )
            )
        return {"edit_acc": recs}

    def interleaved(self) -> dict[str, list[Record]]:
        """Continue a construction document: after each step's text, the drawn canvas must match."""
        samples = _take(self.world, "construction", self.cfg.limit)
        prompts, truths, flags = [], [], []
        for s in samples:
            segs = s["meta"]["segments"]
            scene = scene_from_json(s["meta"]["scene"])
            k = len(segs) // 2 - 1  # the last step: its text, then the image to draw
            doc: list[Segment] = []
            for seg in segs[: 2 * k + 1]:
                doc.append(Text(seg["text"]) if seg["type"] == "text" else Image(pixels=s[seg["file"]]))
            prompts.append(doc)
            truths.append(scene[:k])
            flags.append(s["meta"]["heldout_combo"])
        outs = self._gen(prompts, output="image", continuation=True, cfg_scale=1.0)
        recs = []
        for doc, truth, flag, o in zip(prompts, truths, flags, outs, strict=False):  # outs may be a prefix
            img = _first(o, Image)
            ok = img is not None and M.image_correct(img.pixels, truth)
            recs.append(Record(_group(flag), ok, {"input": doc[-1].text, "image": None if img is None else img.pixels}))
        return {"interleaved_acc": recs}

    def spoken_qa(self) -> dict[str, list[Record]]:
        samples = [s for s in _take(self.world, "spoken_qa", self.cfg.limit) if "question.wav" in s]
        prompts = [[Image(pixels=s["png"]), Audio(samples=s["question.wav"], sample_rate=16000)] for s in samples]
        audios: list[Audio | None] = []
        heard_by: dict[int, str] = {}
        transcriber = self.transcriber  # started before the timed batches (see tts)

        def hear(lo: int, replies: list[list[Segment]]) -> None:
            audios.extend(_first(o, Audio) for o in replies)
            spoken = [i for i in range(lo, len(audios)) if _has_speech(audios[i])]
            texts = transcriber.transcribe_many([audios[i].samples for i in spoken], 16000)  # type: ignore[union-attr]
            heard_by.update(zip(spoken, texts, strict=True))

        outs = self._gen(prompts, after=hear, output="text+speech", style=None, best_of=self.cfg.spoken_qa_best_of)
        recs = []
        for k, (s, o, audio) in enumerate(zip(samples, outs, audios, strict=False)):  # outs: a prefix if time ran out
            heard = heard_by.get(k, "")
            ok = M.answer_correct(heard, s["meta"]["answer"])
            flag = s["meta"]["heldout_combo"] or s["meta"]["question_speech"]["heldout_voice"]
            recs.append(
                Record(
                    _group(flag),
                    ok,
                    {
                        "image": s["png"],
                        "input": s["meta"]["question"],
                        "output": text_of(o),
                        "heard": heard,
                        "audio": None if audio is None else audio.samples,
                    },
                )
            )
        return {"spoken_qa_acc": recs}


def _has_speech(audio: Audio | None) -> bool:
    return audio is not None and audio.samples is not None and len(audio.samples) > 160


def _summarise(name: str, recs: list[Record]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": {}}
    for group in ("all", "seen", "heldout"):
        sel = [r for r in recs if group == "all" or r.group == group]
        out["n"][group] = len(sel)
        if not sel:
            out[group] = None
        elif name.endswith("_wer") or name == "tts_wer_ref":
            from omnitok.eval.asr import wer

            out[group] = wer([r.score[0] for r in sel], [r.score[1] for r in sel])
        elif name.endswith("_f1"):
            out[group] = float(np.mean([r.score for r in sel]))
        else:
            out[group] = M.rate([bool(r.score) for r in sel])
    return out


def evaluate(
    model: Any,
    world: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: EvalConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    cfg = cfg or EvalConfig()
    world = Path(world)
    wm = load_manifest(world)
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise OmnitokError(f"--tasks: unknown task(s) {unknown}; known: {list(TASKS)}")
    for name in ("limit", "t2i_best_of", "caption_best_of", "tts_best_of", "spoken_qa_best_of"):
        value = getattr(cfg, name)
        if not is_int(value) or value < 1:
            raise OmnitokError(f"{name} (--{name.replace('_', '-')}) must be an int >= 1, got {value!r}")
    bad = {k: v for k, v in cfg.sampling.items() if k not in SAMPLED_MODALITIES or not isinstance(v, Sampling)}
    if bad:
        raise OmnitokError(f"eval sampling: expected {{modality: Sampling}} for {list(SAMPLED_MODALITIES)}, got {bad}")
    out_dir = ensure_writable_dir(out, "eval output directory")  # after the checks: a refused run leaves no folder
    tasks = [t for t in cfg.tasks if t not in SPEECH_TASKS or model.bundle.speech is not None]
    tasks = [t for t in tasks if t not in SPEECH_TASKS or wm["config"].get("speech", True)]
    write_run_config(out_dir, "omnitok eval", {**asdict(cfg), "world": str(world), "tasks_run": tasks})
    suite = Suite(model, world, cfg)
    records: dict[str, list[Record]] = {}
    end = None if cfg.max_minutes is None else time.monotonic() + 60 * cfg.max_minutes
    t0 = time.monotonic()
    seconds: dict[str, float] = {}
    for k, task in enumerate(tasks):
        if progress:
            progress(task)
        start = time.monotonic()
        if end is not None:
            suite.deadline = start + max(0.0, end - start) / (len(tasks) - k)
        records.update(getattr(suite, task)())
        seconds[task] = round(time.monotonic() - start, 1)
    metrics = {name: _summarise(name, recs) for name, recs in records.items()}
    metrics["_meta"] = {
        "world": str(world),
        "split": "test",
        "limit": cfg.limit,
        "skipped": sorted(set(cfg.tasks) - set(tasks)),
        "max_minutes": cfg.max_minutes,
        "text_cfg_scale": cfg.text_cfg_scale,
        "seconds": round(time.monotonic() - t0, 1),
        "task_seconds": seconds,  # where a time-boxed run's minutes went (instruments included)
    }
    atomic_write_json(out_dir / "metrics.json", metrics)
    from omnitok.eval.report import write_report

    write_report(out_dir / "report.html", metrics, records, cfg.examples_in_report)
    return metrics
