"""``omnitok demo``: the whole pipeline on the embedded toy world, within a time budget.

    world -> image tokenizer -> speech tokenizer -> pretokenize -> LM through the four stages -> bundle -> eval

Every step writes into ``OUT/<step>/`` and is skipped when its result is already there, so an interrupted demo
continues where it stopped. The tokenizer trainings, pretokenization and the LM's training each run in a fresh
process: a step returns its memory to the system when it ends, and the LM trains (and measures the speed its
steps are planned with) in a clean heap, not in the 1.5 GB fragmented one the speech tokenizer's training leaves
behind, which slowed it by 15-25 % on CPU-2 (docs/BENCHMARKS.md).

The budget (``--minutes``) caps the tokenizers and the evaluation at fixed shares; the LM gets what the steps
before it left (less a box for the evaluation, sized by the LM's speed), and its step counts come from
``recipes/toyworld.yaml`` (``toyworld_small.yaml`` where the budget buys that one too little training) scaled to
the time its stages get, at the speed its own steps train at, re-planned at each stage's end
(``omnitok.train.budget``). The same code with a larger budget (or ``--recipe recipes/toyworld_gpu.yaml --device
cuda``) is the "longer run".
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from omnitok.errors import OmnitokError, is_number
from omnitok.io import atomic_write_json, ensure_writable_dir, read_json, write_run_config

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "toyworld.yaml"
# The LM's width follows the training the budget buys, as the world's size does (below): where the recipe's model
# would train fewer than SMALL_BELOW positions, the demo trains SMALL_RECIPE's, half as wide (128: 1.1 M parameters
# against 3.8 M). On an AMD EPYC Zen 3 (no AVX-512, so float32; the probe read 0.8-1.2 M positions for 15 minutes)
# it trained 2.6x the positions per second and ended lower on every task's held-out loss in the same seconds, in two
# seeds; the demo there took 869 LM steps instead of 420, ASR's test WER 0.53 against 0.63 (BENCHMARKS "A narrower
# LM where the budget is small"). On a Zen 4 (bf16) it won as clearly where the recipe's model trained 1.9-2.1 M
# positions (two seeds: test ASR WER 0.12 / 0.09 against 0.40 / 0.44), and by less at 3.6 and 4.3 M (mean held-out
# loss -0.07 / -0.05; probes there would have read ~2.9 / ~3.5 M), so the threshold is 3 M. Above it (the Zen 5 and
# Xeon-AMX probes read 3.2 M or more) the recipe's width stays: the lead shrinks with the positions and was not
# measured on those machines (BENCHMARKS "The narrower LM on a Zen 4 too").
SMALL_RECIPE = RECIPE.with_name("toyworld_small.yaml")
SMALL_BELOW = 3.0e6

# The LM predicts every image code through its softmax, so the demo's image codebook is small: 8*5*5*5 = 1,000
# codes (vocabulary 2,602) rather than the tokenizer's 64k default. Against 4,096 codes at the demo's budget the LM
# trains 1.3x the positions per second and reads images a little better per position, for a lower reconstruction
# ceiling (92.5 % of test scenes exact vs 97.5 %); 240 codes cost more (86.5 %) for no more speed (BENCHMARKS).
IMAGE_LEVELS = (8, 5, 5, 5)

# Caps on the budget's shares for the steps that can stop early: the tokenizers train at most this long, the
# evaluation scores what fits in its share. The world build and pretokenization are fixed-size work (1.1-1.5 min
# for 2,000 scenes on the AMD EPYC) and take what they take. The LM gets the rest: whatever the steps before it left,
# less the evaluation's share and a margin (it keeps to its seconds within ~2 %, re-planning at each stage's end), or
# less than those where its own speed says the evaluation will need less (EVAL_SUITE_S below).
# So a tokenizer that finishes its steps early (the image tokenizer, ~40 s inside its share here) or a faster
# machine gives the LM more time, and a slow step before it gives it less, never the budget more.
# The speech tokenizer's 16 % was measured against 8 % and 24 % on Zen 4, the LM given the difference: half the box
# doubles the codec's phone error for ~6 % more LM steps, half again as much costs the LM 18 % of its steps; both
# left ASR and TTS worse (BENCHMARKS "The speech tokenizer's share").
SHARES = {"image_tokenizer": 0.16, "speech_tokenizer": 0.16, "eval": 0.08}
# Where the small recipe is chosen (the LM short of positions) each tokenizer's box is halved, the 144 s going to the
# LM. On a Zen 3 the image tokenizer trained 760 steps in 8 % against 1,401 in 16 % (test scenes read back exactly
# 75.5 % against 84.5 %), the speech tokenizer 241 against 408 (phone error 0.339 against 0.206), and the LM given the
# seconds ended lower on the held-out loss of every task with text targets: their mean 0.604 / 0.616 in two seeds
# against 0.711 / 0.717 with both boxes whole (0.651-0.710 with the image box alone halved), ASR's test WER 0.431 /
# 0.497 against 0.538 / 0.557, TTS's 0.69 in both against 0.69-0.70 (BENCHMARKS "The tokenizers' boxes where the LM
# is short of steps"). Image writing scored 0 in every arm. On the Zen 4, where the LM trains ~3x the positions, half
# the speech box was worse for speech, and there both boxes stay.
# The speech tokenizer keeps its whole box where the small model is chosen but its own estimate is not short (at
# least SMALL_BELOW positions: a Zen 4 read 3.5-5.4 M): there TTS is heard through a codec the box left a quarter
# trained (~280 of 1,200 steps, phone error 0.31), and on the same world, image tokenizer and LM recipe two 16 % codecs
# (530-570 steps, phone error 0.14-0.15) spoke at test WER 0.17 / 0.14 with n=100 (eSpeak's own clips 0.15) where
# 8 % ones spoke at 0.22-0.29, the LM given 12 % fewer steps for it; whole demos 0.125 / 0.145 against 0.301 in the
# same hour, ASR 0.01-0.03 in all (BENCHMARKS "The speech tokenizer's whole box where the small LM is not short of
# steps").
SMALL_TOKENIZER_SHARE = 0.08
MARGIN_S = 60.0
# The evaluation then gets what is left of the budget, less EVAL_TAIL_S for what its box does not hold: importing the
# evaluation, loading the bundle, the last batch's overrun of the box, writing the report. On a 2-core Xeon without
# AVX512-BF16 the fixed share (72 s of 15 min) ended the demo at 15 min 9 s; where the suite needs less it stops at its
# limit. The tail measured 7-10 s on that Xeon (demo21-23) and 1.6-5.6 s on a Zen 5 on two cores and pinned to one
# (benchmarks/eval_tail.py); 15 s keeps the slowest with room, and the 10 s of the 25 s kept before go to the LM.
EVAL_TAIL_S = 15.0
# What the evaluation needs (30 examples a task) follows the machine's speed as the LM's training does: the step took
# 68 s (the suite 65) at 4,140 positions/s (Zen 4), 54 s at ~5,300 (Zen 4), 41 s at ~6,900 (Xeon-AMX), 35 s at
# ~10,500 (Zen 5), and more than its ~100 s box at ~1,900 (Xeon-2.0: TTS cut short). So the LM keeps back for the
# suite EVAL_HEADROOM times 10 s + 228,000 positions' worth of its slowest measured speed (a fit through the suite's
# seconds: 65, 53, 43, 32 s at those speeds), plus LM_SLACK_S for the LM ending late, never more than the share and
# margin above: with those alone the faster machines' demos ended 70-90 s inside the budget, most of the box unused.
# The fit is per recipe, in positions of that recipe's model, made on the machines that train it in the demo: most of
# the suite is not the LM (on a Zen 3 its forward passes were 11-23 s of 63-83 s; pocketsphinx, the codecs and the
# style instrument the rest, the same for either model: benchmarks/eval_cost.py), and the machines that choose
# SMALL_RECIPE are those whose matrix units are slow, not their scalar code. There RECIPE's fit at RECIPE's speed
# asked ~150 s, the cap, while four Zen 3 suites took 64-89 s: the small recipe's fit is 10 s + 267,000 positions of
# its model (least squares through those four at their runs' slowest speeds, 5,269-6,349 positions/s, less the 15 s
# the automaton's replay of each prompt in plain Python took off a Zen 3 suite since: 352,000 before). RECIPE's fit
# predates that too, and is kept, unmeasured since, on the machines it was made on (a box a little long). A recipe
# without a fit of its own (--recipe) is boxed by RECIPE's at its own model's speed; SMALL_RECIPE named with --recipe
# on a machine with bf16 matrix units gets a box its fit was not made for, likely short: its suite then scores fewer
# TTS clips, and the budget holds.
EVAL_SUITE_S = {  # recipe file -> (fixed seconds, positions of its model's training the suite takes as long as)
    RECIPE.name: (10.0, 228_000.0),
    SMALL_RECIPE.name: (10.0, 267_000.0),
}
EVAL_HEADROOM = 1.2
LM_SLACK_S = 10.0

# The world's size, when --n is not given, follows how much the LM will train: a world the LM sees many times over
# is learnt by heart, one it sees about once leaves the LM short of repetitions. 2,000 scenes pretokenize to 1.29 M
# tokens (~645 a scene). Measured at the demo's budget, a 4,000-scene world against 2,000 with the time its larger
# build and pretokenization cost taken from the LM (BENCHMARKS "The world the LM wants"): at 2.3 M positions of LM
# training it did worse (the 2,000 seen 1.9 times), at 3.0 M a little better (mean held-out loss -0.06; ASR's worse),
# at 5.3 M much better (-0.20; ASR WER 0.02 against 0.09; the 2,000 seen 4.3 times). So the world doubles from 2,000
# while the LM's estimated positions cover the doubled world at least POSITIONS_PER_SCENE times a scene (~1.4 passes),
# the estimate being a short timed probe of the LM (omnitok.train.budget.probe_speed) times the seconds the budget
# leaves it; it read 3.1-3.3 M on the machine where the measured 3.0 M was a wash, so that one keeps 2,000. The 30-
# and 60-minute runs' hand-picked 4,000 and 8,000 come out of the same rule. Beyond 8,000 the world's build and
# pretokenization would eat into a CPU's LM share; a GPU run that wants more (BENCHMARKS "The GPU recipe on an
# H200") passes --n.
WORLD_SIZES = (2000, 4000, 8000)
POSITIONS_PER_SCENE = 900.0
# What the probe trains on: the demo's vocabulary and its align stage's document lengths (tokens; 0.6-1.4x the
# means of a demo's token shards: caption 94, t2i 93, asr 160, tts 162, text 63, vqa 85).
PROBE_VOCAB = 2602
PROBE_LENGTHS = {
    "caption": (56, 132),
    "t2i": (56, 130),
    "asr": (96, 224),
    "tts": (97, 227),
    "text": (38, 88),
    "interleaved": (142, 332),
    "video_caption": (248, 578),
    "spoken_qa": (97, 226),
    "vqa": (51, 119),
    "edit": (87, 204),
    "caption_filter": (62, 146),
}
# World build and pretokenization of 2,000 scenes (35-60 s on the faster machines, ~150 s on Xeon-2.0): what the
# LM's estimate leaves for them.
FIXED_STEPS_S = 60.0


@dataclass(frozen=True)
class DemoConfig:
    minutes: float = 15.0
    n: int | None = None  # scene samples in the world; None: sized to the LM's estimated training (world_size_for)
    seed: int = 0
    eval_limit: int = 30
    device: str = "cpu"
    # Training positions/s that scale the LM's steps to its share of the budget, planned once; None: the speed
    # of the run's own steps, re-planned at each stage's end.
    lm_tokens_per_s: float | None = None
    # The LM recipe whose stages are scaled to the budget; None: RECIPE, or SMALL_RECIPE where the budget buys
    # RECIPE's model fewer than SMALL_BELOW positions (choose_recipe).
    recipe: str | None = None
    # Minutes for the evaluation instead of its share of the budget: on a GPU the LM trains many times faster but
    # the evaluation's instruments (pocketsphinx, the tokenizers' decoders) run on the CPU as before, so a short
    # budget's 8 % would score only part of each task.
    eval_minutes: float | None = None
    # Unix time the budget counts from (None: when run_demo starts); `make demo` passes the time it started, so that
    # creating .venv on a fresh machine is paid from the budget and the whole job keeps to it.
    started_at: float | None = None
    # Each tokenizer's share of the budget; None: SHARES's, or SMALL_TOKENIZER_SHARE where the demo chooses
    # SMALL_RECIPE (_recipe_step).
    tokenizer_share: float | None = None
    # The speech tokenizer's share where it differs from tokenizer_share: SHARES's where the small model is chosen
    # but not short of positions (_recipe_step).
    speech_tokenizer_share: float | None = None

    def budget(self, step: str) -> float:
        if step == "eval" and self.eval_minutes is not None:
            return self.eval_minutes
        if step == "speech_tokenizer" and self.speech_tokenizer_share is not None:
            return self.minutes * self.speech_tokenizer_share
        if step.endswith("_tokenizer") and self.tokenizer_share is not None:
            return self.minutes * self.tokenizer_share
        return self.minutes * SHARES[step]

    def eval_reserve(self, speed: float) -> float:
        """Seconds the LM keeps back for the evaluation's box, the LM (``self.recipe``'s) training at ``speed``
        positions/s.

        Counted after ``EVAL_TAIL_S``: the share and margin less the tail when the evaluation's minutes are given
        or its estimated need is larger (a slow machine), less on a machine where the suite needs less. The need is
        read from the recipe's own fit in ``EVAL_SUITE_S``, else from ``RECIPE``'s.
        """
        cap = self.budget("eval") * 60 + MARGIN_S - EVAL_TAIL_S
        if self.eval_minutes is not None:
            return cap
        fixed, work = EVAL_SUITE_S.get(Path(self.recipe or RECIPE).name, EVAL_SUITE_S[RECIPE.name])
        return min(cap, LM_SLACK_S + EVAL_HEADROOM * (fixed + work / speed))

    def lm_seconds_estimate(self) -> float:
        """Seconds the LM will get, as far as they are known before anything ran: the budget less every cap.

        A floor more than a forecast: a tokenizer that finishes early, or an evaluation the LM's speed says needs
        less than its cap (``eval_reserve``), gives the LM more (20-60 s of 15 minutes on the machines measured).
        ``POSITIONS_PER_SCENE`` was set against this floor, so the two stay as they are measured together.
        """
        caps = self.budget("image_tokenizer") + self.budget("speech_tokenizer") + self.budget("eval")
        return max(0.0, (self.minutes - caps) * 60 - MARGIN_S - FIXED_STEPS_S)


def world_size_for(positions: float) -> int:
    """The demo world's scenes for an LM that trains ``positions``: the largest of ``WORLD_SIZES`` it covers
    ``POSITIONS_PER_SCENE`` times, at least the smallest."""
    fits = [n for n in WORLD_SIZES if n * POSITIONS_PER_SCENE <= positions]
    return fits[-1] if fits else WORLD_SIZES[0]


def _probe(recipe: str | Path, device: str) -> float:
    """The LM's training speed (positions/s) for ``recipe``'s model, probed in this process on the cores free now
    (8 steps: ~2.5 s at 7,500 positions/s, ~7 s at 1,900)."""
    from omnitok.threads import free_cores
    from omnitok.train.budget import probe_speed
    from omnitok.train.recipe import load_recipe

    with free_cores():
        return probe_speed(replace(load_recipe(recipe), device=device), vocab_size=PROBE_VOCAB, lengths=PROBE_LENGTHS)


def _estimate(cfg: DemoConfig, speed: float, spent: float, speed_from: str) -> dict[str, Any]:
    seconds = max(0.0, cfg.lm_seconds_estimate() - spent)  # less what went before the demo started
    return {
        "lm_positions_per_s": round(speed, 1),
        "speed_from": speed_from,
        "lm_seconds_estimate": seconds,
        "lm_positions_estimate": round(speed * seconds),
    }


def choose_recipe(cfg: DemoConfig, spent: float = 0.0) -> tuple[str, dict[str, Any]]:
    """``(recipe, why)``: ``RECIPE``, or ``SMALL_RECIPE`` where a probe says the budget buys ``RECIPE``'s model
    fewer than ``SMALL_BELOW`` positions on this machine.

    Only for a demo without ``--recipe``. A speed given with ``--lm-tokens-per-s`` is the recipe's, so it keeps
    ``RECIPE`` without a probe. ``why`` holds the probe's estimate for ``RECIPE`` and, where the small model is
    chosen, its own probe's (``chosen``): the world's size is then read from the model that will train.
    """
    if cfg.lm_tokens_per_s is not None:
        return str(RECIPE), {
            "recipe": str(RECIPE),
            "chosen": _estimate(cfg, cfg.lm_tokens_per_s, spent, "--lm-tokens-per-s"),
        }
    full = _estimate(cfg, _probe(RECIPE, cfg.device), spent, "probe")
    why: dict[str, Any] = {"recipe": str(RECIPE), "small_below": SMALL_BELOW, RECIPE.name: full, "chosen": full}
    if full["lm_positions_estimate"] < SMALL_BELOW:
        why["recipe"] = str(SMALL_RECIPE)
        why["chosen"] = why[SMALL_RECIPE.name] = _estimate(cfg, _probe(SMALL_RECIPE, cfg.device), spent, "probe")
    return why["recipe"], why


def choose_world_size(
    cfg: DemoConfig, spent: float = 0.0, estimate: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """``(scenes, why)``: the world size for ``cfg``'s budget on this machine, from the LM's speed.

    ``estimate``: the LM's where it is known (``choose_recipe``'s for the model it chose); else from the speed given
    with ``--lm-tokens-per-s``, else from a probe of ``cfg.recipe``'s model. ``spent``: seconds of the budget gone
    before the demo started (``make demo`` installing), which the LM will not get. ``why`` holds the speed and the
    positions it implies, written into the demo's config.
    """
    if estimate is not None:
        why = estimate
    elif cfg.lm_tokens_per_s is not None:
        why = _estimate(cfg, cfg.lm_tokens_per_s, spent, "--lm-tokens-per-s")
    else:
        why = _estimate(cfg, _probe(cfg.recipe or RECIPE, cfg.device), spent, "probe")
    return world_size_for(why["lm_positions_estimate"]), why


def _done(path: Path) -> bool:
    return path.exists()


def _on_free_cores(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from omnitok.threads import free_cores

    with free_cores():
        return fn(*args, **kwargs)


def in_fresh_process(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a new (spawned) Python process; its result or exception comes back here.

    Why: a long PyTorch step leaves the allocator's heap fragmented and large after it ends, and the next step in
    the same process runs slower in it; a fresh process per step starts each one clean and gives the memory back.
    ``fn`` and its arguments must be picklable (module-level functions, dataclass configs, paths). It runs on the
    cores free as it starts (``omnitok.threads.free_cores``).
    """
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            return pool.submit(_on_free_cores, fn, *args, **kwargs).result()
    except BrokenProcessPool as e:
        name = getattr(fn, "__qualname__", repr(fn))
        raise OmnitokError(
            f"{name} ran in a fresh process that ended abruptly: killed (out of memory?), or "
            "started from a __main__ that a spawned process cannot import (python -, some notebooks): run "
            "`omnitok demo` or call it from a script file. The steps finished before it are kept; rerun to continue."
        ) from e


