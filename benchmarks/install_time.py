"""`make install` on a fresh clone, at an earlier git revision and at this one, side by side.

`make demo` pays for creating `.venv` from its 15 minutes (`omnitok demo --started-at`), so every second the install
takes is a second the LM does not train. Each round clones the repository twice into a temporary directory, one
clone per revision, and times `make install` in each (arms alternating, the order flipped every round, so that a
machine or network whose speed drifts drifts for both), then times importing what a demo step imports, twice: an
install that skips byte-compiling pays for it at every import when Python may not write `__pycache__`
(``PYTHONDONTWRITEBYTECODE``, as on this project's machines), once per process the demo starts.

    python benchmarks/install_time.py --baseline 2fb1d61 --rounds 2

Needs the network the install needs (PyPI); each clone's `.venv` (~1.7 GB) is removed before the next.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import command, machine, table

ROOT = Path(__file__).resolve().parents[1]

# What every process the demo starts imports before it works (the console script, torch, transformers' Llama).
IMPORTS = "import torch, transformers; from transformers import LlamaForCausalLM; import omnitok.cli, omnitok.demo"


def _timed(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="git revision for the baseline arm")
    ap.add_argument("--revision", default="HEAD", help="git revision for the other arm (committed work only)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds: expected at least 1, got {args.rounds}")
    revs = {}
    for name in (args.baseline, args.revision):
        res = subprocess.run(["git", "rev-parse", "--verify", f"{name}^{{commit}}"], cwd=ROOT, capture_output=True)
        if res.returncode != 0:
            raise SystemExit(f"{name!r} is not a git revision of {ROOT}")
        revs[name] = res.stdout.decode().strip()
    print(f"machine: {machine()}; PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}")
    print(command())
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in list(revs)[:: 1 if r % 2 == 0 else -1]:
                tree = Path(tmp) / f"r{r}-{revs[arm][:8]}"
                subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(tree)], check=True)
                subprocess.run(["git", "checkout", "-q", revs[arm]], check=True, cwd=tree)
                row = {"make install": _timed(["make", "install"], tree)}
                py = str(tree / ".venv" / "bin" / "python")
                row["first import"] = _timed([py, "-c", IMPORTS], tree)
                row["second import"] = _timed([py, "-c", IMPORTS], tree)
                for what, s in row.items():
                    times.setdefault((what, arm), []).append(s)
                print(f"round {r + 1} @ {arm}: " + ", ".join(f"{k} {v:.1f} s" for k, v in row.items()), flush=True)
                shutil.rmtree(tree)
    rows = []
    for what in ("make install", "first import", "second import"):
        base, now = (statistics.median(times[what, a]) for a in revs)
        rows.append([what, f"{base:.1f}", f"{now:.1f}", f"{base - now:.1f}", f"{base / now:.2f}x"])
    print(table(["step", f"s at {args.baseline}", f"s at {args.revision}", "saved (s)", "speed-up"], rows))
    print(json.dumps({f"{w} @ {a}": v for (w, a), v in times.items()}))


if __name__ == "__main__":
    main()
