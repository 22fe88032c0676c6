"""The demo's fixed-size stages timed at an earlier git revision and in this checkout, side by side.

The demo's LM gets what the steps before it leave of the budget, so seconds saved in building the world, preparing
the speech tokenizer's features or pretokenizing are LM steps. Each stage runs here in a fresh Python process on
the same inputs, once with ``src/`` of this checkout and once with ``src/`` of ``--baseline`` (a temporary git
worktree), arms alternating over ``--rounds`` so that a machine whose speed drifts (a shared VM) drifts for both;
the stage times itself, imports excluded (the stages that start ``omnitok`` time it from outside, imports
included: that is what they measure).

    python benchmarks/pipeline_stages.py --demo runs/demo --baseline 735c389 --rounds 2
    python benchmarks/pipeline_stages.py --demo runs/demo21 --baseline 5348693 --rounds 2 \
        --stages 'a process spawned from omnitok' 'omnitok eval (30 a task, 1.44-min box)'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import command, machine, table

ROOT = Path(__file__).resolve().parents[1]

# Each stage: Python run in the child with {demo} and {out} formatted in; it prints the stage's seconds last.
STAGES = {
    "world build (--n 300)": """
import time
from pathlib import Path
from omnitok.world.build import WorldConfig, build_world
t = time.perf_counter()
build_world(Path("{out}") / "world", WorldConfig(n=300, seed=0), workers=None, overwrite=False)
print(time.perf_counter() - t)
""",
    "world build (--n 2000: the demo's)": """
import time
from pathlib import Path
from omnitok.world.build import WorldConfig, build_world
t = time.perf_counter()
build_world(Path("{out}") / "world2k", WorldConfig(n=2000, seed=0), workers=None, overwrite=False)
print(time.perf_counter() - t)
""",
    "speech tokenizer: features and F0 tables": """
import time
from omnitok.tokenizers import speech_train as st
from omnitok.tokenizers.speech import SpeechTokenizer
t = time.perf_counter()
clips = st.load_world_clips("{demo}/world", "train")
cfg = st.SpeechTrainConfig()
arch = st._arch_from_clips(cfg.arch, clips, "{demo}/world")
arch.f0_centroids = st.measure_f0_centroids(clips, cfg.f0_clips_per_class)
st._prepare(SpeechTokenizer(arch), clips, None)
print(time.perf_counter() - t)
""",
    # The tokenizers' training, their preparation excluded (the summary's train_seconds): the demo trains them in
    # time boxes, so a faster step is more steps.
    "image tokenizer: 150 training steps (the demo's shape)": """
from omnitok.demo import IMAGE_LEVELS
from omnitok.tokenizers.image import TrainConfig, train_image_tokenizer
cfg = TrainConfig(steps=150, checkpoint_every=1000, arch={{"levels": IMAGE_LEVELS}})
print(train_image_tokenizer("{demo}/world", "{out}/itok", cfg, progress=False)["train_seconds"])
""",
    "speech tokenizer: 40 training steps": """
from omnitok.tokenizers.speech_train import SpeechTrainConfig, train_speech_tokenizer
cfg = SpeechTrainConfig(steps=40, checkpoint_every=1000, val_clips=0)
print(train_speech_tokenizer("{demo}/world", "{out}/stok", cfg, progress=False)["train_seconds"])
""",
    "pretokenize": """
import time
from omnitok.data.pretokenize import pretokenize
t = time.perf_counter()
pretokenize("{demo}/world", "{out}/tokens", "{demo}/image_tokenizer", "{demo}/speech_tokenizer", seed=0)
print(time.perf_counter() - t)
""",
    # What starting a process costs where omnitok spawns one (a demo step, one of the evaluation's pocketsphinx
    # workers): its __main__ is the console script again (`from omnitok.cli import main`), imported before it works.
    "a process spawned from omnitok": """
import subprocess, sys
from pathlib import Path
main = Path("{out}") / "main.py"
main.write_text(
    "from omnitok.cli import main  # the console script's first line\\n"
    "import os, time\\n"
    "if __name__ == '__main__':\\n"
    "    from omnitok.demo import in_fresh_process\\n"
    "    t = time.perf_counter()\\n"
    "    in_fresh_process(os.getpid)\\n"
    "    print(time.perf_counter() - t)\\n"
)
print(subprocess.run([sys.executable, str(main)], check=True, capture_output=True, text=True).stdout)
""",
    # Examples scored per task are printed before the seconds: a faster suite scores more inside its box.
    "omnitok eval (30 a task, 1.44-min box)": """
import json, subprocess, sys, time
t = time.perf_counter()
subprocess.run(
    [sys.executable, "-m", "omnitok", "eval", "{demo}/bundle", "--data", "{demo}/world", "--out", "{out}/eval",
     "--limit", "30", "--max-minutes", "1.44"], check=True, capture_output=True,
)
seconds = time.perf_counter() - t
m = json.loads(open("{out}/eval/metrics.json").read())
print("scored", json.dumps({{k: v["n"]["all"] for k, v in m.items() if k != "_meta" and "n" in v}}))
print(seconds)
""",
}


def _run(src: Path, code: str, out: Path) -> tuple[float, list[str]]:
    """The stage's seconds (its last line of output) and whatever else it printed."""
    env = dict(os.environ, PYTHONPATH=str(src))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=out)
    if res.returncode != 0:
        raise SystemExit(f"stage failed with PYTHONPATH={src}:\n{res.stderr[-3000:]}")
    lines = res.stdout.strip().splitlines()
    return float(lines[-1]), lines[:-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", required=True, help="a finished demo directory (its world and tokenizers are read)")
    ap.add_argument("--baseline", required=True, help="git revision for the baseline arm")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--stages", nargs="*", default=list(STAGES), help=f"any of {list(STAGES)}")
    args = ap.parse_args()
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; known: {list(STAGES)}")
    demo = Path(args.demo).resolve()
    print(f"machine: {machine()}")
    print(command())
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline], check=True, cwd=ROOT)
        try:
            arms = {args.baseline: tree / "src", "now": ROOT / "src"}
            for r in range(args.rounds):
                for stage in args.stages:
                    # the order flips each round, so that neither arm always runs right after the other
                    for arm, src in list(arms.items())[:: 1 if r % 2 == 0 else -1]:
                        out = Path(tmp) / f"{arm}-{r}-{args.stages.index(stage)}"
                        out.mkdir()
                        code = STAGES[stage].format(demo=demo, out=out)
                        seconds, said = _run(src, code, out)
                        times.setdefault((stage, arm), []).append(seconds)
                        print(f"round {r + 1} {stage} @ {arm}: {seconds:.1f} s", *said, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False, cwd=ROOT)
    rows = []
    for stage in args.stages:
        base, now = (statistics.median(times[stage, a]) for a in (args.baseline, "now"))
        rows.append([stage, f"{base:.1f}", f"{now:.1f}", f"{base - now:.1f}", f"{base / now:.2f}x"])
    print(table(["stage", f"s at {args.baseline}", "s now", "saved (s)", "speed-up"], rows))
    print(json.dumps({f"{s} @ {a}": v for (s, a), v in times.items()}))


if __name__ == "__main__":
    main()
