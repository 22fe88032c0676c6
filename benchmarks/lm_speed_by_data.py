"""The demo recipe's training speed on different token directories: what a smaller vocabulary buys per second.

The LM's output layer and embedding table grow with the vocabulary, which is mostly codebook: an image tokenizer of
4,096 codes makes a 5,698-token vocabulary, one of 1,000 codes 2,602. At the demo's fixed seconds a faster step is
more steps, so a codebook's size is also a speed question. Each round measures every directory once, in a fresh
process (as the demo's LM trains), in an order that alternates by round; the table gives the median and the ratio
to the first directory.

    python benchmarks/lm_speed_by_data.py --data runs/cb/d4096/tokens runs/cb/d1000/tokens --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from _common import command, machine, table
from omnitok.demo import RECIPE


def speed(recipe_path: str, tokens: str, steps: int, warmup: int) -> float:
    """In a fresh process: training positions/s of the recipe's first stage on ``tokens`` (nothing written)."""
    from omnitok.train.loop import measure_throughput
    from omnitok.train.recipe import load_recipe

    recipe = replace(load_recipe(recipe_path), data=Path(tokens))  # nothing is written
    return measure_throughput(recipe, steps=steps, warmup=warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="pretokenized directories; the first is 1.0")
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="timed optimizer steps per measurement")
    ap.add_argument("--warmup", type=int, default=4)
    args = ap.parse_args()
    for d in args.data:
        if not (d / "manifest.json").is_file():
            raise SystemExit(f"--data {d}: no manifest.json (pass an `omnitok pretokenize --out` directory)")

    from omnitok.demo import in_fresh_process

    got: dict[Path, list[float]] = {d: [] for d in args.data}
    for r in range(args.rounds):
        for d in args.data if r % 2 == 0 else args.data[::-1]:
            got[d].append(in_fresh_process(speed, str(args.recipe), str(d), args.steps, args.warmup))
            print(f"round {r + 1}: {d} {got[d][-1]:,.0f} positions/s", flush=True)
    base = statistics.median(got[args.data[0]])
    rows = []
    for d, xs in got.items():
        size = json.loads((d / "vocab.json").read_text())["size"]
        rows.append(
            [
                str(d),
                size,
                round(statistics.median(xs)),
                " / ".join(f"{x:,.0f}" for x in xs),
                round(statistics.median(xs) / base, 3),
            ]
        )
    print(f"\n{command()}\n{machine()}; {args.steps} timed steps after {args.warmup}, each in a fresh process\n")
    print(table(["data", "vocab", "positions/s (median)", "each", "vs first"], rows))


if __name__ == "__main__":
    main()
