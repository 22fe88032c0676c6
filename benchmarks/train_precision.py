"""bf16 autocast vs float32 for ``omnitok train`` on real toy-world tokens: speed and where the loss ends up.

Same recipe, same seed, same data order; only ``precision`` differs. Speed is the trainer's own tokens/s (real
tokens, logged every ``log.every`` steps) after the first window; loss is the mean of the last three logged
windows, so bf16 rounding that hurt learning would show as a higher number.

    python benchmarks/train_precision.py --data runs/demo/tokens --steps 120
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from _common import command, machine, table
from omnitok.train.loop import train
from omnitok.train.recipe import load_recipe, recipe_mapping


def _run(args: argparse.Namespace, precision: str, out: Path) -> dict:
    raw = recipe_mapping(args.recipe)
    first = dict(raw["stages"][0], steps=args.steps)
    raw.update(
        data=str(args.data),
        out=str(out),
        precision=precision,
        stages=[first],
        checkpoint={"every": 0, "keep": 1},
        log={"every": 10, "tensorboard": False},
    )
    path = out.parent / f"{precision}.yaml"
    path.write_text(yaml.safe_dump(raw))
    train(load_recipe(path), progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in log[1:]),
        "loss": statistics.mean(r["loss"] for r in log[-3:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a pretokenized directory (omnitok pretokenize)")
    ap.add_argument("--recipe", default="recipes/toyworld.yaml", help="model, batch and optimiser come from here")
    ap.add_argument("--steps", type=int, default=120, help="steps of the recipe's first stage")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    tmp = Path(tempfile.mkdtemp(prefix="omnitok-precision-"))
    try:
        res = {p: _run(args, p, tmp / p) for p in ("fp32", "bf16")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = res["fp32"]["tokens_per_s"]
    rows = [
        [p, f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base:.2f}x", f"{r['loss']:.4f}"] for p, r in res.items()
    ]
    print(f"{machine()}; torch threads {args.threads}; AMX {amx}; {args.steps} steps of {args.recipe}\n{command()}\n")
    print(table(["precision", "tokens/s", "vs fp32", "loss (last 30 steps)"], rows))


if __name__ == "__main__":
    main()
