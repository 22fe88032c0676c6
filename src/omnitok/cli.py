"""The ``omnitok`` command line. Each step of the pipeline contributes one sub-command group."""

from __future__ import annotations

import sys

import click
import typer
from rich.console import Console

from omnitok.errors import OmnitokError

app = typer.Typer(
    name="omnitok",
    help="Build, train, evaluate and serve any-to-any multimodal token language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


def _register() -> None:
    from omnitok.demo import demo_command
    from omnitok.world.cli import app as world_app

    app.add_typer(world_app, name="world")
    app.command("demo")(demo_command)

    from omnitok.tokenizers.cli import app as tokenizer_app

    app.add_typer(tokenizer_app, name="tokenizer")

    from omnitok.train.cli import train

    app.command("train")(train)

    from omnitok.data.cli import pretokenize

    app.command("pretokenize")(pretokenize)

    from omnitok.eval.cli import eval_command

    app.command("eval")(eval_command)

    from omnitok.serve.cli import serve_command

    app.command("serve")(serve_command)

    from omnitok.generate_cli import generate_command

    app.command("generate")(generate_command)


_register()


def main() -> None:
    """Console entry point: user errors become one clear line, not a traceback."""
    try:
        app(standalone_mode=False)
    except OmnitokError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.ClickException as e:  # bad flags, missing arguments: click's own clear message
        e.show()
        sys.exit(e.exit_code)
    except (typer.Exit, click.exceptions.Exit) as e:
        sys.exit(e.exit_code)
    except (typer.Abort, click.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
