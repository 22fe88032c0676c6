"""Training speed with packed documents kept apart by a dense mask or by per-document attention.

The trainer packs several documents into each row. ``attention: mask`` gives SDPA a block-diagonal ``L x L`` mask
(most of every score matrix is computed, then masked away); ``attention: packed`` runs attention on each document
alone (``omnitok.train.attention``). Each round measures every mode once, in a fresh process (as the demo's LM
trains), in an order that alternates by round; the table gives the median and the ratio to the first mode. A
stage's documents decide the gain: short captions gain most, the interleaved stage's long clips least.

    python benchmarks/train_attention.py --data runs/demo9/tokens --rounds 3 --stage 0 --stage 1
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

from _common import command, machine, table
from omnitok.demo import RECIPE

MODES = ("mask", "packed")


def speed(recipe_path: str, tokens: str, stage: int, attention: str, steps: int, warmup: int) -> float:
    """In a fresh process: training positions/s of one stage of the recipe on ``tokens`` (nothing written)."""
    from omnitok.train.loop import measure_throughput
    from omnitok.train.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    recipe = replace(recipe, data=Path(tokens), attention=attention, stages=[recipe.stages[stage]])
    return measure_throughput(recipe, steps=steps, warmup=warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="an `omnitok pretokenize --out` directory")
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--stage", type=int, action="append", help="stage index to measure (repeatable; default 0)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="timed optimizer steps per measurement")
    ap.add_argument("--warmup", type=int, default=4)
    args = ap.parse_args()
    if not (args.data / "manifest.json").is_file():
        raise SystemExit(f"--data {args.data}: no manifest.json (pass an `omnitok pretokenize --out` directory)")

    from omnitok.demo import in_fresh_process
    from omnitok.train.recipe import load_recipe

    stages = load_recipe(args.recipe).stages
    for i in args.stage or [0]:
        if not 0 <= i < len(stages):
            raise SystemExit(f"--stage {i}: the recipe has stages 0..{len(stages) - 1}")
    rows = []
    for i in args.stage or [0]:
        got: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                got[mode].append(
                    in_fresh_process(speed, str(args.recipe), str(args.data), i, mode, args.steps, args.warmup)
                )
                print(f"stage {stages[i].name}, round {r + 1}: {mode} {got[mode][-1]:,.0f} positions/s", flush=True)
        base = statistics.median(got[MODES[0]])
        for mode, xs in got.items():
            med = statistics.median(xs)
            rows.append([stages[i].name, mode, round(med), " / ".join(f"{x:,.0f}" for x in xs), round(med / base, 3)])
    print(f"\n{command()}\n{machine()}; {args.steps} timed steps after {args.warmup}, each in a fresh process\n")
    print(table(["stage", "attention", "positions/s (median)", "each", f"vs {MODES[0]}"], rows))


if __name__ == "__main__":
    main()
