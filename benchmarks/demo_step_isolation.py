"""Why ``omnitok demo`` trains its LM in a fresh process: LM speed after a speech tokenizer's training, side by side.

Inside one ``omnitok demo`` process the LM used to train ~20 % slower than a fresh ``omnitok train`` on the same
tokens. This measures the demo recipe's training speed (``measure_throughput``: real optimizer steps, nothing
written) in three places in one run: a fresh process before anything else ran, then, after this process trained a
speech tokenizer, alternately in this process and in a fresh spawned one. Rounds alternate so that drift of a shared
machine hits both sides alike.

    omnitok demo --out runs/demo20    # any finished demo: its world and token shards are reused
    python benchmarks/demo_step_isolation.py --demo runs/demo20      # ~5 min on CPU-2
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _common import command, machine, table
from omnitok.demo import RECIPE


def measure(recipe_path: str, tokens: str, steps: int) -> dict:
    """Training positions/s of the recipe's model on ``tokens``, with this process's CPU time and memory."""
    from omnitok.train.loop import measure_throughput
    from omnitok.train.recipe import load_recipe

    recipe = replace(load_recipe(recipe_path), data=Path(tokens), out=Path(tempfile.mkdtemp()) / "unused")
    a, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    speed = measure_throughput(recipe, steps=steps)
    b, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t
    with open("/proc/self/statm") as f:
        rss_mb = int(f.read().split()[1]) * 4096 / 2**20
    return {
        "positions_per_s": speed,
        "user_s": b.ru_utime - a.ru_utime,
        "sys_s": b.ru_stime - a.ru_stime,
        "wall_s": wall,
        "rss_mb": rss_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="a finished demo directory (world/ and tokens/)")
    ap.add_argument("--recipe", default=str(RECIPE), help="the LM recipe (default: the demo's)")
    ap.add_argument("--speech-minutes", type=float, default=0.5, help="speech tokenizer training time in-process")
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for sub in ("world/manifest.json", "tokens/manifest.json"):
        if not (args.demo / sub).is_file():
            raise SystemExit(f"{args.demo / sub} not found: pass a finished demo directory (omnitok demo --out DIR)")

    from omnitok.demo import in_fresh_process
    from omnitok.tokenizers.speech_train import SpeechTrainConfig, train_speech_tokenizer

    tokens = str(args.demo / "tokens")
    rows: dict[str, list[dict]] = {"fresh process, before": [], "this process, after": [], "fresh process, after": []}
    rows["fresh process, before"].append(in_fresh_process(measure, args.recipe, tokens, args.steps))
    scratch = Path(tempfile.mkdtemp())
    cfg = replace(SpeechTrainConfig(), max_minutes=args.speech_minutes)
    train_speech_tokenizer(args.demo / "world", scratch / "speech", cfg, progress=False)
    shutil.rmtree(scratch)
    for _ in range(args.rounds):
        rows["this process, after"].append(measure(args.recipe, tokens, args.steps))
        rows["fresh process, after"].append(in_fresh_process(measure, args.recipe, tokens, args.steps))

    base = statistics.median(r["positions_per_s"] for r in rows["fresh process, before"])
    out = []
    for name, runs in rows.items():
        speeds = [r["positions_per_s"] for r in runs]
        med = statistics.median(speeds)
        out.append(
            [
                f"{name} (after a {args.speech_minutes:g} min speech tokenizer training)" if "after" in name else name,
                len(runs),
                round(med),
                " / ".join(str(round(s)) for s in speeds),
                round(med / base, 2),
                round(statistics.median(r["user_s"] for r in runs), 1),
                round(statistics.median(r["sys_s"] for r in runs), 1),
                round(statistics.median(r["rss_mb"] for r in runs)),
            ]
        )
    headers = ["where the LM trains", "n", "positions/s (median)", "each", "vs fresh", "user s", "sys s", "RSS MB"]
    print(f"\n`{command()}` — {machine()}, {args.steps} steps per measurement\n")
    print(table(headers, out))


if __name__ == "__main__":
    main()
