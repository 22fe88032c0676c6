"""best_of's cost: its candidates decoded one batch per candidate (as first shipped) or all samples in one batch.

Both ways draw the plain picture and ``best_of - 1`` samples (temperature 0.7, top-k 64) per caption and keep the one
whose caption the model reads back likeliest; only how the samples are batched differs (and so which samples are
drawn: one generator stream over all rows, not a fresh seed per candidate). Side by side in one process, on the
same captions, each timed end to end (drawing, decoding to pixels, reading back):

    python benchmarks/best_of_speed.py runs/demo60p/bundle --world runs/demo60p/world --split test --limit 48

Reported per way: seconds, the ratio to the first way, and exact scenes (so a faster way is not a worse one).
"""

from __future__ import annotations

import argparse
import time

from _common import command, machine, scene_arguments, scene_split, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scene_arguments(ap, limit=48, split="test")
    ap.add_argument("--best-of", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16, help="captions a call (the evaluation's t2i batch)")
    args = ap.parse_args()

    from omnitok.eval.metrics import image_correct
    from omnitok.generate import BEST_OF_SAMPLING
    from omnitok.sequence import Image, Text

    model, samples, truth = scene_split(args)
    captions = [s["meta"]["captions"][0] for s in samples]

    def per_candidate(requests: list, seed: int = 0) -> list:
        """The first implementation: the plain drawing, then one generate_batch per sampled candidate."""
        rounds = [model.generate_batch(requests, output="image")]
        for k in range(1, args.best_of):
            rounds.append(model.generate_batch(requests, output="image", image=BEST_OF_SAMPLING, seed=seed + k))
        texts = [r[0].text for r in requests]
        scores = [model._read_back(r, texts) for r in rounds]
        return [rounds[max(range(len(rounds)), key=lambda r, i=i: scores[r][i])][i] for i in range(len(requests))]

    def batched(requests: list) -> list:
        return model.generate_batch(requests, output="image", best_of=args.best_of, seed=0)

    model.generate_batch([[Text(captions[0])]], output="image")  # warm-up: first-call costs out of both timings
    rows, base = [], None
    for name, draw in (("one batch per candidate (before)", per_candidate), ("samples in one batch", batched)):
        t0 = time.perf_counter()
        pictures = []
        for lo in range(0, len(captions), args.batch):
            for reply in draw([[Text(c)] for c in captions[lo : lo + args.batch]]):
                pictures.append(next(s for s in reply if isinstance(s, Image)).pixels)
        seconds = time.perf_counter() - t0
        base = base or seconds
        exact = sum(image_correct(p, t) for p, t in zip(pictures, truth, strict=True)) / len(truth)
        rows.append([name, f"{seconds:.1f}", f"{base / seconds:.2f}x", f"{exact:.3f}"])

    setup = f"{len(samples)} {args.split} scenes, best_of {args.best_of}, {args.batch} a call"
    print(f"{command()}\n{machine()}; {setup}\n")
    print(table(["candidates", "seconds", "speed vs before", "exact scenes"], rows))


if __name__ == "__main__":
    main()
