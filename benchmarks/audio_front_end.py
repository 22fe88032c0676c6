"""The audio analyses the pipeline runs on every clip, against the same modules at an earlier git revision.

Pretokenizing computes a log-mel per clip, the speech tokenizer's preparation a log-mel and an F0 contour per clip
and a median F0 per style class, the TTS decoder (and the streaming first chunk) Griffin-Lim, the evaluation's
style check a median F0 per clip. Each is timed here on the same clips twice, once with this checkout's
``omnitok.tokenizers.mel`` / ``pitch`` / ``omnitok.world.speech`` and once with those files as they were at
``--baseline`` (read with ``git show``, imported beside the current package), arms interleaved over ``--rounds``;
the table gives seconds per clip (median over rounds), the ratio, and the largest difference between the outputs.

    python benchmarks/audio_front_end.py --world runs/demo/world --baseline 735c389 --clips 200
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from _common import command, machine, table
from omnitok.tokenizers import mel as mel_now
from omnitok.tokenizers import pitch as pitch_now
from omnitok.world import speech as speech_now

FILES = {
    "mel": "src/omnitok/tokenizers/mel.py",
    "pitch": "src/omnitok/tokenizers/pitch.py",
    "speech": "src/omnitok/world/speech.py",
}


def _at_revision(rev: str, tmp: Path) -> dict[str, ModuleType]:
    """The three modules as they were at ``rev``, each imported under a private name."""
    out = {}
    for name, path in FILES.items():
        src = subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout
        file = tmp / f"baseline_{name}.py"
        file.write_text(src)
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        out[name] = module
    return out


def _cases(mods: dict[str, ModuleType], clips: list[np.ndarray]) -> dict[str, tuple[Callable[[], list], int]]:
    """Each analysis as the pipeline calls it, and how many clips it covers; it returns its outputs (to compare)."""
    mel = mods["mel"].MelSpectrogram()
    waves = [torch.from_numpy(c) for c in clips]
    # pretokenize's form (omnitok.sequence.MediaEncoder): clips sorted by length, batches of 16 padded to the longest
    batches = []
    ordered = sorted(waves, key=len)
    for i in range(0, len(ordered), 16):
        part = ordered[i : i + 16]
        b = torch.zeros(len(part), max(w.numel() for w in part))
        for row, w in enumerate(part):
            b[row, : w.numel()] = w
        batches.append(b)
    linear = [mel.mel_to_linear(mel.log_mel(w)) for w in waves[: max(1, len(waves) // 8)]]
    return {
        "log-mel, one clip at a time (speech tokenizer's preparation)": (
            lambda: [mel.log_mel(w) for w in waves],
            len(waves),
        ),
        "log-mel, batches of 16 by length (pretokenize)": (lambda: [mel.log_mel(b) for b in batches], len(waves)),
        "Griffin-Lim, 32 iterations (TTS decoding; 1/8 of the clips)": (
            lambda: [mel.griffin_lim(m, length=(m.shape[1] - 1) * 160) for m in linear],
            len(linear),
        ),
        "F0 contour (speech tokenizer's preparation)": (
            lambda: [mods["pitch"].f0_contour(w) for w in waves],
            len(waves),
        ),
        "median F0, estimate_f0 (style centroids, style evaluation)": (
            lambda: [mods["speech"].estimate_f0(c, 16000) for c in clips],
            len(clips),
        ),
    }


def _diff(a: list, b: list) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
        if x.shape != y.shape:
            return float("inf")
        both_nan = torch.isnan(x) & torch.isnan(y)
        worst = max(worst, float(torch.where(both_nan, 0.0, (x - y).abs()).max()) if x.numel() else 0.0)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", required=True, help="a built world (omnitok world build); its val clips are used")
    ap.add_argument("--baseline", required=True, help="git revision whose modules are the baseline arm")
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from omnitok.tokenizers.speech_train import load_world_clips

    clips = [c.wav for c in load_world_clips(args.world, "val", limit=args.clips)]
    seconds = sum(c.size for c in clips) / 16000
    print(f"machine: {machine()}, {args.threads} torch threads")
    print(command())
    print(f"{len(clips)} clips, {seconds:.0f} s of speech")
    with tempfile.TemporaryDirectory() as tmp:
        arms = {
            "baseline": _cases(_at_revision(args.baseline, Path(tmp)), clips),
            "now": _cases({"mel": mel_now, "pitch": pitch_now, "speech": speech_now}, clips),
        }
        times: dict[tuple[str, str], list[float]] = {}
        outputs: dict[tuple[str, str], list] = {}
        for _ in range(args.rounds):
            for case in arms["now"]:
                for arm, cases in arms.items():
                    t0 = time.perf_counter()
                    outputs[arm, case] = cases[case][0]()
                    times.setdefault((arm, case), []).append(time.perf_counter() - t0)
    rows = []
    for case in arms["now"]:
        n = arms["now"][case][1]
        base, now = (statistics.median(times[a, case]) for a in ("baseline", "now"))
        rows.append(
            [
                case,
                f"{base / n * 1e3:.1f}",
                f"{now / n * 1e3:.1f}",
                f"{base / now:.2f}x",
                f"{_diff(outputs['baseline', case], outputs['now', case]):.2g}",
            ]
        )
    print(table(["analysis", f"ms/clip at {args.baseline}", "ms/clip now", "speed-up", "max |difference|"], rows))


if __name__ == "__main__":
    main()
