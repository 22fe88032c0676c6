"""``omnitok eval BUNDLE --data WORLD --out DIR``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from omnitok.errors import OmnitokError

console = Console()


def metrics_table(metrics: dict) -> Table:
    table = Table(title="omnitok eval (test split)")
    for col in ("metric", "all", "seen", "held-out", "n"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, m in metrics.items():
        if name.startswith("_"):
            continue
        cells = ["–" if m[g] is None else f"{m[g]:.3f}" for g in ("all", "seen", "heldout")]
        table.add_row(name, *cells, str(m["n"]["all"]))
    return table


def eval_command(
    bundle: Path = typer.Argument(..., help="A bundle directory (omnitok train writes one)."),
    data: Path = typer.Option(..., "--data", help="The world to evaluate on (its test split)."),
    out: Path = typer.Option(..., "--out", help="Where metrics.json and report.html go."),
    limit: int = typer.Option(50, "--limit", help="Examples per task."),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated subset of tasks."),
    seed: int = typer.Option(0, "--seed"),
    max_minutes: float | None = typer.Option(
        None, "--max-minutes", help="Wall-clock cap, split over the tasks; each reports how many it scored."
    ),
    temperature: list[str] | None = typer.Option(
        None, "--temperature", help="MODALITY=T (text, image, speech; repeatable): sampling other than the default."
    ),
    top_k: list[str] | None = typer.Option(None, "--top-k", help="MODALITY=K (repeatable)."),
    top_p: list[str] | None = typer.Option(None, "--top-p", help="MODALITY=P (repeatable)."),
    device: str = typer.Option("cpu", "--device", help="torch device for the LM (cpu, cuda); tokenizers stay on cpu."),
    t2i_best_of: int = typer.Option(
        1, "--t2i-best-of", help="Text-to-image: draw N per caption, keep the one the model reads back likeliest."
    ),
    caption_best_of: int = typer.Option(
        1, "--caption-best-of", help="Captions: write N per picture, keep the one likeliest as read and as drawn."
    ),
    tts_best_of: int = typer.Option(
        1, "--tts-best-of", help="TTS: speak N clips per sentence, keep the one the model hears the sentence in best."
    ),
    spoken_qa_best_of: int = typer.Option(
        1,
        "--spoken-qa-best-of",
        help="Spoken answers: write the answer once, speak it N times, keep the clip the model hears it in best.",
    ),
    text_cfg_scale: float = typer.Option(
        1.0,
        "--text-cfg-scale",
        help="Guidance for text about a picture, against the request without it (1 = off; 3 for a bundle trained "
        "with captions without their picture, where its reading is good).",
    ),
) -> None:
    """Run every task on the held-out test split; write metrics.json and an HTML report."""
    import omnitok
    from omnitok.data.cli import _csv
    from omnitok.decoding import sampling_overrides
    from omnitok.eval.suite import TASKS, EvalConfig, evaluate
    from omnitok.threads import free_cores

    if max_minutes is not None and max_minutes <= 0:
        raise OmnitokError(f"--max-minutes must be positive, got {max_minutes}")
    cfg = EvalConfig(
        limit=limit,
        tasks=_csv(tasks, "--tasks") or list(TASKS),
        seed=seed,
        max_minutes=max_minutes,
        sampling=sampling_overrides(temperature, top_k, top_p),
        t2i_best_of=t2i_best_of,
        caption_best_of=caption_best_of,
        tts_best_of=tts_best_of,
        spoken_qa_best_of=spoken_qa_best_of,
        text_cfg_scale=text_cfg_scale,
    )
    model = omnitok.load(str(bundle), device)
    with free_cores(), console.status("evaluating") as status:
        metrics = evaluate(model, data, out, cfg, progress=lambda t: status.update(f"evaluating {t}"))
    console.print(metrics_table(metrics))
    console.print(f"report: {out / 'report.html'}")
