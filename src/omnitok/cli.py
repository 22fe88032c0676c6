"""The ``omnitok`` command line. Each step of the pipeline contributes one sub-command group."""

from __future__ import annotations

import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from omnitok.errors import OmnitokError

# Each sub-command by where it lives, imported only when it runs (or shows its own help). Why: every
# process omnitok spawns (the demo's steps, the evaluation's pocketsphinx workers) imports this module again as its
# ``__main__``, and importing every sub-command's module (torch, transformers, scipy) took 6.8 s on a 2-core Xeon,
# before the process began its own work; the few lines here take a tenth of that.
COMMANDS = {
    "world": "omnitok.world.cli:app",
    "demo": "omnitok.demo:demo_command",
    "tokenizer": "omnitok.tokenizers.cli:app",
    "train": "omnitok.train.cli:train",
    "pretokenize": "omnitok.data.cli:pretokenize",
    "eval": "omnitok.eval.cli:eval_command",
    "serve": "omnitok.serve.cli:serve_command",
    "generate": "omnitok.generate_cli:generate_command",
}
# Each sub-command's line in ``omnitok --help``: the first paragraph of its help, kept here so that listing the
# commands imports none of them (4.9 s -> 0.3 s on the Xeon). tests/test_cli.py renders the listing both ways.
SUMMARIES = {
    "world": "The embedded synthetic toy world.",
    "demo": "The main job: world -> tokenizers -> LM through four stages -> bundle -> evaluation report.",
    "tokenizer": "Train, encode and decode with modality tokenizers.",
    "train": "Train a model through the stages of RECIPE on pretokenized data.",
    "pretokenize": "Tokenize a world into memory-mapped token shards (per rank under torchrun; resumable).",
    "eval": "Run every task on the held-out test split; write metrics.json and an HTML report.",
    "serve": "Serve a bundle through an OpenAI-compatible API (chat, speech, transcription, images) and a web page.",
    "generate": "Run one request against a bundle and write the reply's text, images and speech to --out.",
}


def _load(name: str) -> click.Command:
    """The click command of sub-command ``name``: a typer app becomes a group, a function a command."""
    import importlib

    module, attr = COMMANDS[name].split(":")
    obj = getattr(importlib.import_module(module), attr)
    if isinstance(obj, typer.Typer):
        cmd = typer.main.get_group(obj)
    else:
        single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        single.command(name)(obj)
        cmd = typer.main.get_command(single)
    cmd.name = name
    return cmd


class _Commands(MutableMapping[str, Any]):
    """``COMMANDS`` as the group's command table: names are known up front, a command is built on first use."""

    def __init__(self, given: MutableMapping[str, Any]) -> None:
        self._built = dict(given)

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            if name not in COMMANDS:
                raise KeyError(name)
            self._built[name] = _load(name)
        return self._built[name]

    def __setitem__(self, name: str, cmd: Any) -> None:
        self._built[name] = cmd

    def __delitem__(self, name: str) -> None:
        del self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*COMMANDS, *self._built]))

    def __len__(self) -> int:
        return len(set(COMMANDS) | set(self._built))


class _LazyGroup(TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _Commands(self.commands)

    _listing = False  # True while the group's own help is written: commands not yet built stand in by summary

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if self._listing and cmd_name in SUMMARIES and cmd_name not in self.commands._built:
            return typer.core.TyperCommand(cmd_name, help=SUMMARIES[cmd_name])
        return super().get_command(ctx, cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="omnitok",
    cls=_LazyGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Build, train, evaluate and serve any-to-any multimodal token language models."""


# Typer from 0.2x parses with its own copy of click, whose usage errors are not ``click.ClickException``: uncaught,
# a mistyped command printed a traceback. Both kinds, whichever parsed.
_USAGE_ERRORS: tuple[type[Exception], ...] = (
    click.ClickException,
    getattr(typer, "TyperException", click.ClickException),
)


def main() -> None:
    """Console entry point: user errors become one clear line, not a traceback."""
    try:
        app(standalone_mode=False)
    except OmnitokError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except _USAGE_ERRORS as e:  # bad flags, missing arguments, unknown commands: click's own clear message
        e.show()  # type: ignore[union-attr]
        sys.exit(e.exit_code)  # type: ignore[union-attr]
    except (typer.Exit, click.exceptions.Exit) as e:
        sys.exit(e.exit_code)
    except (typer.Abort, click.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
