"""Guidance for reading: exact captions by guidance scale, split into seen and held-out compositions.

Each scene's picture is described ("Describe the picture.", greedy) with ``text_cfg_scale`` at each ``--scales``
value: the conditional row against the same request without its picture, among the tokens the conditional row finds
plausible (``omnitok.decoding.guided_reading``). Held-out colour-shape pairs never occur in training text, so the
text's habits talk a captioner out of them ("a yellow circle" comes out "a yellow square"); guidance subtracts
those habits. A bundle whose captions were trained with the picture sometimes dropped
(``omnitok.data.tasks.CAPTION_IMAGE_DROP``) knows them; one trained without has only an untrained guess.
The scale is off by default (it helped a 60-minute bundle and hurt a 15-minute one): this is how one is chosen.

    python benchmarks/read_guidance.py runs/demo/bundle --world runs/demo/world --split val --limit 150 \\
        --scales 1 2 3 5 10
"""

from __future__ import annotations

import argparse
import time

from _common import command, machine, scene_arguments, scene_split, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scene_arguments(ap, limit=150)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 10.0])
    args = ap.parse_args()

    from omnitok.eval import metrics as M
    from omnitok.eval.suite import write_captions

    model, samples, truth = scene_split(args)
    held = [bool(s["meta"]["heldout_combo"]) for s in samples]
    rows = []
    for scale in args.scales:
        t0 = time.perf_counter()
        texts = write_captions(model, samples, text_cfg_scale=scale)
        seconds = time.perf_counter() - t0
        exact = [M.caption_correct(t, s) for t, s in zip(texts, truth, strict=True)]
        f1 = [M.caption_object_f1(t, s) for t, s in zip(texts, truth, strict=True)]

        def mean(xs: list, want: bool | None = None) -> float:
            pick = [x for x, h in zip(xs, held, strict=True) if want is None or h == want]
            return sum(pick) / max(len(pick), 1)

        rows.append(
            [
                scale,
                round(mean(exact), 3),
                round(mean(exact, False), 3),
                round(mean(exact, True), 3),
                round(mean(f1), 3),
                round(mean(f1, True), 3),
                round(seconds, 1),
            ]
        )
    print(f"\n{command()}\n{machine()}; {len(samples)} {args.split} scenes, {sum(held)} with a held-out pair")
    drop = model.bundle.caption_image_drop
    print(f"captions trained without their picture: {drop}\n")
    headers = ["text_cfg_scale", "exact", "seen", "held-out", "object F1", "held-out F1", "seconds"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
