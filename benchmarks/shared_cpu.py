"""The pipeline's CPU steps on a machine another process also uses: how torch's OpenMP threads wait.

torch's CPU build runs its operators on libgomp, whose threads spin while they wait for the next parallel region
(OMP_WAIT_POLICY unset). When another process holds one of the cores, the spinning thread takes the core from the
one that has work, and every operator waits for the scheduler. Arms: all cores with libgomp's default waiting, all
cores with ``OMP_WAIT_POLICY=PASSIVE`` (a waiting thread sleeps), all cores with each ``--spincounts`` value of
``GOMP_SPINCOUNT`` (a shorter spin), only the cores not held, and the cores ``omnitok.threads.auto_threads`` finds
free as the step starts (what omnitok's heavy steps now run on); each on the idle machine and with ``--busy`` cores
held by busy loops (``--loads``); each measurement in a fresh process, arms alternating:

    python benchmarks/shared_cpu.py --demo runs/demo23 --rounds 2
    python benchmarks/shared_cpu.py --demo runs/demo23 --rounds 2 --arms default free \
        --steps "LM training (8 steps of the demo's recipe)" "generation (8 captions and 8 pictures)"
    python benchmarks/shared_cpu.py --demo runs/demo23 --rounds 3 --spincounts 10000 --loads idle \
        --steps "image tokenizer training (40 steps, the demo's shape)" "LM training (8 steps of the demo's recipe)"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import command, machine, table

# Generation, timed inside work(), which {run} calls on the main thread or on a thread of its own.
GENERATION = """
import threading, time, torch
torch.set_num_threads({threads})
import omnitok
from omnitok.sequence import Image, Text
from omnitok.world.read import iter_samples
model = omnitok.load("{demo}/bundle")
scenes = [s for _, s in zip(range(8), iter_samples("{demo}/world", "test", "scene"))]
took = []
def work():
    t = time.perf_counter()
    model.generate_batch([[Image(pixels=s["png"]), Text("Describe the picture.")] for s in scenes], output="text")
    model.generate_batch([[Text(s["meta"]["captions"][0])] for s in scenes], output="image")
    took.append(time.perf_counter() - t)
{run}
print(took[0])
"""
# Each step: Python run in a fresh process with {demo}, {out} and {threads} formatted in; it prints its seconds last.
# {threads} is a number, or FREE: the threads chosen in that process, from the cores free as it starts.
FREE = "auto_threads()"
PRELUDE = "from omnitok.threads import auto_threads\n"
STEPS = {
    "pretokenize (the world's val split)": """
import time, torch
torch.set_num_threads({threads})
from omnitok.data.pretokenize import pretokenize
t = time.perf_counter()
pretokenize("{demo}/world", "{out}/tokens", "{demo}/image_tokenizer", "{demo}/speech_tokenizer", splits=["val"],
            text_tokenizer="{demo}/tokens/text_tokenizer", seed=0)
print(time.perf_counter() - t)
""",
    "LM training (8 steps of the demo's recipe)": """
import time, torch
from dataclasses import replace
from pathlib import Path
torch.set_num_threads({threads})
from omnitok.train.loop import measure_throughput
from omnitok.train.recipe import load_recipe
recipe = replace(load_recipe("recipes/toyworld.yaml"), data=Path("{demo}/tokens"), out=Path("{out}/lm"))
speed = measure_throughput(recipe, steps=8, warmup=2)
print(8 * 2048 / speed)
""",
    "image tokenizer training (40 steps, the demo's shape)": """