def run_demo(out: str | os.PathLike[str], cfg: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """Run (or finish) the demo in ``out``; returns the evaluation metrics."""
    console = console or Console()
    if cfg.minutes < 3:
        raise OmnitokError(f"--minutes must be at least 3 (the world and tokenizers need that), got {cfg.minutes}")
    if cfg.eval_minutes is not None and not 0 < cfg.eval_minutes < cfg.minutes:
        raise OmnitokError(
            f"--eval-minutes must be above 0 and below --minutes ({cfg.minutes}), got {cfg.eval_minutes}"
        )
    for name in ("tokenizer_share", "speech_tokenizer_share"):
        share = getattr(cfg, name)
        if share is not None and not (is_number(share) and 0 < share < 0.5):
            raise OmnitokError(f"{name} must be a fraction of the budget in (0, 0.5) (two boxes), got {share}")
    if cfg.lm_tokens_per_s is not None and not (is_number(cfg.lm_tokens_per_s) and cfg.lm_tokens_per_s > 0):
        raise OmnitokError(f"--lm-tokens-per-s must be a number > 0, got {cfg.lm_tokens_per_s}")
    if cfg.n is not None:
        from omnitok.world.build import WorldConfig

        WorldConfig(n=cfg.n, seed=cfg.seed).validate()
    if not Path(cfg.recipe or RECIPE).is_file():
        raise OmnitokError(
            f"recipe {cfg.recipe or RECIPE} not found: run the demo from an omnitok checkout or pass --recipe"
        )
    spent = 0.0 if cfg.started_at is None else time.time() - cfg.started_at
    if not 0.0 <= spent < cfg.minutes * 60:
        raise OmnitokError(
            f"--started-at {cfg.started_at}: the budget of {cfg.minutes} minutes would have started {spent:.0f} s "
            "ago; expected a time in the budget's past (make demo passes the time it started)"
        )
    out = ensure_writable_dir(out, "demo output directory")
    write_run_config(out, "omnitok demo", cfg.__dict__)
    t0 = time.perf_counter() - spent
    timings: dict[str, float] = {}
    if spent >= 1:  # installing .venv, under make demo
        timings["before the demo"] = round(spent, 1)
        console.print(f"{spent:.0f} s of the {cfg.minutes:g}-minute budget went before the demo started")

    def step(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 1)
        console.print(f"[green]✓[/] {name} ({timings[name]:.0f} s)")

    # 1. world (its size chosen first when --n is not given; a resumed demo keeps the world it built), and the LM's
    # recipe where --recipe is not given: both follow the LM training the budget buys on this machine
    world = out / "world"
    cfg, lm_recipe = _recipe_step(out / "lm_recipe.json", cfg, console, spent, fresh=not _done(world / "manifest.json"))
    chosen = _world_step(world, out / "world_size.json", cfg, console, spent, lm_recipe.get("chosen"))
    if lm_recipe:
        chosen["lm_recipe"] = lm_recipe
    write_run_config(out, "omnitok demo", {**cfg.__dict__, **chosen})
    step("world")

    # 2. image tokenizer
    image_tok = out / "image_tokenizer"
    if not _done(image_tok / "tokenizer" / "config.json"):
        from omnitok.tokenizers.image import TrainConfig, train_image_tokenizer

        console.rule("image tokenizer")
        train = replace(
            TrainConfig(), max_minutes=cfg.budget("image_tokenizer"), device=cfg.device, arch={"levels": IMAGE_LEVELS}
        )
        in_fresh_process(train_image_tokenizer, world, image_tok, train)
    step("image tokenizer")

    # 3. speech tokenizer
    speech_tok = out / "speech_tokenizer"
    if not _done(speech_tok / "tokenizer" / "config.json"):
        from omnitok.tokenizers.speech_train import SpeechTrainConfig, train_speech_tokenizer

        console.rule("speech tokenizer")
        speech = replace(SpeechTrainConfig(), max_minutes=cfg.budget("speech_tokenizer"), device=cfg.device)
        in_fresh_process(train_speech_tokenizer, world, speech_tok, speech)
    step("speech tokenizer")

    # 4. token shards
    tokens = out / "tokens"
    if not _done(tokens / "manifest.json"):
        from omnitok.data.pretokenize import pretokenize

        console.rule("pretokenize")
        in_fresh_process(pretokenize, world, tokens, image_tok, speech_tok, seed=cfg.seed)
    step("pretokenize")

    # 5. the LM through the curriculum, ending in a bundle
    bundle = out / "bundle"
    if not _done(bundle / "omnitok.json"):
        console.rule("train")
        left = cfg.minutes * 60 - (time.perf_counter() - t0) - EVAL_TAIL_S  # the LM's and the evaluation's box
        in_fresh_process(_train_lm, tokens, out, cfg, left, time.time())
        if bundle.exists():
            shutil.rmtree(bundle)
        os.replace(out / "lm" / "bundle", bundle)
    step("train")

    # 6. evaluation
    metrics_path = out / "eval" / "metrics.json"
    if _done(metrics_path):
        metrics = read_json(metrics_path, "metrics")
    else:
        import omnitok
        from omnitok.eval.suite import EvalConfig, choose_text_cfg_scale, evaluate
        from omnitok.threads import free_cores

        console.rule("evaluate")
        model = omnitok.load(str(bundle), cfg.device)
        with free_cores():
            read_scale, read_scores = choose_text_cfg_scale(model, world)  # on val: a few seconds
        chosen["text_cfg_scale"] = {"scale": read_scale, "val_caption_acc": read_scores}
        if read_scores:
            console.print(f"guidance for reading: {read_scale} (val exact captions by scale: {read_scores})")
        minutes = cfg.eval_minutes
        if minutes is None:
            minutes = max(0.0, cfg.minutes * 60 - (time.perf_counter() - t0) - EVAL_TAIL_S) / 60
        with free_cores(), console.status("evaluating") as status:
            metrics = evaluate(
                model,
                world,
                out / "eval",
                EvalConfig(limit=cfg.eval_limit, seed=cfg.seed, max_minutes=minutes, text_cfg_scale=read_scale),
                progress=lambda t: status.update(f"evaluating {t}"),
            )
    step("eval")
    write_run_config(out, "omnitok demo", {**cfg.__dict__, **chosen, "timings_s": timings})
    return metrics


def _recipe_step(
    path: Path, cfg: DemoConfig, console: Console, spent: float, fresh: bool
) -> tuple[DemoConfig, dict[str, Any]]:
    """``cfg`` with its LM recipe settled, and why (kept in ``path``; empty where ``--recipe`` named it).

    Chosen once, as the demo starts (``fresh``: its world not built yet), and kept for a resumed demo, whose LM
    checkpoints and plan were made for that recipe; a demo begun before this choice existed keeps ``RECIPE``.
    Where the choice is ``SMALL_RECIPE``, each tokenizer's box is ``SMALL_TOKENIZER_SHARE`` of the budget, but the
    speech tokenizer's stays whole where the small model's own estimate reaches ``SMALL_BELOW`` positions.
    """
    if cfg.recipe is not None:
        return cfg, {}
    if path.exists():
        why = read_json(path, "demo LM recipe")
    elif not fresh:
        return replace(cfg, recipe=str(RECIPE)), {}
    else:
        _, why = choose_recipe(cfg, spent)
        atomic_write_json(path, why)
        est = why["chosen"]
        console.print(
            f"LM recipe: {Path(why['recipe']).name} (~{est['lm_positions_estimate'] / 1e6:.1f} M positions in "
            f"~{est['lm_seconds_estimate']:.0f} s at {est['lm_positions_per_s']:,.0f} positions/s, {est['speed_from']})"
        )
    if not Path(why["recipe"]).is_file():
        raise OmnitokError(f"{path}: recipe {why['recipe']} not found; remove {path.parent} to start the demo afresh")
    cfg = replace(cfg, recipe=why["recipe"])
    if why["recipe"] == str(SMALL_RECIPE) and cfg.tokenizer_share is None:
        cfg = replace(cfg, tokenizer_share=SMALL_TOKENIZER_SHARE)  # the LM short of steps: they buy it more
        small = why.get("chosen", {}).get("lm_positions_estimate", 0.0)
        if small >= SMALL_BELOW and cfg.speech_tokenizer_share is None:
            # not short once narrow: TTS gains more from a codec trained twice as long than from the LM's 72 s
            cfg = replace(cfg, speech_tokenizer_share=SHARES["speech_tokenizer"])
    return cfg, why


def _world_step(
    world: Path,
    sizing: Path,
    cfg: DemoConfig,
    console: Console,
    spent: float = 0.0,
    estimate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the demo's world unless it is there; return its size as built (and why, where the demo chose it).

    ``sizing`` keeps why the world has its size when the demo chose it; a world built to ``--n`` removes an earlier
    choice's file, which would no longer explain it. A world already there is kept whatever ``--n`` says now (the
    later steps were made from it), with a note when the two differ.
    """
    if not _done(world / "manifest.json"):
        from omnitok.world.build import WorldConfig
        from omnitok.world.cli import run_build

        console.rule("world")
        n = cfg.n
        if n is None:
            n, why = choose_world_size(cfg, spent, estimate)
            atomic_write_json(sizing, why)
            speed, seconds = why["lm_positions_per_s"], why["lm_seconds_estimate"]
            console.print(
                f"world size: {n:,} scenes for ~{why['lm_positions_estimate'] / 1e6:.1f} M positions of LM training "
                f"(~{seconds:.0f} s at {speed:,.0f} positions/s, {why['speed_from']})"
            )
        elif sizing.exists():
            sizing.unlink()
        run_build(world, WorldConfig(n=n, seed=cfg.seed), workers=None, overwrite=False)
    chosen: dict[str, Any] = {"n": read_json(world / "manifest.json", "world manifest")["config"]["n"]}
    if cfg.n is not None and cfg.n != chosen["n"]:
        console.print(f"note: {world} was built with {chosen['n']:,} scenes; --n {cfg.n} takes a new --out")
    if sizing.exists():
        chosen["world_size"] = read_json(sizing, "demo world size")
    return chosen


def _train_lm(tokens: Path, out: Path, cfg: DemoConfig, seconds: float, since: float | None = None) -> None:
    """Plan the LM's steps for ``seconds`` less the evaluation's box and train them (in a fresh process).

    ``since``: the ``time.time()`` the seconds count from, so that starting this process and importing torch are
    paid from them: ~10 s on a 2-core Xeon, where the LM's step ran 13-22 s over its seconds in three demos. The
    evaluation's box (``DemoConfig.eval_reserve``) is taken at each plan from the slowest speed the LM has trained at,
    by the fit of the recipe trained (``EVAL_SUITE_S``).

    Without ``--lm-tokens-per-s`` the steps follow the speed the run's own steps train at, re-planned at each stage's
    end (``omnitok.train.budget``). The newest plan is kept in ``OUT/lm_plan.json``: a resumed demo trains the steps
    its checkpoints were made for.
    """
    from omnitok.train.budget import train_for_seconds
    from omnitok.train.loop import train

    plan = out / "lm_plan.json"
    recipe = _demo_recipe(tokens, out / "lm", cfg)
    if plan.exists():
        steps = read_json(plan, "demo LM plan").get("steps", [])
        if len(steps) != len(recipe.stages):
            raise OmnitokError(
                f"{plan} plans {len(steps)} stages but recipe {cfg.recipe} has {len(recipe.stages)}: "
                f"use the recipe this demo started with, or remove {plan} and {out / 'lm'} to train the LM afresh"
            )
        train(replace(recipe, stages=[replace(s, steps=n) for s, n in zip(recipe.stages, steps, strict=True)]))
        return

    def keep(planned: Any, speed: float) -> None:
        steps = [s.steps for s in planned.stages]
        atomic_write_json(plan, {"positions_per_s": round(speed, 1), "steps": steps})
        print(f"LM plan: {sum(steps)} steps ({' / '.join(map(str, steps))}) at {speed:,.0f} positions/s")

    # No plan yet: whatever OUT/lm holds is an interrupted calibration (a few dozen steps), timed again.
    shutil.rmtree(out / "lm", ignore_errors=True)
    if since is not None:
        seconds -= time.time() - since
    # The evaluation's box at the slowest speed the LM has trained at so far: the suite runs later, maybe in a slower
    # minute. At the last plan's speed alone (4,989 positions/s, the run's slowest 4,023) runs/demo33's box was 69 s
    # and TTS was scored on 15 clips of 30 (BENCHMARKS "The evaluation's box sized by the LM's speed").
    slowest = [float("inf")]

    def reserve(speed: float) -> float:
        slowest[0] = min(slowest[0], speed)
        return cfg.eval_reserve(slowest[0])

    train_for_seconds(recipe, seconds, speed=cfg.lm_tokens_per_s, on_plan=keep, reserve=reserve)


def _demo_recipe(tokens: Path, out: Path, cfg: DemoConfig) -> Any:
    """The demo's LM recipe (``cfg.recipe``) reading ``tokens`` and writing ``out``, before its steps are planned."""
    from omnitok.train.recipe import ValidationConfig, load_recipe

    recipe = load_recipe(cfg.recipe or RECIPE)
    # Validation once, at the end, on 32 documents a task: ~4 s on the AMD EPYC, ~10 s on a 2-core Xeon without
    # bf16, where one at each stage's end took ~30 s of the LM's ~280 s (BENCHMARKS). The evaluation then says how
    # each task came out; `omnitok train` keeps the per-stage curve.
    validation = ValidationConfig(docs=32, stage_ends=False)
    return replace(recipe, data=tokens, out=out, device=cfg.device, validation=validation)


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Directory for everything the demo writes."),
    minutes: float = typer.Option(15.0, "--minutes", help="Time budget, split across the steps."),
    n: int | None = typer.Option(
        None,
        "--n",
        help="Scene samples in the demo world; default: 2,000, 4,000 or 8,000 by the LM training the budget buys "
        "on this machine (a few seconds' probe of its speed).",
    ),
    seed: int = typer.Option(0, "--seed"),
    eval_limit: int = typer.Option(30, "--eval-limit", help="Test examples per task in the evaluation."),
    device: str = typer.Option("cpu", "--device", help="torch device for tokenizers and the LM (cpu, cuda)."),
    recipe: Path | None = typer.Option(
        None,
        "--recipe",
        help="LM recipe (recipes/toyworld_gpu.yaml for a GPU run); default: recipes/toyworld.yaml, or "
        "toyworld_small.yaml where the budget buys its model fewer than 3 M positions (a few seconds' probe).",
    ),
    eval_minutes: float | None = typer.Option(
        None, "--eval-minutes", help="Minutes for the evaluation; default: 8 % of --minutes."
    ),
    lm_tokens_per_s: float | None = typer.Option(
        None,
        "--lm-tokens-per-s",
        help="Positions/s to plan the LM's steps with, once; default: its own steps' speed, re-planned by stage.",
    ),
    started_at: float | None = typer.Option(
        None,
        "--started-at",
        help="Unix time the budget counts from; default: now. make demo passes its own start, so that installing "
        "on a fresh machine is inside the budget.",
    ),
) -> None:
    """The main job: world -> tokenizers -> LM through four stages -> bundle -> evaluation report."""
    from omnitok.eval.cli import metrics_table

    console = Console()
    cfg = DemoConfig(
        minutes=minutes,
        n=n,
        seed=seed,
        eval_limit=eval_limit,
        device=device,
        recipe=None if recipe is None else str(recipe),
        lm_tokens_per_s=lm_tokens_per_s,
        eval_minutes=eval_minutes,
        started_at=started_at,
    )
    metrics = run_demo(out, cfg, console)
    console.print(metrics_table(metrics))
    console.print(f"bundle: {out / 'bundle'}\nreport: {out / 'eval' / 'report.html'}")
