"""Which LM shape learns most in the demo's minutes: model size, batch and learning rate at equal wall-clock time.

The demo gives its LM a fixed number of seconds, not a fixed number of tokens, so a smaller model that takes more
steps, or a smaller batch that takes more updates from the same tokens, may end lower than the recipe's shape. Each
arm is the demo recipe with a few fields overridden; its steps are planned the way ``omnitok demo`` plans them
(stages scaled to ``--seconds`` at the speed of its own steps, in its own fresh process), it trains in that process,
and is then scored on held-out loss per task (the trainer's last validation: 32 documents a task) and on a short
evaluation of ASR, TTS, captions and text-to-image (``--limit`` test examples each).

    omnitok demo --out runs/demo       # any finished demo: its world, tokenizers and token shards are reused
    python benchmarks/demo_lm_shapes.py --demo runs/demo \\
        --arm base: --arm mb4:batch.micro_batch=4 --arm small:model.hidden_size=192,model.intermediate_size=576

An arm is ``NAME:key=value,...`` with dotted recipe keys (``optim.lr=3e-3``, ``stages.3.schedule=constant``);
``NAME:`` alone is the recipe as is.
Arms run one after another (never in parallel: they would share the cores they are timed on).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import yaml

from _common import command, machine, table
from omnitok.demo import RECIPE

EVAL_TASKS = ["asr", "tts", "caption", "t2i"]


def parse_arm(spec: str) -> tuple[str, dict[str, object]]:
    name, _, rest = spec.partition(":")
    overrides: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--arm {spec!r}: expected key=value, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def arm_recipe(base: Path, overrides: dict[str, object], out: Path) -> Path:
    """The base recipe with dotted keys set, written next to the arm's outputs (the run's config).

    A number in a key indexes a list (``stages.3.lr``); a key may add an optional field the recipe leaves out
    (a stage's ``schedule``), and the result is parsed as a recipe, so a misspelt key fails before anything trains.
    """
    from omnitok.errors import OmnitokError
    from omnitok.train.recipe import load_recipe, recipe_mapping

    doc = recipe_mapping(base)  # a base: recipe merged in: the arm's copy is written elsewhere
    for key, value in overrides.items():
        node = doc
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) and p.isdigit() else node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SystemExit(f"recipe {base}: {key!r} does not name a field")
        node[leaf] = value
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        load_recipe(path)
    except OmnitokError as e:
        raise SystemExit(f"--arm overrides {overrides}: {e}") from e
    return path


def train_arm(
    tokens: Path, out: Path, recipe: Path, seconds: float, speed: float | None = None, validation: dict | None = None
) -> dict:
    """Plan and train one arm (runs in a fresh process); returns its plan, parameter count, wall time and last
    validation (its losses and what the validations cost).

    ``speed``: positions/s to plan with instead of measuring (arms of one model then train equal positions).
    ``validation``: the arm's ``validation.*`` overrides, applied over the demo's own validation settings.
    """
    from dataclasses import replace

    from safetensors import safe_open

    from omnitok.demo import DemoConfig, _demo_recipe
    from omnitok.train.budget import positions_per_step, train_for_seconds

    t0 = time.perf_counter()
    shutil.rmtree(out / "lm", ignore_errors=True)  # an arm interrupted before its result: trained again from the start
    base = _demo_recipe(tokens, out / "lm", DemoConfig(recipe=str(recipe)))
    base = replace(base, validation=replace(base.validation, **(validation or {})))
    plans = []
    train_for_seconds(base, seconds, speed=speed, on_plan=lambda r, s: plans.append((r, s)))
    planned, speed = plans[-1]
    train_s = time.perf_counter() - t0
    # Counted from the saved weights' shapes (tied embeddings are stored once), not by building the model again.
    with safe_open(str(Path(planned.out) / "final" / "model.safetensors"), "pt") as f:
        names = f.keys()  # a safe_open handle is not iterable itself
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in names)
    val = [json.loads(line) for line in (out / "lm" / "val.jsonl").read_text().splitlines()]
    return {
        "positions_per_s": speed,
        "val_seconds": sum(r["seconds"] for r in val),
        "val_loss": val[-1]["loss"],
        "steps": [s.steps for s in planned.stages],
        "tokens_per_step": positions_per_step(planned),
        "params": params,
        "train_s": train_s,
    }


def eval_arm(bundle: Path, world: Path, out: Path, limit: int, seed: int, tasks: list[str]) -> dict:
    import omnitok
    from omnitok.eval.suite import EvalConfig, evaluate

    return evaluate(omnitok.load(str(bundle)), world, out, EvalConfig(limit=limit, seed=seed, tasks=tasks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="a finished demo directory (world/ and tokens/)")
    ap.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe every arm starts from (the demo's)")
    ap.add_argument("--arm", action="append", required=True, help="NAME:key=value,... (repeatable)")
    ap.add_argument("--seconds", type=float, default=360.0, help="LM training time per arm (the demo's ~6 min)")
    ap.add_argument(
        "--positions-per-s",
        type=float,
        help="plan every arm with this speed instead of timing its first steps (equal positions for arms of one model)",
    )
    ap.add_argument("--limit", type=int, default=30, help="test examples per evaluated task (0: no evaluation)")
    ap.add_argument("--out", type=Path, default=Path("runs/lm_shapes"))
    ap.add_argument("--tasks", nargs="+", default=EVAL_TASKS, help=f"evaluated tasks (default: {' '.join(EVAL_TASKS)})")
    args = ap.parse_args()
    for sub in ("world/manifest.json", "tokens/manifest.json"):
        if not (args.demo / sub).is_file():
            raise SystemExit(f"{args.demo / sub} not found: pass a finished demo directory (omnitok demo --out DIR)")
    if not args.recipe.is_file():
        raise SystemExit(f"--recipe {args.recipe} not found")
    arms = [parse_arm(s) for s in args.arm]

    from omnitok.demo import in_fresh_process

    rows, results = [], {}
    for name, overrides in arms:
        out = args.out / name
        done = out / "result.json"
        if done.is_file():  # resumable: a finished arm is read back, not retrained
            res = json.loads(done.read_text())
            if res["overrides"] != overrides:
                raise SystemExit(f"{out} holds arm {name!r} with {res['overrides']}, not {overrides}: rename the arm")
        else:
            recipe = arm_recipe(args.recipe, overrides, out)
            validation = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("validation.")}
            res = in_fresh_process(
                train_arm, args.demo / "tokens", out, recipe, args.seconds, args.positions_per_s, validation
            )
            res["metrics"] = {}
            if args.limit:
                res["metrics"] = in_fresh_process(
                    eval_arm, out / "lm" / "bundle", args.demo / "world", out / "eval", args.limit, 0, args.tasks
                )
            res["overrides"] = overrides
            done.write_text(json.dumps(res, indent=1))
        results[name] = res
        v = res["val_loss"]
        m = res["metrics"]

        def metric(key: str, m: dict = m) -> float | str:  # a task left out of --tasks prints "-"
            return round(m[key]["all"], 3) if key in m else "-"

        positions = sum(res["steps"]) * res["tokens_per_step"]
        rows.append(
            [
                name,
                ", ".join(f"{k}={x}" for k, x in overrides.items()) or "(recipe)",
                f"{res['params'] / 1e6:.2f} M",
                round(res["positions_per_s"]),
                sum(res["steps"]),
                f"{positions / 1e6:.2f} M",
                round(res["train_s"]),
                round(res.get("val_seconds", math.nan), 1),
                round(positions / res["train_s"]),
                round(statistics.mean(v.values()), 3),
                round(v["caption"], 3),
                round(v["t2i"], 3),
                round(v["asr"], 3),
                round(v["tts"], 3),
                metric("asr_wer"),
                metric("tts_wer"),
                metric("tts_style_acc"),
                metric("caption_object_f1"),
                metric("t2i_object_f1"),
            ]
        )
    print(f"\n{command()}\n{machine()}; {args.seconds:.0f} s of LM training per arm\n")
    print(
        table(
            [
                "arm",
                "overrides",
                "params",
                "planned positions/s",
                "steps",
                "positions",
                "train s",
                "of which validating",
                "trained positions/s",
                "mean val loss",
                "caption",
                "t2i",
                "asr",
                "tts",
                "asr_wer",
                "tts_wer",
                "style",
                "caption F1",
                "t2i F1",
            ],
            rows,
        )
    )
    every = args.out / "results.json"  # every arm run into this directory so far, by name
    kept = json.loads(every.read_text()) if every.is_file() else {}
    every.write_text(json.dumps({**kept, **results}, indent=1))


if __name__ == "__main__":
    main()
