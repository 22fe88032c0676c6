"""The speech instrument's ceiling: pocketsphinx WER on clean eSpeak speech, per voice.

Generated speech is scored by transcribing it; this is the WER of that transcription on the reference
audio itself (eSpeak, no model in between), i.e. the best score a perfect speech generator could get.
Reported with the domain LM (built from the evaluated texts, as ``Transcriber(corpus=...)`` is used in
evaluation) and with pocketsphinx's general English LM.

    python benchmarks/asr_ceiling.py --world DIR [--split test] [--lm-split train] [--limit N]
    python benchmarks/asr_ceiling.py --sentences N [--heldout-lm M]

``--world`` reads the world builder's WebDataset shards ``DIR/SPLIT/scene-*.tar`` (samples ``KEY.wav`` +
``KEY.json`` with a ``"speech"`` record). ``--sentences`` speaks N toy-world captions with every voice
(pitch and rate cycling over the classes), for use before a world is built.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from collections import defaultdict
from pathlib import Path

from _common import command, machine
from omnitok.errors import OmnitokError
from omnitok.eval.asr import Transcriber, wer
from omnitok.world.read import iter_samples
from omnitok.world.speech import PITCHES, RATES, SAMPLE_RATE, VOICES, Speaker, Style, decode_wav
from speech_synthesis import sentences

# A clip: (voice, pitch, rate, heldout, text, wav bytes or None to synthesise).
Clip = tuple[str, str, str, bool, str, bytes | None]


def read_world(root: Path, split: str, limit: int | None) -> list[Clip]:
    clips: list[Clip] = []
    for raw in iter_samples(root, split, "scene", decode=False):
        sp = json.loads(raw["json"]).get("speech")
        if not sp or "wav" not in raw:
            raise OmnitokError(f"{root}: sample {raw['__key__']} has no speech (built with --no-speech?)")
        clips.append((sp["voice"], sp["pitch"], sp["rate"], bool(sp.get("heldout_voice")), sp["text"], raw["wav"]))
        if limit and len(clips) >= limit:
            break
    return clips


def own_clips(n: int) -> list[Clip]:
    texts = sentences(n, seed=123)
    pitches, rates = list(PITCHES), list(RATES)
    return [
        (v.name, pitches[i % len(pitches)], rates[(i // len(pitches)) % len(rates)], False, t, None)
        for i, t in enumerate(texts)
        for v in VOICES
    ]


_WORKER: dict[str, object] = {}


def _init(corpus: list[str], general: bool) -> None:
    _WORKER["domain"] = Transcriber(corpus)
    _WORKER["general"] = Transcriber() if general else None
    _WORKER["speaker"] = None


def _transcribe(clip: Clip) -> tuple[str, str]:
    voice, pitch, rate, _heldout, text, wav = clip
    if wav is None:
        if _WORKER["speaker"] is None:
            _WORKER["speaker"] = Speaker()
        audio, sr = _WORKER["speaker"].synthesize(text, Style(voice, pitch, rate)), SAMPLE_RATE  # type: ignore[union-attr]
    else:
        audio, sr = decode_wav(wav)
    domain = _WORKER["domain"].transcribe(audio, sr)  # type: ignore[union-attr]
    general = _WORKER["general"].transcribe(audio, sr) if _WORKER["general"] is not None else ""  # type: ignore[union-attr]
    return domain, general


def table(title: str, key_name: str, groups: dict[str, list[int]], clips: list[Clip], hyps, general: bool) -> None:
    print(f"\n### {title}\n")
    cols = "| WER domain LM | WER general LM |" if general else "| WER domain LM |"
    print(f"| {key_name} | clips | words {cols}")
    print("|---|---:|---:|---:|" + ("---:|" if general else ""))
    for name, idx in groups.items():
        refs = [clips[i][4] for i in idx]
        words = sum(len(r.split()) for r in refs)
        row = f"| {name} | {len(idx)} | {words} | {wer(refs, [hyps[i][0] for i in idx]):.3f} |"
        if general:
            row += f" {wer(refs, [hyps[i][1] for i in idx]):.3f} |"
        print(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--world", type=Path, help="world directory with SPLIT/scene-*.tar shards")
    src.add_argument("--sentences", type=int, help="speak N captions with every voice instead")
    ap.add_argument("--split", default="test")
    ap.add_argument("--lm-split", help="build the domain LM from this split's texts instead of the evaluated ones")
    ap.add_argument("--heldout-lm", type=int, default=0, help="with --sentences: LM from M other captions")
    ap.add_argument("--limit", type=int, help="at most this many clips")
    ap.add_argument("--no-general", action="store_true", help="skip the (slow) general-LM column")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    print(f"command: {command()}")
    print(f"machine: {machine()}")
    if args.world:
        clips = read_world(args.world, args.split, args.limit)
        corpus = [c[4] for c in clips]
        lm_source = f"texts of the evaluated split '{args.split}'"
        if args.lm_split:
            corpus = [c[4] for c in read_world(args.world, args.lm_split, None)]
            lm_source = f"texts of split '{args.lm_split}'"
    else:
        clips = own_clips(args.sentences)[: args.limit]
        corpus = sorted({c[4] for c in clips})
        lm_source = "the evaluated captions"
        if args.heldout_lm:
            corpus = sentences(args.heldout_lm, seed=7)
            lm_source = f"{args.heldout_lm} other captions (held-out LM)"
    print(f"clips: {len(clips)}; domain LM from {lm_source} ({len(set(corpus))} distinct sentences)")

    general = not args.no_general
    t = time.perf_counter()
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers, _init, (corpus, general)) as pool:
            hyps = pool.map(_transcribe, clips, chunksize=4)
    else:
        _init(corpus, general)
        t = time.perf_counter()  # one process: leave model loading out of the per-clip time
        hyps = [_transcribe(c) for c in clips]
    elapsed = time.perf_counter() - t
    print(f"transcribed in {elapsed:.0f} s ({elapsed / len(clips):.2f} s/clip{', both LMs' if general else ''})")

    by_voice: dict[str, list[int]] = defaultdict(list)
    by_pitch: dict[str, list[int]] = defaultdict(list)
    by_rate: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(clips):
        by_voice[f"{c[0]}{' (held out)' if c[3] else ''}"].append(i)
        by_pitch[c[1]].append(i)
        by_rate[c[2]].append(i)
    order = {v.name: k for k, v in enumerate(VOICES)}
    by_voice = dict(sorted(by_voice.items(), key=lambda kv: order.get(kv[0].split()[0], 99)))
    by_voice["all"] = list(range(len(clips)))
    table("pocketsphinx WER on clean eSpeak speech, per voice", "voice", by_voice, clips, hyps, general)
    table("... per pitch", "pitch", {p: by_pitch[p] for p in PITCHES if p in by_pitch}, clips, hyps, general)
    table("... per rate", "rate", {r: by_rate[r] for r in RATES if r in by_rate}, clips, hyps, general)
    errors = [(wer([c[4]], [h[0]]), i) for i, (c, h) in enumerate(zip(clips, hyps, strict=True)) if c[4].strip()]
    worst = [i for e, i in sorted(errors, reverse=True)[:3] if e > 0]
    if worst:
        print("\nworst domain-LM transcriptions:")
    for i in worst:
        print(f"- {clips[i][0]}/{clips[i][1]}/{clips[i][2]}: ref {clips[i][4]!r}\n  hyp {hyps[i][0]!r}")


if __name__ == "__main__":
    main()
