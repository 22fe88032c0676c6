"""``omnitok train RECIPE.yaml``: run a training recipe, alone or under ``torchrun``.

omnitok train recipes/tiny.yaml
torchrun --nproc_per_node 2 -m omnitok train recipes/tiny.yaml
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/tiny.yaml)."),
    out: Path | None = typer.Option(None, "--out", help="Write here instead of the recipe's out."),
    data: Path | None = typer.Option(None, "--data", help="Token directory instead of the recipe's data."),
    resume: bool | None = typer.Option(
        None, "--resume/--no-resume", help="Continue from OUT's newest checkpoint (default: if there is one)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Stop after this many steps overall, with a checkpoint; rerun to continue."
    ),
) -> None:
    """Train a model through the stages of RECIPE on pretokenized data."""
    from transformers.utils import logging as hf_logging

    from omnitok.threads import free_cores
    from omnitok.train.loop import stage_summary
    from omnitok.train.loop import train as run
    from omnitok.train.recipe import check_data, load_recipe

    hf_logging.disable_progress_bar()  # ours is the one progress bar
    r = load_recipe(recipe, {"out": str(out) if out else None, "data": str(data) if data else None})
    check_data(r)  # a wrong task, mixture or data directory fails before anything is printed or built
    main = os.environ.get("RANK", "0") == "0"
    if main:
        rows = stage_summary(r)
        table = Table(title=f"recipe {r.name} → {r.out}")
        for col in rows[0]:
            table.add_column(col)
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
        console.print(table)
    with free_cores():  # all of them on an idle machine; not the ones another process holds
        result = run(r, resume=resume, progress=progress, max_steps=max_steps)
    if main:
        last = result["log"][-1] if result["log"] else {}
        loss = f", loss {last['loss']:.4f}" if last else ""
        if result["final"] is None:
            console.print(f"stopped at step {result['step']}{loss} (--max-steps); rerun without it to continue")
        else:
            console.print(f"trained {result['step']} steps{loss} at the end; model in {result['final']}")
