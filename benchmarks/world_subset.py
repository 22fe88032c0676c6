"""A copy of a built world that holds only what ``omnitok eval --limit N`` reads, to take it where 1.6 GB cannot go.

The evaluation reads the first ``N`` test samples of each kind (in shard order) and, for pocketsphinx's domain
language model, the texts of the train split's first scenes and spoken questions. This copies exactly those: the
test split's first ``--keep`` samples of each kind (whole: pictures, speech), and the train shards the transcriber
reads through, texts only. An evaluation with ``--limit`` at most ``--keep`` scores the same examples with the same
transcriber on the copy as on the whole world (checked in docs/BENCHMARKS.md, "The GPU recipe on an H200").

    python benchmarks/world_subset.py runs/demo60p/world runs/world-eval50 --keep 52

Used to carry a demo's world to a lent GPU machine (the tool that ships the working tree takes 64 MiB): the
8,000-scene world is 1.6 GB, this copy of it 22 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tarfile
from pathlib import Path

# Train shards the transcriber reads through (omnitok.eval.suite.Suite.transcriber: > 4,000 captions at 3 a scene,
# then > 2,000 questions and answers at 2 a sample; 500 samples a shard): more are harmless, fewer change its LM.
TRANSCRIBER_SHARDS = {"scene": 3, "spoken_qa": 2}


def _copy(src: Path, dst: Path, path: str, limit: int | None, texts_only: bool) -> int:
    """Copy the first ``limit`` samples of one WebDataset shard; returns how many it holds."""
    (dst / path).parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    with tarfile.open(src / path) as tin, tarfile.open(dst / path, "w") as tout:
        for member in tin:
            key, ext = member.name.split(".", 1)
            if not keys or keys[-1] != key:
                if limit is not None and len(keys) >= limit:
                    break
                keys.append(key)
            if texts_only and ext != "json":
                continue
            tout.addfile(member, tin.extractfile(member))
    return len(keys)


def subset(src: Path, dst: Path, keep: int) -> dict:
    manifest = json.loads((src / "manifest.json").read_text())
    if manifest.get("format") != "omnitok-world":
        raise SystemExit(f"{src} is not a built omnitok world (manifest.json field 'format')")
    if dst.exists():
        raise SystemExit(f"{dst} exists: choose a new directory")
    shards: dict[str, list] = {"train": [], "val": [], "test": []}
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}

    def add(split: str, shard: dict, limit: int | None, texts_only: bool) -> None:
        n = _copy(src, dst, shard["path"], limit, texts_only)
        sha = hashlib.sha256((dst / shard["path"]).read_bytes()).hexdigest()
        shards[split].append({"count": n, "kind": shard["kind"], "path": shard["path"], "sha256": sha})
        counts[split][shard["kind"]] = counts[split].get(shard["kind"], 0) + n

    first = {}
    for shard in manifest["shards"]["test"]:
        first.setdefault(shard["kind"], shard)
    for shard in first.values():
        add("test", shard, keep, texts_only=False)
    left = dict(TRANSCRIBER_SHARDS)
    for shard in manifest["shards"]["train"]:
        if left.get(shard["kind"], 0) > 0:
            left[shard["kind"]] -= 1
            add("train", shard, None, texts_only=True)
    manifest.update(shards=shards, counts=counts, subset_of=str(src), subset_keep=keep)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if (src / "config.json").exists():
        (dst / "config.json").write_text((src / "config.json").read_text())
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("world", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--keep", type=int, default=52, help="test samples per kind (at least the eval's --limit)")
    args = ap.parse_args()
    counts = subset(args.world, args.out, args.keep)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {size / 1e6:.1f} MB; samples {counts}")


if __name__ == "__main__":
    main()
