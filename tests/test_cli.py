"""The ``omnitok`` command line itself: what starting it costs, and how it answers a mistyped command."""

from __future__ import annotations

import os
import subprocess
import sys

from omnitok.cli import COMMANDS, SUMMARIES, app


def _omnitok(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "omnitok", *args], capture_output=True, text=True, timeout=120)


def test_importing_the_cli_imports_no_sub_command():
    # Every process omnitok spawns imports the CLI again as its __main__; torch, transformers and scipy there cost
    # each of them seconds before it began its own work.
    code = "import sys, omnitok.cli; print(sorted(m for m in ('torch', 'transformers', 'scipy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_every_sub_command_resolves_and_is_listed():
    from typer.main import get_command

    group = get_command(app)
    assert group.list_commands(None) == list(COMMANDS)
    for name in COMMANDS:
        cmd = group.get_command(None, name)
        assert cmd is not None and cmd.name == name, name
    assert group.get_command(None, "nope") is None
    help_text = _omnitok("--help").stdout
    assert all(name in help_text for name in COMMANDS)
    assert "world build" not in help_text and "Usage" in _omnitok("world", "build", "--help").stdout


def test_the_listing_imports_nothing_and_is_each_command_s_own_help():
    # `omnitok --help` lists the commands from SUMMARIES; with every command built it lists their own help.
    listing = (
        "import sys\n"
        "from typer.main import get_command\n"
        "from omnitok.cli import COMMANDS, SUMMARIES, app\n"
        "group = get_command(app)\n"
        "if sys.argv[1] == 'built':\n"
        "    for name in COMMANDS:\n"
        "        group.get_command(None, name)\n"
        "try:\n"
        "    group.main(['--help'], prog_name='omnitok')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('imported:', sorted(m for m in ('torch', 'transformers', 'scipy') if m in sys.modules))\n"
    )
    env = {**os.environ, "COLUMNS": "100", "TERM": "dumb"}
    lazy, built = (
        subprocess.run(
            [sys.executable, "-c", listing, arm], capture_output=True, text=True, timeout=120, check=True, env=env
        ).stdout
        for arm in ("lazy", "built")
    )
    assert lazy.endswith("imported: []\n"), lazy
    assert "'torch'" in built.rsplit("imported:", 1)[1]
    assert lazy.rsplit("imported:", 1)[0] == built.rsplit("imported:", 1)[0]
    assert SUMMARIES["world"] in lazy and all(f"│ {name} " in lazy for name in COMMANDS)


def test_usage_errors_are_one_clear_message_not_a_traceback():
    for args, message in [
        (["trian"], "No such command 'trian'. Did you mean 'train'?"),
        (["eval"], "Missing argument"),
        (["world", "build", "--n", "abc"], "Invalid value for '--n'"),
    ]:
        done = _omnitok(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
