"""``omnitok pretokenize``: a built world -> token shards the trainer reads."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from omnitok.errors import OmnitokError
from omnitok.sequence import READ_ALOUD_WORDS

console = Console()


def _csv(value: str | None, name: str) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise OmnitokError(f"{name}: expected a comma-separated list, got {value!r}")
    return items


def pretokenize(
    data: Path = typer.Option(..., "--data", help="A built world (omnitok world build)."),
    out: Path = typer.Option(..., "--out", help="Directory for token shards, vocab.json and the text tokenizer."),
    image_tokenizer: Path = typer.Option(..., "--image-tokenizer", help="Image tokenizer directory."),
    speech_tokenizer: Path | None = typer.Option(None, "--speech-tokenizer", help="Speech tokenizer directory."),
    text_tokenizer: Path | None = typer.Option(
        None, "--text-tokenizer", help="Directory with a HF tokenizer.json (default: train a byte-level BPE)."
    ),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated tasks (default: all available)."),
    splits: str = typer.Option("train,val", "--splits", help="Comma-separated world splits to tokenize."),
    text_vocab_size: int = typer.Option(1024, "--text-vocab-size", help="BPE size when training one."),
    seed: int = typer.Option(0, "--seed", help="Seeds the per-sample prompt choice."),
    read_aloud_words: int = typer.Option(
        READ_ALOUD_WORDS,
        "--read-aloud-words",
        help="TTS clips with their words beside their speech, this many words a chunk; 0: one span after the text.",
    ),
    align_words: bool = typer.Option(
        True,
        "--align-words/--no-align-words",
        help="Clips whose world recorded no word onsets are cut at their words as the speech tokenizer's phone head "
        "aligns them; --no-align-words cuts them by characters.",
    ),
) -> None:
    """Tokenize a world into memory-mapped token shards (per rank under torchrun; resumable)."""
    from omnitok.data.pretokenize import pretokenize as run
    from omnitok.threads import free_cores

    with (
        free_cores(),
        Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar,
    ):
        ids: dict[str, int] = {}

        def report(name: str, done: int, total: int) -> None:
            if name not in ids:
                ids[name] = bar.add_task(name, total=total)
            bar.update(ids[name], completed=min(done, total))

        manifest = run(
            data,
            out,
            image_tokenizer,
            speech_tokenizer,
            text_tokenizer,
            tasks=_csv(tasks, "--tasks"),
            splits=_csv(splits, "--splits") or [],
            text_vocab_size=text_vocab_size,
            seed=seed,
            progress=report,
            read_aloud_words=read_aloud_words,
            align_words=align_words,
        )
    if manifest:
        for split, per_task in manifest.get("splits", {}).items():
            for task, info in per_task.items():
                console.print(f"{split}/{task}: {info['docs']} docs, {info['tokens']} tokens")
        console.print(f"vocabulary size {manifest.get('vocab_size')}; wrote {out}")
