"""Reading with the drawer: several captions of a picture, kept by how likely the model draws the picture from each.

The other direction of ``image_rerank.py``. For each test picture this writes candidate captions (the greedy one,
and samples at temperature 0.7 among the 32 likeliest tokens), scores each with the same LM, and keeps the best:

- **p(caption | picture)**: log-probability of the caption as the answer to "Describe the picture." (the reader);
- **p(picture | caption)**: log-probability of the picture's codes drawn from the caption (the drawer: a
  noisy-channel score, which asks whether the caption accounts for every object);
- **sum** of the two;

and reports exact captions (``omnitok.eval.metrics.caption_correct``) of each candidate, of the oracle (any
candidate exact) and of each re-ranker.

    python benchmarks/caption_rerank.py runs/demo60p/bundle --world runs/demo60p/world --split val --limit 200

A measurement for a decision, not a feature: nothing here is in the API.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import command, machine, scene_arguments, scene_split, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scene_arguments(ap)
    ap.add_argument("--candidates", type=int, default=6, help="the greedy caption and this many less one samples")
    args = ap.parse_args()

    from omnitok.decoding import Sampling
    from omnitok.eval import metrics as M
    from omnitok.eval.suite import CAPTION_ASK, write_captions
    from omnitok.sequence import Image, Text

    model, samples, truth = scene_split(args)
    codes = [c.numpy() for c in model.bundle.image.encode(torch.as_tensor(np.stack([s["png"] for s in samples])))]

    def write(**opts: object) -> list[str]:
        return write_captions(model, samples, **opts)

    t0 = time.perf_counter()
    sampled = Sampling(temperature=0.7, top_k=32)
    candidates = [write()] + [write(seed=k, text=sampled) for k in range(1, args.candidates)]
    written_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    n = len(samples)
    reader = [
        model.score(
            [
                [Image(codes=codes[i], role="user"), Text(CAPTION_ASK, role="user"), Text(c[i], role="assistant")]
                for i in range(n)
            ]
        )
        for c in candidates
    ]
    drawer = [
        model.score([[Text(c[i], role="user"), Image(codes=codes[i], role="assistant")] for i in range(n)])
        for c in candidates
    ]
    scored_s = time.perf_counter() - t0

    right = [[M.caption_correct(c[i], truth[i]) for i in range(n)] for c in candidates]
    rows = [["greedy" if k == 0 else f"T 0.7, seed {k}", f"{np.mean(right[k]):.3f}"] for k in range(len(candidates))]
    rows.append(["oracle: any candidate exact", f"{np.mean([any(r[i] for r in right) for i in range(n)]):.3f}"])
    both = [[a + b for a, b in zip(x, y, strict=True)] for x, y in zip(reader, drawer, strict=True)]
    for name, score in (
        ("the reader, p(caption given picture)", reader),
        ("the drawer, p(picture given caption)", drawer),
        ("their sum", both),
    ):
        pick = [max(range(len(candidates)), key=lambda k, i=i: score[k][i]) for i in range(n)]
        rows.append([f"best by {name}", f"{np.mean([right[k][i] for i, k in enumerate(pick)]):.3f}"])
    print(f"{command()}\n{machine()}; {n} {args.split} scenes; writing {written_s:.0f} s, scoring {scored_s:.0f} s\n")
    print(table(["caption", "exact"], rows))


if __name__ == "__main__":
    main()
