"""How well the scene parser reads clean and degraded renders.

The parser scores generated images, so its own accuracy bounds every image metric: exact match on clean
renders of the world's test distribution (held-out compositions included), and graded per-attribute F1 as
images are blurred, noised or JPEG-compressed (what imperfect generators produce).

    python benchmarks/parser_robustness.py --clean 2000 --degraded 500
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image, ImageFilter

from _common import command, machine, table
from omnitok.world.build import HELDOUT_COMBOS
from omnitok.world.parser import parse_scene, score_scene
from omnitok.world.scene import render_image, sample_scene


def blur(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma)))


def noise(img: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img + rng.normal(0, std, img.shape), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(buf).convert("RGB"))


def evaluate(scenes, images) -> dict[str, float]:
    scores = [score_scene(parse_scene(img), s) for s, img in zip(scenes, images, strict=True)]
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clean", type=int, default=2000)
    ap.add_argument("--degraded", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    # the test distribution: 30 % of scenes forced to show a held-out colour+shape pair
    scenes = []
    for _ in range(args.clean):
        require = HELDOUT_COMBOS[rng.integers(len(HELDOUT_COMBOS))] if rng.random() < 0.3 else None
        scenes.append(sample_scene(rng, require=require))
    images = [render_image(s) for s in scenes]
    t0 = time.perf_counter()
    clean = evaluate(scenes, images)
    per_image_ms = 1000 * (time.perf_counter() - t0) / len(scenes)
    held = [i for i, s in enumerate(scenes) if any((o.color, o.shape) in HELDOUT_COMBOS for o in s)]
    clean_held = evaluate([scenes[i] for i in held], [images[i] for i in held])

    print(f"machine: {machine()}\ncommand: {command()}\n")
    print(
        f"clean renders: {len(scenes)} scenes, exact match {clean['exact']:.4f} "
        f"(held-out combos: {clean_held['exact']:.4f} on {len(held)}), {per_image_ms:.1f} ms/image\n"
    )
    rows = [
        [
            "clean",
            "-",
            clean["exact"],
            clean["object_f1"],
            clean["shape_f1"],
            clean["color_f1"],
            clean["size_f1"],
            clean["cell_f1"],
        ]
    ]
    sub_s, sub_i = scenes[: args.degraded], images[: args.degraded]
    for name, fn, levels in (
        ("gaussian blur (sigma px)", blur, (0.5, 1.0, 1.5, 2.0)),
        ("gaussian noise (std)", noise, (10, 20, 40, 60)),
        ("JPEG (quality)", jpeg, (90, 75, 50, 25, 10)),
    ):
        for level in levels:
            r = evaluate(sub_s, [fn(img, level, rng) for img in sub_i])
            rows.append(
                [name, level, r["exact"], r["object_f1"], r["shape_f1"], r["color_f1"], r["size_f1"], r["cell_f1"]]
            )
    print(table(["degradation", "level", "exact", "object F1", "shape F1", "color F1", "size F1", "cell F1"], rows))


if __name__ == "__main__":
    main()
