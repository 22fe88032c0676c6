"""``omnitok world ...``: build the toy world and look at what was built."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from omnitok.world.build import KINDS, SPLITS, WorldConfig, build_world
from omnitok.world.read import load_manifest

app = typer.Typer(help="The embedded synthetic toy world.", no_args_is_help=True)
console = Console()


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def summary_table(manifest: dict) -> Table:
    table = Table(title=f"omnitok world (seed {manifest['seed']}, generator {manifest['generator_version']})")
    table.add_column("kind")
    for split in SPLITS:
        table.add_column(split, justify="right")
    for kind in KINDS:
        table.add_row(kind, *(str(manifest["counts"][s].get(kind, 0)) for s in SPLITS))
    return table


def run_build(out: Path, cfg: WorldConfig, workers: int | None, overwrite: bool) -> dict:
    bar = _progress()  # started on the first report, so argument errors print without a bar
    task = bar.add_task("building world", total=None, rate="")
    t0 = time.perf_counter()
    start: list[int] = []
    try:

        def report(done: int, total: int) -> None:
            if not start:
                bar.start()
                start.append(done)
            elapsed = time.perf_counter() - t0
            rate = f"{(done - start[0]) / elapsed:.0f} samples/s" if elapsed > 0 and done > start[0] else ""
            bar.update(task, completed=done, total=total, rate=rate)

        manifest = build_world(out, cfg, workers=workers, overwrite=overwrite, progress=report)
    finally:
        bar.stop()
    console.print(summary_table(manifest))
    held = manifest["heldout"]
    console.print(
        f"held-out combos: {', '.join(' '.join(c) for c in held['combos'])}; "
        f"held-out voices: {', '.join(held['voices']) or '-'}"
    )
    built = manifest["_built_samples"]
    secs = manifest["_build_seconds"]
    console.print(f"wrote {built} samples in {secs:.1f} s ({built / max(secs, 1e-9):.0f} samples/s) to {out}")
    return manifest


@app.command("build")
def build(
    out: Path = typer.Option(..., "--out", help="Directory to write shards and manifest.json into."),
    n: int = typer.Option(10_000, "--n", help="Scene samples over all splits (other kinds scale with it)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    speech: bool = typer.Option(True, "--speech/--no-speech", help="Synthesise speech with eSpeak NG."),
    speech_fraction: float = typer.Option(
        1.0, "--speech-fraction", help="Share of scenes that are also spoken (a large image world, fewer clips)."
    ),
    workers: int = typer.Option(0, "--workers", help="Processes (0: one per CPU core)."),
    shard_size: int = typer.Option(500, "--shard-size", help="Samples per tar shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a world built with other settings."),
) -> None:
    """Build (or resume building) the toy world."""
    cfg = WorldConfig(n=n, seed=seed, speech=speech, speech_fraction=speech_fraction, samples_per_shard=shard_size)
    run_build(out, cfg, workers or None, overwrite)


@app.command("info")
def info(world: Path = typer.Argument(..., help="A built world directory.")) -> None:
    """Print what a built world holds."""
    console.print(summary_table(load_manifest(world)))
