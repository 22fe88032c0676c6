"""A tokenizer in the demo's time box: does its learning rate want to decay with the box or with its steps?

The demo trains each tokenizer for a share of its budget (``omnitok.demo.SHARES``), which on two cores stops the
speech tokenizer at a fifth to a half of its 1,200 steps and the image tokenizer at two fifths to four fifths of its
1,800. The image tokenizer's cosine decays with whichever is further along, its steps or its time budget, so it ends
annealed; the speech tokenizer's decays with its steps alone, so it ends near its peak rate. Each arm trains one
tokenizer on the same world exactly as the demo's step does (in a fresh process, with ``max_minutes``), with its
shipped schedule or the other one patched in for that process, and reports its own validation (speech: mel L1 and
the phone error of its CTC head; image: PSNR and SSIM; score an image arm's scenes with
``benchmarks/image_tokenizer.py --tokenizer OUT/ARM/tokenizer``).

    python benchmarks/tokenizer_box.py speech --world runs/demo/world --minutes 1.2 --minutes 2.4 --out runs/box

Within each box the two schedules alternate, so a drifting machine hits both alike; an arm already trained is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

from _common import command, machine, table

SCHEDULES = ("steps", "time")
SHIPPED = {"speech": "steps", "image": "time"}


def train_arm(kind: str, world: Path, out: Path, minutes: float, schedule: str, seed: int) -> dict:
    """One tokenizer in its box (runs in a fresh process), with ``schedule`` patched in where it is not shipped."""
    if kind == "image":
        from omnitok.demo import IMAGE_LEVELS
        from omnitok.tokenizers import image as module

        train = replace(module.TrainConfig(), max_minutes=minutes, seed=seed, arch={"levels": IMAGE_LEVELS})
        shipped = module.lr_at
        if schedule == "steps":  # the box's time never further along than the steps
            module.lr_at = lambda step, cfg, elapsed_s=0.0: shipped(step, cfg, 0.0)
        return module.train_image_tokenizer(world, out, train, progress=False)

    from omnitok.tokenizers import speech_train as module

    train = replace(module.SpeechTrainConfig(), max_minutes=minutes, seed=seed)
    shipped = module.lr_at
    if schedule == "time":  # the loop passes no time: the box's clock starts at the first step's rate
        started: list[float] = []

        def timed(step: int, cfg) -> float:
            started[:] = started or [time.perf_counter()]
            t = (time.perf_counter() - started[0]) / (cfg.max_minutes * 60)
            # the step the box's time has reached: the shipped cosine there, or at the step itself if that is lower
            reached = cfg.warmup_steps + math.ceil(t * (cfg.steps - cfg.warmup_steps))
            return min(shipped(step, cfg), shipped(max(step, reached), cfg))

        module.lr_at = timed
    return module.train_speech_tokenizer(world, out, train, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=sorted(SHIPPED), help="which tokenizer")
    ap.add_argument("--world", type=Path, required=True, help="a built world (a demo's world/)")
    ap.add_argument("--minutes", type=float, action="append", required=True, help="a box to train in (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/tokenizer_box"))
    args = ap.parse_args()
    if not (args.world / "manifest.json").is_file():
        raise SystemExit(f"{args.world / 'manifest.json'} not found: pass a built world (omnitok world build)")
    if any(m <= 0 for m in args.minutes):
        raise SystemExit(f"--minutes must be above 0, got {args.minutes}")

    from omnitok.demo import in_fresh_process

    quality = ["mel_l1", "per", "codes_used"] if args.kind == "speech" else ["psnr", "ssim"]
    rows = []
    for minutes in args.minutes:
        for schedule in SCHEDULES:
            out = args.out / f"{args.kind}-{minutes:g}min-{schedule}"
            summary = out / "summary.json"
            if summary.is_file():
                result = json.loads(summary.read_text())
            else:
                result = in_fresh_process(train_arm, args.kind, args.world, out, minutes, schedule, args.seed)
            log = json.loads((out / "log.json").read_text())
            name = schedule + (" (shipped)" if schedule == SHIPPED[args.kind] else "")
            rows.append(
                [f"{minutes:g}", name, result["steps"], result["train_seconds"], f"{log[-1]['lr']:.2e}"]
                + [round(result["val"][k], 4) for k in quality]
            )
            print(f"measured {out.name}", flush=True)
    report = table(["box (min)", "lr decays with", "steps", "train s", "last lr", *quality], rows)
    text = f"{args.kind} tokenizer, {machine()}\n\n{report}\n\ncommand: {command()}\n"
    print("\n" + text)
    (args.out / f"{args.kind}.md").write_text(text)


if __name__ == "__main__":
    main()
