"""Drawing several pictures and keeping the one the model itself reads back best: how much would it buy?

The LM reads pictures far better than it draws them (60-minute demo: captions 0.62 exact, pictures 0.10-0.14). So for
each caption this draws candidates (greedy at a few guidance scales, and samples), scores each with the same LM
reading it back, and keeps the best:

- **caption log p**: log-probability of the caption as the answer to "Describe the picture." about the candidate
  (the captioning task's prompt; the t2i caption is the canonical wording the captioner was trained to write);
- **filter yes**: log-probability of "Yes." to "Does this caption match the picture? <caption>" (the
  caption_filter task);

and reports, per candidate set, exact scenes of each candidate alone, of the oracle (any candidate exact: the
ceiling of any re-ranker), and of each re-ranker.

    python benchmarks/image_rerank.py runs/demo60p/bundle --world runs/demo60p/world --split val --limit 200

A measurement for a decision (a ``best_of`` option for text-to-image), not a feature: nothing here is in the API.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import command, machine, scene_arguments, scene_split, table

FILTER_ASK = "Does this caption match the picture? "  # omnitok.data.tasks' caption_filter prompt
CAPTION_ASK = "Describe the picture."  # the evaluation's (and the first training) caption prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scene_arguments(ap)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.5, 2.0, 3.0], help="greedy candidates' guidance")
    ap.add_argument("--samples", type=int, default=4, help="sampled candidates (temperature 0.7, top-k 64, cfg 2)")
    args = ap.parse_args()

    from omnitok.decoding import Sampling
    from omnitok.eval.metrics import image_correct
    from omnitok.sequence import Image, Text

    model, samples, truth = scene_split(args)
    captions = [s["meta"]["captions"][0] for s in samples]

    def draw(**opts: object) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for lo in range(0, len(captions), 16):
            for reply in model.generate_batch([[Text(c)] for c in captions[lo : lo + 16]], output="image", **opts):
                img = next(s for s in reply if isinstance(s, Image))
                out.append((img.codes, img.pixels))
        return out

    t0 = time.perf_counter()
    candidates = {f"greedy, cfg {g:g}": draw(cfg_scale=g) for g in args.cfg}
    for seed in range(args.samples):
        sampled = Sampling(temperature=0.7, top_k=64)
        candidates[f"T 0.7, cfg 2, seed {seed}"] = draw(cfg_scale=2.0, seed=seed, image=sampled)
    drawn_s = time.perf_counter() - t0
    names = list(candidates)
    exact = {n: [image_correct(p, sc) for (_, p), sc in zip(candidates[n], truth, strict=True)] for n in names}

    t0 = time.perf_counter()
    caption_lp, filter_lp = {}, {}
    for n in names:
        pics = [c for c, _ in candidates[n]]
        caption_lp[n] = model.score(
            [
                [Image(codes=c, role="user"), Text(CAPTION_ASK, role="user"), Text(cap, role="assistant")]
                for c, cap in zip(pics, captions, strict=True)
            ]
        )
        filter_lp[n] = model.score(
            [
                [Image(codes=c, role="user"), Text(FILTER_ASK + cap, role="user"), Text("Yes.", role="assistant")]
                for c, cap in zip(pics, captions, strict=True)
            ]
        )
    scored_s = time.perf_counter() - t0

    rows = [[n, f"{np.mean(exact[n]):.3f}"] for n in names]
    pools = {f"the {len(args.cfg)} greedy": names[: len(args.cfg)], f"all {len(names)}": names}
    for label, pool in pools.items():
        oracle = np.mean([any(exact[n][i] for n in pool) for i in range(len(samples))])
        rows.append([f"oracle over {label}", f"{oracle:.3f}"])
        for scorer, score in (("caption log p", caption_lp), ("filter yes", filter_lp)):
            pick = [max(pool, key=lambda n, i=i: score[n][i]) for i in range(len(samples))]
            right = np.mean([exact[p][i] for i, p in enumerate(pick)])
            rows.append([f"best by {scorer} over {label}", f"{right:.3f}"])
    print(f"{command()}\n{machine()}; {len(samples)} {args.split} scenes")
    print(f"drawing {drawn_s:.0f} s, scoring {scored_s:.0f} s\n")
    print(table(["picture", "exact"], rows))


if __name__ == "__main__":
    main()
