"""Where text-to-image loses its scenes: the codec's ceiling, the LM with the true codes before it, and generation.

Three readings of the same captions (a split's scenes: ``--split val`` to choose decoding settings, test to report
them), each scored by the scene parser (exact scene, and F1 per attribute anchored on the grid cell,
``omnitok.world.parser.score_scene``):

- **ceiling**: the image tokenizer's reconstruction of the true picture (what a perfect LM could reach);
- **teacher-forced**: the LM's most likely code at every position given the caption and the *true* codes before
  it (what it knows locally: errors here are knowledge, not drift);
- **generated**: what the bundle draws, greedy, at each ``--cfg`` scale (drift and guidance on top of that).

    python benchmarks/image_writing.py runs/demo/bundle --world runs/demo/world --limit 64 --cfg 1 3 6

A gap between the ceiling and teacher-forced is what the LM has not learned. Teacher forcing also hands the LM each
object's first true codes, which say what the object is, so a gap between teacher-forced and generated is either
drift (errors compounding from its own codes) or objects started wrong; the second table tells them apart, by
objects in raster order and the second one given the first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from _common import command, machine, scene_arguments, scene_split, table

KEYS = ("exact", "count", "cell_f1", "color_f1", "shape_f1", "size_f1", "object_f1")


def _scores(preds: list, truth: list) -> list[float]:
    from omnitok.world.parser import score_scene

    graded = [score_scene(p, t) for p, t in zip(preds, truth, strict=True)]
    return [round(statistics.mean(g[k] for g in graded), 3) for k in KEYS]


def _by_object(preds: list, truth: list) -> list[str]:
    """Share of each scene's 1st, 2nd, 3rd object (raster order of its cell) drawn right; the 2nd's given the 1st.

    Drift (errors compounding from the model's own earlier codes) makes the 2nd object depend on the 1st; a model
    that cannot start an object with the caption's attributes fails the 2nd whatever the 1st.
    """
    ranks: list[list[bool]] = [[], [], []]
    given: dict[bool, list[bool]] = {True: [], False: []}
    for p, t in zip(preds, truth, strict=True):
        drawn = {o.cell: o.key() for o in p}
        right = [drawn.get(o.cell) == o.key() for o in sorted(t, key=lambda o: o.cell)]
        for k, r in enumerate(right[:3]):
            ranks[k].append(r)
        if len(right) >= 2:
            given[right[0]].append(right[1])

    def share(xs: list[bool]) -> str:
        return f"{statistics.mean(xs):.2f} (n={len(xs)})" if xs else "-"

    return [share(r) for r in ranks] + [share(given[True]), share(given[False])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scene_arguments(ap, limit=64, split="test")
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales to generate with")
    args = ap.parse_args()

    from omnitok.sequence import Image, Text, encode
    from omnitok.vocab import SPAN_TOKENS
    from omnitok.world.parser import parse_scene

    model, samples, truth = scene_split(args)
    if model.bundle.image is None:
        raise SystemExit(f"{args.bundle}: this bundle has no image tokenizer")
    tok, vocab, lm = model.bundle.image, model.vocab, model.lm
    captions = [s["meta"]["captions"][0] for s in samples]  # the canonical wording, as omnitok eval's t2i asks
    codes = tok.encode(torch.as_tensor(np.stack([s["png"] for s in samples])))
    rows = [
        [
            "ceiling (tokenizer reconstruction)",
            "-",
            *_scores([parse_scene(tok.decode(c).numpy()) for c in codes], truth),
        ]
    ]

    r = vocab.code_range("image")
    opener = vocab.special(SPAN_TOKENS["image"][0])
    forced, nll, right = [], [], []
    with torch.inference_mode():
        for caption, c in zip(captions, codes, strict=True):
            enc = encode(
                [Text(caption, role="user"), Image(codes=c.numpy(), role="assistant")], vocab, model.bundle.text
            )
            at = int(np.flatnonzero(enc.ids == opener)[0])
            logits = lm(torch.as_tensor(enc.ids)[None]).logits[0, at : at + len(c), r.start : r.stop].float()
            nll.append(float(torch.nn.functional.cross_entropy(logits, c)))
            best = logits.argmax(-1)
            right.append(float((best == c).float().mean()))
            forced.append(parse_scene(tok.decode(best).numpy()))
    tf = f"nll {statistics.mean(nll):.3f}/code, argmax = true code {statistics.mean(right):.3f}"
    rows.append(["teacher-forced (true codes before each)", tf, *_scores(forced, truth)])
    objects = [["teacher-forced", *_by_object(forced, truth)]]

    for scale in args.cfg:
        t0 = time.perf_counter()
        drawn = []
        for lo in range(0, len(captions), 16):
            outs = model.generate_batch([[Text(c)] for c in captions[lo : lo + 16]], output="image", cfg_scale=scale)
            for out in outs:
                img = next((s for s in out if isinstance(s, Image) and s.pixels is not None), None)
                drawn.append(parse_scene(img.pixels) if img is not None else ())
        rows.append([f"generated, greedy, cfg {scale:g}", f"{time.perf_counter() - t0:.0f} s", *_scores(drawn, truth)])
        objects.append([f"generated, cfg {scale:g}", *_by_object(drawn, truth)])

    print(f"{command()}\n{machine()}; {len(samples)} {args.split} scenes\n")
    print(table(["reading", "note", *KEYS], rows))
    print("\nObjects drawn right (shape, colour, size and cell), by their cell's raster order:\n")
    print(table(["reading", "1st", "2nd", "3rd", "2nd if 1st right", "2nd if 1st wrong"], objects))


if __name__ == "__main__":
    main()
