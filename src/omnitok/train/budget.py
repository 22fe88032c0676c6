"""Fit a recipe's curriculum into a wall-clock budget: time the run's own steps, scale the stages still to come.

A budget in seconds (``omnitok demo --minutes``) has to become step counts before a stage's learning-rate schedule
can be laid out, and the right counts differ by machine, model, batch shape and precision. They also drift within
a run: on a 2-core CPU the same steps trained between 4,840 and 5,720 positions/s from one minute to the next, and
a throwaway copy of the model timed for a few steps read 0.84-1.14x the speed the run then trained at
(docs/BENCHMARKS.md). So the speed comes from the run itself, twice over:

1. its first steps (the first stage's warm-up) are trained for real and timed from the trainer's log, and every
   stage is scaled to the time left at that speed;
2. at the end of each stage, the stages still to come are scaled again to the time left, at the speed that stage
   trained at.

A stage's length is fixed before the stage starts, and the calibration ends inside the first stage's warm-up, where
the learning rate does not depend on the stage's length; every stage therefore runs its own schedule exactly as a
run planned with those steps from the start would (``train(max_steps=...)`` stops at a checkpoint, the next call
continues from it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from omnitok.errors import OmnitokError
from omnitok.train.recipe import Recipe

# The share of the time left that is planned for optimizer steps; validations, checkpoints and the final save
# take the rest.
STEP_SHARE = 0.9


def positions_per_step(recipe: Recipe, stage: int = 0) -> int:
    """Positions one optimizer step of ``recipe.stages[stage]`` trains in this process (a stage may set its batch)."""
    b = recipe.stages[stage].batch(recipe.batch)
    return b.seq_len * b.micro_batch * b.grad_accum


def _positions_between(recipe: Recipe, lo: int, hi: int) -> int:
    """Positions trained by steps ``lo + 1 .. hi`` (global step numbers), each at its own stage's batch."""
    total, start = 0, 0
    for i, stage in enumerate(recipe.stages):
        end = start + stage.steps
        total += max(0, min(hi, end) - max(lo, start)) * positions_per_step(recipe, i)
        start = end
    return total


def calibration_steps(recipe: Recipe) -> int:
    """How many of the run's first steps to time: the first stage's warm-up, and at least two log windows.

    The first log window is not timed (it holds the first steps' kernel builds), so two windows are the least that
    gives a speed. Past the warm-up the learning rate already depends on the stage's planned length, so a
    calibration longer than the warm-up (a recipe logging rarely) makes the run differ very slightly from one
    planned with the measured speed from the start.
    """
    first = recipe.stages[0]
    return max(first.optim(recipe.optim).warmup_steps, 2 * recipe.log.every)


def logged_speed(log: list[dict[str, Any]], recipe: Recipe) -> float | None:
    """Positions/s between the first and the last of one ``train`` call's log records (None: fewer than two)."""
    if len(log) < 2 or log[-1]["elapsed_s"] <= log[0]["elapsed_s"]:
        return None
    positions = _positions_between(recipe, log[0]["step"], log[-1]["step"])
    return positions / (log[-1]["elapsed_s"] - log[0]["elapsed_s"])


def plan_for_speed(recipe: Recipe, seconds: float, speed: float, *, trained: int = 0, from_stage: int = 0) -> Recipe:
    """Scale ``recipe.stages[from_stage:]`` to ``seconds`` more of training at ``speed`` positions/s.

    Stages before ``from_stage`` keep their steps (they are trained). ``trained`` steps overall are done already;
    those inside ``stages[from_stage]`` (a calibration) are kept inside it. The stages scaled keep their
    proportions, and at least 5 steps each; a stage whose batch holds more positions costs its steps more time.
    """
    done_before = sum(s.steps for s in recipe.stages[:from_stage])
    inside = max(0, trained - done_before)
    rest = recipe.stages[from_stage:]
    # Counted in steps of the first stage scaled; the others weigh by their positions per step.
    unit = positions_per_step(recipe, from_stage)
    total = inside + int(STEP_SHARE * max(seconds, 0.0) * speed / unit)
    weight = [positions_per_step(recipe, from_stage + j) / unit for j in range(len(rest))]
    planned = sum(s.steps * w for s, w in zip(rest, weight, strict=True))
    scaled = [replace(s, steps=max(5, round(s.steps * total / planned))) for s in rest]
    if inside:
        scaled[0] = replace(scaled[0], steps=max(scaled[0].steps, inside + 1))
    return replace(recipe, stages=[*recipe.stages[:from_stage], *scaled])


def calibrate(recipe: Recipe, *, progress: bool = True) -> tuple[float, int]:
    """Train the first :func:`calibration_steps` steps of ``recipe`` in ``recipe.out``; return (positions/s, steps).

    The speed is read from the trainer's log between its first and last record of these steps, so it counts
    optimizer steps only: not building the model, loading the data, the first kernel builds or the checkpoint.
    ``recipe.out`` must hold no checkpoints yet: a run that already trained cannot be timed from its start.
    """
    from omnitok.train.loop import train

    n = calibration_steps(recipe)
    if sum(s.steps for s in recipe.stages) <= n:
        raise OmnitokError(
            f"recipe {recipe.name}: {sum(s.steps for s in recipe.stages)} steps in all, but timing the run needs "
            f"more than its first {n} (the first stage's warm-up, at least two log windows)"
        )
    speed = logged_speed(train(recipe, resume=False, progress=progress, max_steps=n)["log"], recipe)
    if speed is None:
        raise OmnitokError(f"recipe {recipe.name}: the trainer logged fewer than 2 records in its first {n} steps")
    return speed, n


