"""Shared bits for benchmark scripts: machine description and markdown tables."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def command() -> str:
    return "python " + " ".join(sys.argv)


def table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def scene_arguments(ap: argparse.ArgumentParser, limit: int = 200, split: str = "val") -> None:
    """The arguments of a benchmark that reads a bundle against one split of its world's scenes."""
    ap.add_argument("bundle")
    ap.add_argument("--world", required=True, help="the world the bundle was trained on")
    ap.add_argument("--split", default=split, help="val to decide, test to report")
    ap.add_argument("--limit", type=int, default=limit, help="scenes of the split")
    ap.add_argument("--threads", type=int, default=2)


def scene_split(args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]], list[Any]]:
    """The bundle, the split's first ``--limit`` scene samples, and their true scenes (for the parser's scores)."""
    import torch

    import omnitok
    from omnitok.world.read import iter_samples
    from omnitok.world.scene import scene_from_json

    torch.set_num_threads(args.threads)
    model = omnitok.load(str(args.bundle))
    scenes = iter_samples(args.world, args.split, "scene")
    samples = [s for _, s in zip(range(args.limit), scenes, strict=False)]
    if not samples:
        raise SystemExit(f"{args.world}: no {args.split} scenes")
    return model, samples, [scene_from_json(s["meta"]["scene"]) for s in samples]
