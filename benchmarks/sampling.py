"""How the test metrics depend on each modality's sampling: the same bundle, evaluated under several settings.

The evaluation decodes with the generation defaults (``omnitok.decoding``); this runs the suite's tasks once per
arm, each arm overriding some modalities with the same ``MODALITY=VALUE`` syntax as ``omnitok eval
--temperature/--top-k``, and prints one table of the metrics side by side. Same bundle, test examples and seed in
every arm, so only the sampling differs.

    python benchmarks/sampling.py BUNDLE --data WORLD --tasks t2i,tts --limit 50 \\
        --arm "before:image.temperature=1,speech.temperature=0.7" --arm "shipped:" --arm "greedy:speech.temperature=0"
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from _common import command, machine, table
from omnitok.decoding import sampling_overrides
from omnitok.errors import OmnitokError
from omnitok.eval.suite import EvalConfig, evaluate

FIELDS = ("temperature", "top_k", "top_p")


def parse_arm(spec: str) -> tuple[str, dict]:
    """``NAME:image.temperature=1,speech.top_k=16`` -> (NAME, {modality: Sampling}); nothing after ``:`` = defaults."""
    name, sep, rest = spec.partition(":")
    if not sep or not name:
        raise OmnitokError(f"--arm {spec!r}: expected NAME:[MODALITY.FIELD=VALUE,...]")
    values: dict[str, list[str]] = {f: [] for f in FIELDS}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, _, value = item.partition("=")
        modality, _, field_name = key.partition(".")
        if field_name not in FIELDS:
            raise OmnitokError(f"--arm {spec!r}: {key!r} is not MODALITY.FIELD with FIELD one of {list(FIELDS)}")
        values[field_name].append(f"{modality}={value}")
    return name, sampling_overrides(values["temperature"], values["top_k"], values["top_p"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True, help="the world whose test split is evaluated")
    ap.add_argument("--tasks", required=True, help="comma-separated suite tasks, e.g. t2i,edit,tts")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arm", action="append", required=True, help="NAME:MODALITY.FIELD=VALUE,... (repeatable)")
    args = ap.parse_args()
    import omnitok

    arms = [parse_arm(a) for a in args.arm]
    torch.set_num_threads(args.threads)
    model = omnitok.load(args.bundle)
    rows, names = [], None
    for name, sampling in arms:
        cfg = EvalConfig(limit=args.limit, tasks=args.tasks.split(","), seed=args.seed, sampling=sampling)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            metrics = evaluate(model, args.data, out, cfg)
        scores = {k: v["all"] for k, v in metrics.items() if not k.startswith("_")}
        names = names or list(scores)
        rows.append([name, *[scores[k] for k in names], round(time.perf_counter() - t0)])
        print(f"{name}: {scores}", flush=True)
    print(f"\n{command()}\n{machine()}, {args.threads} torch threads; n = {args.limit} test examples per task\n")
    print(table(["arm", *(names or []), "s"], rows))


if __name__ == "__main__":
    main()