def probe_speed(
    recipe: Recipe, *, vocab_size: int, lengths: dict[str, tuple[int, int]], steps: int = 8, progress: bool = False
) -> float:
    """Positions/s of ``recipe``'s first stage on synthetic documents, before any real tokens exist.

    Why: a choice made ahead of the data (how large a world the demo builds) depends on how much the LM will train,
    and the run's own speed is only known once its tokens are there. A throwaway copy of the model is trained for
    ``steps`` steps on synthetic documents of ``lengths`` (task -> (shortest, longest) tokens, for the stage's
    tasks) in a temporary directory; the first log window (kernel builds) is not timed. Such a probe read
    0.84-1.14x the speed the real run then trained at (docs/BENCHMARKS.md): good for a coarse choice, not a plan.
    The model is the recipe's without what needs real tokenizers (codec-initialised rows, image positions).
    """
    import tempfile
    from pathlib import Path

    from omnitok.train.loop import train
    from omnitok.train.recipe import CheckpointConfig, LogConfig
    from omnitok.train.synthetic import write_synthetic_tokens

    first = recipe.stages[0]
    missing = sorted(set(first.mixture) - set(lengths))
    if missing:
        raise OmnitokError(f"recipe {recipe.name}: probe_speed has no document lengths for tasks {missing}")
    if steps < 4:
        raise OmnitokError(f"probe_speed needs at least 4 steps (two timed log windows), got {steps}")
    positions = positions_per_step(recipe) * (steps + 1)
    mean_len = sum((lo + hi) / 2 for lo, hi in lengths.values()) / len(lengths)
    docs = max(8, int(positions / mean_len / len(first.mixture)) + 1)  # every step fills from fresh documents
    with tempfile.TemporaryDirectory(prefix="omnitok-probe-") as tmp:
        tokens = Path(tmp) / "tokens"
        write_synthetic_tokens(
            tokens, vocab_size=vocab_size, tasks={t: lengths[t] for t in first.mixture}, docs=docs, shards=1
        )
        probe = replace(
            recipe,
            name=f"{recipe.name}-probe",
            data=tokens,
            out=Path(tmp) / "run",
            model={**recipe.model, "image_positions": False},
            code_embeddings="random",
            stages=[replace(first, steps=steps + 1)],
            checkpoint=CheckpointConfig(every=0, keep=1),
            log=LogConfig(every=2, tensorboard=False),
            validation=replace(recipe.validation, docs=0),
        )
        speed = logged_speed(train(probe, resume=False, progress=progress, max_steps=steps)["log"], probe)
    if speed is None:
        raise OmnitokError(f"recipe {recipe.name}: the probe logged fewer than 2 records in {steps} steps")
    return speed


def train_for_seconds(
    recipe: Recipe,
    seconds: float,
    *,
    speed: float | None = None,
    progress: bool = True,
    on_plan: Callable[[Recipe, float], None] | None = None,
    reserve: Callable[[float], float] | None = None,
) -> dict[str, Any]:
    """Train ``recipe``'s curriculum in ~``seconds``, its stages scaled to the speed measured as it trains.

    ``speed`` (positions/s) instead plans every stage once from that figure and trains them straight: a given speed
    is a plan, not an estimate (equal positions for runs compared side by side). ``on_plan(recipe, speed)`` sees
    every plan before the steps it adds are trained: a caller keeps the newest to resume an interrupted run with
    ``train(kept plan)``. ``reserve(speed)``: seconds of ``seconds`` kept for work after the training whose length
    scales with the machine as the training does (the demo's evaluation), asked again at every plan with the speed
    it is made at. ``recipe.out`` must hold no checkpoints. Returns the last ``train`` call's result.
    """
    from omnitok.train.loop import train

    def plan(r: Recipe, s: float) -> Recipe:
        if on_plan is not None:
            on_plan(r, s)
        return r

    def left(speed: float) -> float:
        return seconds - (time.perf_counter() - t0) - (reserve(speed) if reserve is not None else 0.0)

    t0 = time.perf_counter()
    if speed is not None:
        return train(plan(plan_for_speed(recipe, left(speed), speed), speed), resume=False, progress=progress)
    speed, trained = calibrate(recipe, progress=progress)
    recipe = plan(plan_for_speed(recipe, left(speed), speed, trained=trained), speed)
    for i in range(len(recipe.stages) - 1):
        end = sum(s.steps for s in recipe.stages[: i + 1])
        speed = logged_speed(train(recipe, progress=progress, max_steps=end)["log"], recipe) or speed
        recipe = plan(plan_for_speed(recipe, left(speed), speed, trained=end, from_stage=i + 1), speed)
    return train(recipe, progress=progress)


__all__ = [
    "calibrate",
    "calibration_steps",
    "logged_speed",
    "plan_for_speed",
    "positions_per_step",
    "probe_speed",
    "train_for_seconds",
]
