"""Speed of the world's speech synthesis, and the F0 evidence behind the PITCHES table.

Compares ``Speaker.synthesize`` (libespeak-ng through ctypes, state reset per clip) with starting the
``espeak-ng`` program once per clip (Debian package ``espeak-ng``; its row is skipped if the program is
missing), on the same sentences and voices in one run. Both produce a float32 16 kHz array, so the CLI
row includes reading its WAV and resampling. A third row turns the per-clip state reset off, to show what
determinism costs. Then measures the median F0 of every voice at every pitch class over several
sentences: the classes are usable as style labels only if their ranges do not overlap within a voice.

    python benchmarks/speech_synthesis.py [--sentences 100] [--f0-sentences 8]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from math import gcd

import numpy as np

from _common import command, machine
from omnitok.world.speech import (
    PITCHES,
    RATES,
    SAMPLE_RATE,
    VOICES,
    Speaker,
    Style,
    _Library,
    decode_wav,
    estimate_f0,
)

_VOLUME = 75


def sentences(n: int, seed: int = 0) -> list[str]:
    """Toy-world captions when the world's language module is importable, otherwise a small grammar."""
    rng = np.random.default_rng(seed)
    try:
        from omnitok.world.language import caption
        from omnitok.world.scene import sample_scene

        return [caption(sample_scene(rng), rng) for _ in range(n)]
    except ImportError:
        sizes, colors = ("small", "large", "tiny", "big"), ("red", "green", "blue", "yellow", "purple", "orange")
        shapes, places = ("circle", "square", "triangle", "star"), ("on the left", "at the top", "in the center")
        out = []
        for _ in range(n):
            parts = [
                f"a {rng.choice(sizes)} {rng.choice(colors)} {rng.choice(shapes)} {rng.choice(places)}"
                for _ in range(int(rng.integers(1, 4)))
            ]
            out.append(("There is " + " and ".join(parts) + ".").capitalize())
        return out


def time_library(speaker: Speaker, jobs: list[tuple[str, Style]]) -> tuple[float, float]:
    speaker.synthesize(jobs[0][0], jobs[0][1])  # warm the page cache and imports
    audio_s = 0.0
    t = time.perf_counter()
    for text, style in jobs:
        audio_s += speaker.synthesize(text, style).size / SAMPLE_RATE
    return time.perf_counter() - t, audio_s


def time_cli(exe: str, jobs: list[tuple[str, Style]]) -> tuple[float, float]:
    from scipy.signal import resample_poly

    voices = {v.name: v.espeak for v in VOICES}

    def one(text: str, style: Style) -> np.ndarray:
        cmd = [exe, "-v", voices[style.voice], "-p", str(PITCHES[style.pitch]), "-s", str(RATES[style.rate])]
        cmd += ["-a", str(_VOLUME), "--stdout", text]
        wav = subprocess.run(cmd, check=True, capture_output=True).stdout
        x, sr = decode_wav(wav)
        g = gcd(sr, SAMPLE_RATE)
        return resample_poly(x, SAMPLE_RATE // g, sr // g).astype(np.float32)

    one(*jobs[0])
    audio_s = 0.0
    t = time.perf_counter()
    for text, style in jobs:
        audio_s += one(text, style).size / SAMPLE_RATE
    return time.perf_counter() - t, audio_s


def time_library_without_reset(speaker: Speaker, jobs: list[tuple[str, Style]]) -> tuple[float, float]:
    """Same calls, but the library is initialised once and never reset (order-dependent output)."""
    original = _Library.reset
    first = [True]

    def reset_once(self: _Library, data_path: str) -> None:
        if first[0]:
            first[0] = False
            original(self, data_path)

    _Library.reset = reset_once  # type: ignore[method-assign]
    try:
        return time_library(speaker, jobs)
    finally:
        _Library.reset = original  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=100, help="clips per timing row")
    ap.add_argument("--f0-sentences", type=int, default=8, help="sentences per voice x pitch cell")
    args = ap.parse_args()

    print(f"command: {command()}")
    print(f"machine: {machine()}, numpy {np.__version__}")
    speaker = Speaker()
    print(f"libespeak-ng {speaker.version} from {speaker.library}\n")

    texts = sentences(args.sentences)
    jobs = [(t, Style(VOICES[i % len(VOICES)].name, "mid", "normal")) for i, t in enumerate(texts)]
    rows = []
    lib_s, audio_s = time_library(speaker, jobs)
    rows.append(("`Speaker.synthesize` (library, reset per clip)", lib_s, audio_s))
    fast_s, fast_audio = time_library_without_reset(speaker, jobs)
    rows.append(("library without the state reset (not deterministic)", fast_s, fast_audio))
    exe = shutil.which("espeak-ng")
    cli_note = ""
    if exe:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
        cli_s, cli_audio = time_cli(exe, jobs)
        rows.append((f"`espeak-ng` CLI, one process per clip ({version.split(':')[1].split()[0]})", cli_s, cli_audio))
    else:
        cli_note = "espeak-ng CLI not found (apt-get install espeak-ng): its row is skipped."

    print(f"### Synthesis speed ({len(jobs)} toy-world captions, {len(VOICES)} voices, 16 kHz float32 out)\n")
    print("| method | clips/s | ms/clip | real-time factor | audio (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, secs, audio in rows:
        n = len(jobs)
        print(f"| {name} | {n / secs:.1f} | {1000 * secs / n:.1f} | {secs / audio:.4f} | {audio:.0f} |")
    if exe:
        print(f"\nlibrary vs CLI: {rows[2][1] / rows[0][1]:.1f}x faster; reset overhead {rows[0][1] / rows[1][1]:.2f}x")
    if cli_note:
        print(f"\n{cli_note}")

    f0_texts = sentences(args.f0_sentences, seed=1)
    print(f"\n### Median F0 (Hz) per voice and pitch class ({len(f0_texts)} sentences each; min-max over sentences)\n")
    header = " | ".join(f"{p} ({v})" for p, v in PITCHES.items())
    print(f"| voice | espeak | {header} | classes separate |")
    print("|---|---|" + "---:|" * len(PITCHES) + "---|")
    all_ok = True
    for voice in VOICES:
        cells, ranges = [], []
        for pitch in PITCHES:
            f0 = [estimate_f0(speaker.synthesize(t, Style(voice.name, pitch, "normal")), SAMPLE_RATE) for t in f0_texts]
            cells.append(f"{np.median(f0):.0f} ({min(f0):.0f}-{max(f0):.0f})")
            ranges.append((min(f0), max(f0)))
        ok = all(ranges[i][1] < ranges[i + 1][0] for i in range(len(ranges) - 1))
        gap = min(ranges[i + 1][0] / ranges[i][1] for i in range(len(ranges) - 1))
        all_ok &= ok
        print(f"| {voice.name} | {voice.espeak} | {' | '.join(cells)} | {'yes' if ok else 'NO'} (gap x{gap:.2f}) |")
    print(f"\nall voices separable: {'yes' if all_ok else 'NO'}")


if __name__ == "__main__":
    main()
