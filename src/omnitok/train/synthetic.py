"""A synthetic token directory, so the trainer can be tried, tested and benchmarked without a world or tokenizers.

Each task's documents are short runs of a task-specific arithmetic progression (learnable, so a loss curve
means something) with a prompt part that is not a training target, like an instruction sample. Lengths are
uniform in each task's range; the defaults mimic captions (short), images (a fixed-ish grid) and speech (long).

    python -m omnitok.train.synthetic runs/tiny-tokens
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from omnitok.data.shards import ShardWriter, write_manifest
from omnitok.io import atomic_write_json

DEFAULT_TASKS: dict[str, tuple[int, int]] = {"caption": (12, 48), "t2i": (60, 80), "asr": (30, 160)}


def write_synthetic_tokens(
    tokdir: str | Path,
    vocab_size: int = 256,
    tasks: Mapping[str, tuple[int, int]] = DEFAULT_TASKS,
    docs: int = 200,
    seed: int = 0,
    shards: int = 2,
    splits: tuple[str, ...] = ("train",),
) -> dict[str, Any]:
    """Write ``docs`` documents per task and split (lengths in ``[lo, hi]``) into ``shards`` shards each."""
    root = Path(tokdir)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "vocab.json", {"size": vocab_size, "note": "synthetic"})
    rng = np.random.default_rng(seed)
    for split in splits:
        for t, (task, (lo, hi)) in enumerate(tasks.items()):
            stride = 1 + t  # each task its own progression, so the model can tell tasks apart
            writers = [ShardWriter(root, split, task, rank) for rank in range(shards)]
            for d in range(docs):
                n = int(rng.integers(lo, hi + 1))
                ids = (int(rng.integers(vocab_size)) + stride * np.arange(n)) % vocab_size
                mask = np.ones(n, dtype=np.uint8)
                mask[: int(rng.integers(0, max(1, n // 3)))] = 0  # the "prompt": context, not a target
                writers[d % shards].add(ids, mask)
            for w in writers:
                w.close()
    return write_manifest(root, vocab_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    m = write_synthetic_tokens(args.out, vocab_size=args.vocab, docs=args.docs, seed=args.seed)
    print(f"wrote {sum(t['tokens'] for t in m['splits']['train'].values())} tokens to {args.out}")


if __name__ == "__main__":
    main()
