"""How well a time-boxed run's speed estimate predicts the speed it then trains at: throwaway model vs own first steps.

``omnitok demo`` turns the LM's seconds into steps with a speed. It used to read that speed from a throwaway copy of
the model (``measure_throughput``: 6 timed steps after 2), which read up to 30 % low in processes started right after
heavy disk writes; it now times the run's own first steps (``omnitok.train.budget.calibrate``: the first stage's
warm-up, read from the trainer's log). Each round here runs in a fresh process, as the demo's LM does: optionally
write ``--dirty-mb`` of data first (what copying or writing a world leaves for the kernel to flush), then take both
estimates (their order alternates by round), then keep training the calibrated run for ``--steps`` steps and compare
each estimate with the speed those steps actually ran at.

    omnitok demo --out runs/demo     # any finished demo: its token shards are reused
    python benchmarks/lm_plan_accuracy.py --demo runs/demo --rounds 3 --dirty-mb 0 400     # ~9 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

from _common import command, machine, table
from omnitok.demo import RECIPE


def one_round(recipe_path: str, tokens: str, out: str, dirty_mb: int, throwaway_first: bool, steps: int) -> dict:
    """In a fresh process: dirty the page cache, take both estimates, then train on and time the real steps."""
    from omnitok.train.budget import calibrate, logged_speed
    from omnitok.train.loop import measure_throughput, train
    from omnitok.train.recipe import ValidationConfig, load_recipe

    recipe = replace(
        load_recipe(recipe_path), data=Path(tokens), out=Path(out) / "lm", validation=ValidationConfig(docs=0)
    )
    if dirty_mb:
        block = os.urandom(1 << 20)
        with open(Path(out) / "dirty.bin", "wb") as f:  # no fsync: the kernel flushes it while we measure
            for _ in range(dirty_mb):
                f.write(block)
    estimates = {}
    for name in ("throwaway", "own") if throwaway_first else ("own", "throwaway"):
        t = time.perf_counter()
        if name == "throwaway":
            estimates[name] = measure_throughput(recipe)
        else:
            estimates[name], done = calibrate(recipe, progress=False)
        estimates[f"{name}_s"] = time.perf_counter() - t
    log = train(recipe, progress=False, max_steps=done + steps)["log"]
    # From the first log record after the calibration to the last: the resumed run's set-up is not in the window.
    real = [r for r in log if r["step"] > done]
    return {**estimates, "trained": logged_speed(real, recipe), "steps_timed": real[-1]["step"] - real[0]["step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="a finished demo directory (tokens/)")
    ap.add_argument("--recipe", default=str(RECIPE), help="the LM recipe (default: the demo's)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per --dirty-mb value")
    ap.add_argument("--dirty-mb", type=int, nargs="+", default=[0, 400], help="MB written just before each round")
    ap.add_argument("--steps", type=int, default=150, help="steps trained after the calibration (the truth)")
    ap.add_argument("--out", type=Path, default=Path("runs/lm_plan_accuracy"))
    args = ap.parse_args()
    if not (args.demo / "tokens" / "manifest.json").is_file():
        raise SystemExit(f"{args.demo / 'tokens'} holds no token shards: pass a finished demo (omnitok demo --out DIR)")

    from omnitok.demo import in_fresh_process

    results = []
    for dirty in args.dirty_mb:
        for r in range(args.rounds):
            out = args.out / f"dirty{dirty}-r{r}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            first = r % 2 == 0
            tokens = str(args.demo / "tokens")
            res = in_fresh_process(one_round, args.recipe, tokens, str(out), dirty, first, args.steps)
            shutil.rmtree(out)  # checkpoints and the dirty file: ~100 MB a round
            res.update(dirty_mb=dirty, round=r, throwaway_first=first)
            results.append(res)
            print(json.dumps(res))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))

    rows = []
    for r in results:
        rows.append(
            [
                r["dirty_mb"],
                r["round"],
                "throwaway" if r["throwaway_first"] else "own steps",
                f"{r['throwaway']:,.0f} ({r['throwaway'] / r['trained']:.2f})",
                f"{r['own']:,.0f} ({r['own'] / r['trained']:.2f})",
                f"{r['trained']:,.0f}",
            ]
        )
    for name in ("throwaway", "own"):
        ratios = [r[name] / r["trained"] for r in results]
        print(
            f"{name}: estimate / trained speed median {statistics.median(ratios):.2f}, range "
            f"{min(ratios):.2f}-{max(ratios):.2f}"
        )
    print(f"\n{command()}\n{machine()}\n")
    headers = [
        "MB written before",
        "round",
        "first",
        "throwaway model (/ trained)",
        "own first steps (/ trained)",
        f"trained ({args.steps} steps)",
    ]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
