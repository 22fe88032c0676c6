"""Muon's Newton–Schulz in bf16 (torch's) or float32, against AdamW: the trainer's speed on one machine.

``torch.optim.Muon`` orthogonalises in bfloat16. Where the CPU has no bf16 matmul instructions those matmuls are
emulated; ``omnitok.train.muon.Muon`` then orthogonalises in float32. Each arm trains the recipe's first stage for
``--steps`` steps on the same tokens with the same seed, in this process, arms interleaved over ``--rounds`` so
that a machine that slows down mid-run slows every arm alike; speed is the trainer's own real tokens/s after its
first logged window, loss the mean of the last three windows.

    python benchmarks/muon_speed.py --data runs/demo/tokens --steps 40 --rounds 2
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
from omnitok.train import loop
from omnitok.train.muon import Muon
from omnitok.train.recipe import load_recipe, recipe_mapping

ARMS = {
    "AdamW": ("adamw", None),
    "Muon, Newton-Schulz in bf16 (torch.optim.Muon)": ("muon", torch.bfloat16),
    "Muon, Newton-Schulz in float32": ("muon", torch.float32),
}


def _run(args: argparse.Namespace, arm: str, out: Path) -> dict:
    name, ns_dtype = ARMS[arm]
    raw = recipe_mapping(args.recipe)
    raw.update(
        data=str(args.data),
        out=str(out),
        stages=[dict(raw["stages"][0], steps=args.steps)],
        optim=dict(raw["optim"], name=name),
        checkpoint={"every": 0, "keep": 1},
        log={"every": 10, "tensorboard": False},
        validation={"every": 0, "docs": 0},
    )
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))

    forced = ns_dtype or torch.float32  # AdamW arms build no Muon

    class Forced(Muon):  # the arm's dtype whatever the hardware check says
        def __init__(self, params, *, ns_dtype=None, **kw):
            super().__init__(params, ns_dtype=forced, **kw)

    loop.Muon = Forced
    try:
        loop.train(load_recipe(path), progress=False)
    finally:
        loop.Muon = Muon
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in log[1:]),
        "loss": statistics.mean(r["loss"] for r in log[-3:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a pretokenized directory (omnitok pretokenize)")
    ap.add_argument("--recipe", default="recipes/toyworld.yaml", help="model, batch and optimiser come from here")
    ap.add_argument("--steps", type=int, default=40, help="steps of the recipe's first stage per arm")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    precision = recipe_mapping(args.recipe).get("precision")
    print(f"machine: {machine()}, {args.threads} torch threads, recipe precision: {precision}")
    print(command())
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    tmp = Path(tempfile.mkdtemp(prefix="muon_speed_"))
    try:
        for r in range(args.rounds):
            for i, arm in enumerate(ARMS):
                results[arm].append(_run(args, arm, tmp / f"r{r}-a{i}"))
                print(f"round {r + 1} {arm}: {results[arm][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(x["tokens_per_s"] for x in results[list(ARMS)[1]])
    rows = []
    for arm, runs in results.items():
        speed = statistics.median(x["tokens_per_s"] for x in runs)
        each = " / ".join(f"{x['tokens_per_s']:,.0f}" for x in runs)
        rows.append(
            [arm, f"{speed:,.0f}", each, f"{speed / base:.2f}x", round(statistics.mean(x["loss"] for x in runs), 4)]
        )
    print(table(["arm", "tokens/s (median)", "each round", "vs torch's Muon", f"loss after {args.steps} steps"], rows))


if __name__ == "__main__":
    main()
