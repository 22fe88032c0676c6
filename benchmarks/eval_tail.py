"""What the demo's evaluation step costs beyond its time box: the tail ``omnitok.demo.EVAL_TAIL_S`` keeps back.

The demo gives the evaluation what is left of its budget less ``EVAL_TAIL_S``, and the suite stops starting batches at
that box's end. What the box does not hold is paid from the tail: importing the evaluation, loading the bundle, the
last batch running past the box's end, writing metrics.json and the HTML report. This runs that sequence as the demo
does (a process that has imported torch and ``omnitok.demo``, then ``omnitok.load`` + ``evaluate`` with
``max_minutes``) with boxes short enough that the suite fills them, each in a fresh process pinned to ``--cores``
cores: one core stands in for a machine half as fast (a 2-core Xeon at 2.0 GHz without AVX512-BF16 ran the demo's
steps at about half a Zen 4's speed).

    python benchmarks/eval_tail.py runs/demo35/bundle --world runs/demo35/world --box-s 20 40 --cores 2 1 --rounds 2

The tail is the step's wall time less the box; the box's own end is overrun by the part after "suite".
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from _common import command, machine, table


def _measure(bundle: str, world: str, box_s: float, cores: int, limit: int) -> dict[str, Any]:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    import torch

    # what the demo's process holds when its evaluation starts; the evaluation's own imports are in the tail
    import omnitok.demo

    torch.set_num_threads(cores)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        import omnitok
        from omnitok.eval.suite import EvalConfig, evaluate

        model = omnitok.load(bundle)
        loaded = time.perf_counter()
        metrics = evaluate(model, world, out, EvalConfig(limit=limit, max_minutes=box_s / 60))
        total = time.perf_counter() - t0
    suite = float(metrics["_meta"]["seconds"])
    scored = {k: v["n"]["all"] for k, v in metrics.items() if not k.startswith("_") and isinstance(v, dict)}
    return {"load": loaded - t0, "suite": suite, "total": total, "least": min(scored.values(), default=0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--world", required=True)
    ap.add_argument("--box-s", type=float, nargs="+", default=[20.0, 40.0], help="the evaluation's time boxes")
    ap.add_argument("--cores", type=int, nargs="+", default=[2, 1], help="cores each measurement is pinned to")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--limit", type=int, default=30, help="examples a task, as the demo")
    args = ap.parse_args()
    if max(args.cores) > len(os.sched_getaffinity(0)):
        raise SystemExit(f"--cores {max(args.cores)}: this process may run on {len(os.sched_getaffinity(0))} cores")

    rows = []
    for r in range(args.rounds):
        for cores in args.cores:
            for box in args.box_s:
                with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
                    m = pool.submit(_measure, args.bundle, args.world, box, cores, args.limit).result()
                tail = m["total"] - box
                rows.append(
                    [r + 1, cores, f"{box:g}", f"{m['load']:.1f}", f"{m['suite']:.1f}",
                     f"{m['total'] - m['load'] - m['suite']:.1f}", f"{m['suite'] - box:+.1f}", f"{tail:.1f}",
                     m["least"]]
                )  # fmt: skip
                print(rows[-1], flush=True)
    print(f"\n{command()}\n{machine()}\n")
    headers = ["round", "cores", "box s", "import + load s", "suite s", "report s", "suite past box s", "tail s",
               "fewest scored"]  # fmt: skip
    print(table(headers, rows))


if __name__ == "__main__":
    main()