import torch
from omnitok.demo import IMAGE_LEVELS
from omnitok.tokenizers.image import TrainConfig, train_image_tokenizer
cfg = TrainConfig(steps=40, max_images=512, val_images=32, threads={threads}, arch={{"levels": IMAGE_LEVELS}})
print(train_image_tokenizer("{demo}/world", "{out}/itok", cfg, progress=False)["train_seconds"])
""",
    "generation (8 captions and 8 pictures)": GENERATION.replace("{run}", "work()"),
    # The same work on a thread that is not the process's first, as `omnitok serve`'s worker runs it.
    "generation on a worker thread (as the server runs it)": GENERATION.replace(
        "{run}", "worker = threading.Thread(target=work)\nworker.start()\nworker.join()"
    ),
}
BUSY = "while True: pass"


def _run(code: str, out: Path, env_over: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | env_over
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1], env=env
    )
    if res.returncode != 0:
        raise SystemExit(f"step failed:\n{res.stderr[-3000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", required=True, help="a finished demo directory (world, tokenizers, tokens, bundle)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", nargs="*", default=list(STEPS), help=f"any of {list(STEPS)}")
    ap.add_argument("--busy", type=int, default=1, help="cores the competing busy loops hold")
    ap.add_argument("--spincounts", type=int, nargs="*", default=[], help="GOMP_SPINCOUNT arms to add")
    ap.add_argument("--loads", nargs="*", default=["idle", "busy"], help="idle and/or busy")
    ap.add_argument(
        "--arms", nargs="*", default=["default", "passive", "fewer", "free"], help="default, passive, fewer, free"
    )
    args = ap.parse_args()
    demo = Path(args.demo).resolve()
    cores = os.cpu_count() or 1
    free = max(1, cores - args.busy)
    print(f"machine: {machine()}")
    print(command())
    # (label, threads, environment): libgomp's default spins up to 300,000 PAUSE instructions before it sleeps
    named = {
        "default": (f"{cores} threads, spinning (libgomp default)", cores, {}),
        "passive": (f"{cores} threads, OMP_WAIT_POLICY=PASSIVE", cores, {"OMP_WAIT_POLICY": "PASSIVE"}),
        "fewer": (f"{free} thread(s)", free, {}),
        "free": ("the cores free at the step's start (auto_threads)", FREE, {}),
    }
    kinds = [named[a] for a in args.arms if a != "free" and a != "fewer"]
    kinds += [(f"{cores} threads, GOMP_SPINCOUNT={n}", cores, {"GOMP_SPINCOUNT": str(n)}) for n in args.spincounts]
    kinds += [named[a] for a in args.arms if a in ("fewer", "free")]
    arms = [(load, kind) for load in args.loads for kind in kinds]
    times: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for step in args.steps:
                for k, (load, (label, threads, env)) in enumerate(arms if r % 2 == 0 else arms[::-1]):
                    out = Path(tmp) / f"{r}-{args.steps.index(step)}-{k}"
                    out.mkdir()
                    hogs = [
                        subprocess.Popen([sys.executable, "-c", BUSY])
                        for _ in range(args.busy if load == "busy" else 0)
                    ]
                    try:
                        time.sleep(0.5 if hogs else 0)
                        code = PRELUDE + STEPS[step].format(demo=demo, out=out, threads=threads)
                        seconds = _run(code, out, env)
                    finally:
                        for h in hogs:
                            h.kill()
                            h.wait()
                    times.setdefault((step, load, label), []).append(seconds)
                    print(f"round {r + 1} {step}, {load}, {label}: {seconds:.1f} s", flush=True)
    rows = []
    for step in args.steps:
        for load in args.loads:
            base = statistics.median(times[step, load, kinds[0][0]])
            held = f"{load} ({args.busy if load == 'busy' else 0} of {cores} cores held)"
            for label, _, _ in kinds:
                t = times[step, load, label]
                each = " / ".join(f"{x:.1f}" for x in t)
                rows.append(
                    [step, held, label, f"{statistics.median(t):.1f}", each, f"{base / statistics.median(t):.2f}x"]
                )
    print(table(["step", "machine", "threads", "s (median)", "each", "speed-up"], rows))
    print(json.dumps({" | ".join(k): v for k, v in times.items()}))


if __name__ == "__main__":
    main()
