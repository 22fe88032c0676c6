"""World build throughput: scene samples (image + annotations + spoken caption) per second.

Target (issue 2): 10,000 scene samples with speech in under 3 minutes on a 2-core machine. The run builds
only the `scene` kind so the number is exactly that; `--all-kinds` adds the other kinds for the full world.

    python benchmarks/world_build.py --n 10000 --out /tmp/omnitok-bench-world
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from _common import command, machine, table
from omnitok.world.build import DEFAULT_KIND_RATIOS, WorldConfig, build_world


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/omnitok-bench-world"))
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--all-kinds", action="store_true")
    args = ap.parse_args()
    rows = []
    for speech in (True, False):
        shutil.rmtree(args.out, ignore_errors=True)
        ratios = dict(DEFAULT_KIND_RATIOS) if args.all_kinds else {"scene": 1.0}
        cfg = WorldConfig(n=args.n, seed=0, speech=speech, kind_ratios=ratios)
        t0 = time.perf_counter()
        manifest = build_world(args.out, cfg, workers=args.workers or None)
        wall = time.perf_counter() - t0
        samples = sum(sum(c.values()) for c in manifest["counts"].values())
        size_mb = sum(p.stat().st_size for p in args.out.rglob("*.tar")) / 1e6
        rows.append(["yes" if speech else "no", samples, wall, samples / wall, size_mb])
    shutil.rmtree(args.out, ignore_errors=True)
    print(f"machine: {machine()}\ncommand: {command()}\n")
    print(table(["speech", "samples", "wall s", "samples/s", "shards MB"], rows))


if __name__ == "__main__":
    main()
