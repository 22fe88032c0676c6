"""Where the demo's evaluation spends its seconds: the LM's forward passes against the instruments.

The demo keeps back a box for the evaluation sized from the LM's training speed (``DemoConfig.eval_reserve``). That
assumes the suite's seconds follow what the LM's training speed measures. They split into work that does (the LM's
forward passes while generating) and work that does not (pocketsphinx, eSpeak's reference clips, the codecs'
decoders, the style and scene instruments: scalar code on one or a few cores, indifferent to the matrix units that
make one CPU train an LM three times faster than another). This runs the demo's evaluation on each bundle (every
task, ``--limit`` examples each, no box, a fresh process on ``--threads`` threads) with timers around each part,
and times the training speed of the bundle's own model and of the demo's base recipe's with the demo's probe, so
the parts can be stated in positions of training as the reserve's fit is.

    python benchmarks/eval_cost.py runs/demo43/bundle --world runs/demo43/world

"other" is what no timer holds: the logits processor and sampling, building prompts, reading the world, scoring.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from _common import command, machine, table

PARTS = ("lm forward", "pocketsphinx", "espeak", "codec decode")


def _timed(clock: dict[str, float], part: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[part] += time.perf_counter() - t

    return wrapper


def _measure(bundle: str, world: str, limit: int, threads: int, recipes: list[str]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    import omnitok
    from omnitok.demo import _probe
    from omnitok.eval import asr, style
    from omnitok.eval.suite import EvalConfig, evaluate

    speeds = {Path(r).name: _probe(r, "cpu") for r in recipes}
    model = omnitok.load(bundle)
    clock: dict[str, float] = defaultdict(float)
    asr.Transcriber.transcribe_many = _timed(clock, "pocketsphinx", asr.Transcriber.transcribe_many)
    style.StyleReference.reference = _timed(clock, "espeak", style.StyleReference.reference)
    for codec in (model.bundle.image, model.bundle.speech):
        if codec is not None:
            codec.decode = _timed(clock, "codec decode", codec.decode)
    started: list[float] = []
    lm = model.bundle.lm
    lm.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))

    def stop(*_: Any) -> None:
        clock["lm forward"] += time.perf_counter() - started.pop()

    lm.register_forward_hook(stop)

    per_task: dict[str, dict[str, float]] = {}
    marks: list[tuple[str, float, dict[str, float]]] = []

    def progress(task: str) -> None:
        marks.append((task, time.perf_counter(), dict(clock)))

    with tempfile.TemporaryDirectory() as out:
        metrics = evaluate(model, world, out, EvalConfig(limit=limit), progress=progress)
    marks.append(("", time.perf_counter(), dict(clock)))
    for (task, t, c), (_, t_next, c_next) in itertools.pairwise(marks):
        parts = {p: c_next.get(p, 0.0) - c.get(p, 0.0) for p in PARTS}
        per_task[task] = {"seconds": t_next - t, **parts}
    params = sum(p.numel() for p in lm.parameters())
    return {"speeds": speeds, "tasks": per_task, "suite": metrics["_meta"]["seconds"], "params": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--world", action="append", required=True, help="the bundles' world (one for all, or one each)")
    ap.add_argument("--limit", type=int, default=30, help="examples a task, as the demo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument(
        "--recipe", action="append", default=None, help="recipes whose training speed is probed (default: the demo's)"
    )
    args = ap.parse_args()
    worlds = args.world * len(args.bundles) if len(args.world) == 1 else args.world
    if len(worlds) != len(args.bundles):
        raise SystemExit(f"--world: give one, or one per bundle ({len(args.bundles)}), got {len(args.world)}")
    root = Path(__file__).resolve().parents[1] / "recipes"
    recipes = args.recipe or [str(root / "toyworld.yaml"), str(root / "toyworld_small.yaml")]

    rows, totals = [], []
    for r in range(args.rounds):
        for bundle, world in zip(args.bundles, worlds, strict=True):
            with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
                m = pool.submit(_measure, bundle, world, args.limit, args.threads, recipes).result()
            for task, t in m["tasks"].items():
                other = t["seconds"] - sum(t[p] for p in PARTS)
                parts = (f"{t[p]:.1f}" for p in PARTS)
                rows.append([r + 1, bundle, task, f"{t['seconds']:.1f}", *parts, f"{other:.1f}"])
            whole = {p: sum(t[p] for t in m["tasks"].values()) for p in (*PARTS, "seconds")}
            speeds = " / ".join(f"{k} {v:,.0f}" for k, v in m["speeds"].items())
            totals.append(
                [r + 1, bundle, f"{m['params'] / 1e6:.2f} M", f"{m['suite']:.1f}",
                 *(f"{whole[p]:.1f}" for p in PARTS), f"{whole['seconds'] - sum(whole[p] for p in PARTS):.1f}", speeds]
            )  # fmt: skip
            print(totals[-1], flush=True)
    print(f"\n{command()}\n{machine()}\n")
    print(table(["round", "bundle", "task", "s", *(f"{p} s" for p in PARTS), "other s"], rows))
    print()
    print(table(["round", "bundle", "LM params", "suite s", *(f"{p} s" for p in PARTS), "other s",
                 "probe positions/s"], totals))  # fmt: skip


if __name__ == "__main__":
    main()
