"""Speech tokenizer benchmark: intelligibility, disentanglement, style control, bitrate and CPU speed.

    python benchmarks/speech_tokenizer.py --world runs/speechworld --tokenizer RUN_OR_TOKENIZER_DIR
        [--clips 160] [--style-clips 90] [--sentences 24] [--probe-clips 1000] [--out results.json]

Everything is measured on the world's ``test`` split, with clips of held-out voices (never heard in training)
reported separately. Instruments are independent of the tokenizer: pocketsphinx with a domain LM from the
evaluated texts (as ``benchmarks/asr_ceiling.py``), pystoi, and ``omnitok.eval.style`` (F0 and durations
compared with eSpeak's own renderings). Speed rows run on one CPU thread, beside transformers'
``EncodecModel`` and ``MimiModel`` at their default sizes with random weights on the same audio (speed does not
depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import command, machine, table
from omnitok.eval.asr import Transcriber, wer
from omnitok.eval.style import StyleReference
from omnitok.tokenizers.speech import SpeechTokenizer, load_speech_tokenizer, phone_units
from omnitok.tokenizers.speech_train import SpeechClip, edit_distance, greedy_ctc, load_world_clips
from omnitok.world.speech import VOICES, Speaker, Style

SR = 16000


def stoi_score(ref: np.ndarray, deg: np.ndarray) -> float:
    from pystoi import stoi

    n = min(len(ref), len(deg))
    return float(stoi(ref[:n].astype(np.float64), deg[:n].astype(np.float64), SR, extended=False))


def rle(seq: list[int]) -> list[int]:
    return [v for i, v in enumerate(seq) if i == 0 or seq[i - 1] != v]


def norm_ed(a: list[int], b: list[int]) -> float:
    return edit_distance(a, b) / max(1, len(a), len(b))


# ----------------------------------------------------------------------------------------------- sections


def intelligibility(tok: SpeechTokenizer, clips: list[SpeechClip], asr: Transcriber) -> tuple[list, dict]:
    """WER and STOI of: original eSpeak, vocoder alone (mel -> Griffin-Lim), resynthesis (label / reference style)."""
    outs: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for i, c in enumerate(clips):
        r = c.record
        outs["original eSpeak"].append((i, c.wav))
        mel = tok.mel.log_mel(torch.from_numpy(c.wav))
        outs["vocoder only (mel -> Griffin-Lim)"].append((i, tok.vocode(mel[:, :-1])))
        codes = tok.encode(c.wav, SR)
        if r["voice"] in tok.voices:
            outs["tokens -> label style (voice, pitch)"].append(
                (i, tok.decode(codes, {"voice": r["voice"], "pitch": r["pitch"]}))
            )
        outs["tokens -> style from the clip itself (reference)"].append((i, tok.decode(codes, reference=c.wav)))
    rows, raw = [], {}
    hyp_orig = {i: asr.transcribe(a, SR) for i, a in outs["original eSpeak"]}
    for name, items in outs.items():
        for group, held in (("seen voices", False), ("held-out voices", True)):
            sel = [(i, a) for i, a in items if bool(clips[i].record.get("heldout_voice")) == held]
            if not sel:
                continue
            refs = [clips[i].record["text"] for i, _ in sel]
            hyps = [hyp_orig[i] if name == "original eSpeak" else asr.transcribe(a, SR) for i, a in sel]
            w = wer(refs, hyps)
            w0 = wer(refs, [hyp_orig[i] for i, _ in sel])  # the original audio of the same clips
            st = float(np.mean([stoi_score(clips[i].wav, a) for i, a in sel]))
            ratio = w / w0 if w0 > 0 else (float("inf") if w > 0 else 1.0)
            rows.append([name, group, len(sel), round(w, 4), round(w0, 4), round(ratio, 2), round(st, 3)])
            raw[f"{name} / {group}"] = {"wer": w, "orig_wer": w0, "ratio": ratio, "stoi": st, "n": len(sel)}
    return rows, raw


def disentanglement(tok: SpeechTokenizer, texts: list[str], speaker: Speaker) -> tuple[list, dict]:
    """Token edit distance: same sentence, different voices (and pitches) vs different sentences."""
    seen = [v.name for v in VOICES if v.name in tok.voices]
    held = [v.name for v in VOICES if v.name not in tok.voices]
    codes: dict[tuple[str, str, str], list[int]] = {}
    for t in texts:
        for v in seen + held:
            codes[(t, v, "mid")] = tok.encode(speaker.synthesize(t, Style(v, "mid", "normal")), SR).tolist()
        for v in seen[:2]:
            for p in ("low", "high"):
                codes[(t, v, p)] = tok.encode(speaker.synthesize(t, Style(v, p, "normal")), SR).tolist()
    pairs: dict[str, list[tuple[list[int], list[int]]]] = defaultdict(list)
    for t in texts:
        for i, a in enumerate(seen):
            for b in seen[i + 1 :]:
                accent = "same accent" if a.split("_")[0] == b.split("_")[0] else "different accents"
                pairs[f"same sentence, two seen voices ({accent})"].append((codes[(t, a, "mid")], codes[(t, b, "mid")]))
            for b in held:
                pairs["same sentence, seen vs held-out voice"].append((codes[(t, a, "mid")], codes[(t, b, "mid")]))
        for v in seen[:2]:
            pairs["same sentence and voice, low vs high pitch"].append((codes[(t, v, "low")], codes[(t, v, "high")]))
    for j, t in enumerate(texts):
        u = texts[(j + 1) % len(texts)]
        for v in seen:
            pairs["different sentences, same voice (chance level)"].append((codes[(t, v, "mid")], codes[(u, v, "mid")]))
    rows, raw = [], {}
    for name, ps in pairs.items():
        raw_ed = float(np.mean([norm_ed(a, b) for a, b in ps]))
        rle_ed = float(np.mean([norm_ed(rle(a), rle(b)) for a, b in ps]))
        rows.append([name, len(ps), round(raw_ed, 3), round(rle_ed, 3)])
        raw[name] = {"edit": raw_ed, "edit_rle": rle_ed, "pairs": len(ps)}
    return rows, raw


def phone_probe(
    tok: SpeechTokenizer, train: list[SpeechClip], test: list[SpeechClip], steps: int = 400
) -> tuple[list, dict]:
    """Phone error rate of a linear CTC probe on one-hot tokens, and of the tokenizer's own CTC head."""
    phones = {p: i + 1 for i, p in enumerate(tok.config.phones)}

    def units(c: SpeechClip) -> list[int]:
        return [phones[u] for u in phone_units(c.record["phonemes"], tok.config.keep_stress) if u in phones]

    tr = [(torch.from_numpy(tok.encode(c.wav, SR)), units(c)) for c in train]
    te = [(torch.from_numpy(tok.encode(c.wav, SR)), units(c), bool(c.record.get("heldout_voice"))) for c in test]
    torch.manual_seed(0)
    probe = torch.nn.Embedding(tok.codebook_size, len(phones) + 1)  # = a linear map of the one-hot token
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    gen = np.random.default_rng(0)
    for _ in range(steps):
        batch = [tr[i] for i in gen.integers(0, len(tr), 32)]
        n = max(len(c) for c, _ in batch)
        x = torch.zeros(len(batch), n, dtype=torch.long)
        for i, (c, _) in enumerate(batch):
            x[i, : len(c)] = c
        logp = probe(x).log_softmax(-1).transpose(0, 1)
        loss = torch.nn.functional.ctc_loss(
            logp,
            torch.tensor([p for _, ph in batch for p in ph]),
            torch.tensor([len(c) for c, _ in batch]),
            torch.tensor([len(ph) for _, ph in batch]),
            zero_infinity=True,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    rows, raw = [], {}
    for group, held in (("seen voices", False), ("held-out voices", True)):
        sel = [(c, ph) for c, ph, h in te if h == held]
        if not sel:
            continue
        n_ph = sum(len(ph) for _, ph in sel)
        with torch.no_grad():
            lin = sum(edit_distance(ph, greedy_ctc(probe(c))) for c, ph in sel) / n_ph
            own = sum(
                edit_distance(
                    ph, greedy_ctc(tok.ctc_logits(tok.codes_to_latents(c)[None], torch.ones(1, len(c), 1))[0])
                )
                for c, ph in sel
            )
        rows.append([group, len(sel), round(lin, 4), round(own / n_ph, 4)])
        raw[group] = {"linear_probe_per": lin, "own_ctc_head_per": own / n_ph, "clips": len(sel)}
    return rows, raw


def style_control(
    tok: SpeechTokenizer, clips: list[SpeechClip], ref: StyleReference, seed: int = 0
) -> tuple[list, dict]:
    """Re-decode each clip's tokens with another voice, pitch and rate; measure the pitch and rate classes."""
    rng = np.random.default_rng(seed)
    pitches, rates = tok.config.pitches, tok.config.rates
    results: dict[str, list[tuple[bool, bool, float]]] = defaultdict(list)
    by_voice = defaultdict(list)
    for c in clips:
        by_voice[c.record["voice"]].append(c)
    for k, c in enumerate(clips):
        r = c.record
        codes = tok.encode(c.wav, SR)
        group = "held-out voice tokens" if r.get("heldout_voice") else "seen voice tokens"
        # 1) another label style: a training voice, and a pitch and rate different from the clip's
        voice = tok.voices[int(rng.integers(len(tok.voices)))]
        pitch = pitches[(pitches.index(r["pitch"]) + 1 + int(rng.integers(2))) % 3]
        rate = rates[(rates.index(r["rate"]) + 1 + int(rng.integers(2))) % 3]
        out = tok.decode(codes, {"voice": voice, "pitch": pitch, "rate": rate})
        results[f"new label style, {group}"].append(
            (
                ref.classify_pitch(out, SR, voice, r["text"]) == pitch,
                ref.classify_rate(out, SR, voice, r["text"]) == rate,
                ref.rate_ratio(out, SR, voice, r["text"], rate),
            )
        )
        # 2) same style as the clip (resynthesis keeps pitch and rate)
        if r["voice"] in tok.voices:
            out = tok.decode(codes, {"voice": r["voice"], "pitch": r["pitch"], "rate": r["rate"]})
            results[f"same label style, {group}"].append(
                (
                    ref.classify_pitch(out, SR, r["voice"], r["text"]) == r["pitch"],
                    ref.classify_rate(out, SR, r["voice"], r["text"]) == r["rate"],
                    ref.rate_ratio(out, SR, r["voice"], r["text"], r["rate"]),
                )
            )
        # 3) style from another clip (reference): its voice, F0 and rate
        other = clips[(k + 7) % len(clips)]
        o = other.record
        out = tok.decode(codes, reference=other.wav)
        results["style from a reference clip"].append(
            (
                ref.classify_pitch(out, SR, o["voice"], r["text"]) == o["pitch"],
                ref.classify_rate(out, SR, o["voice"], r["text"]) == o["rate"],
                ref.rate_ratio(out, SR, o["voice"], r["text"], o["rate"]),
            )
        )
    rows, raw = [], {}
    for name, res in results.items():
        p = float(np.mean([a for a, _, _ in res]))
        q = float(np.mean([b for _, b, _ in res]))
        both = float(np.mean([a and b for a, b, _ in res]))
        ratio = float(np.median([x for _, _, x in res]))
        rows.append([name, len(res), round(p, 3), round(q, 3), round(both, 3), round(ratio, 3)])
        raw[name] = {"pitch_acc": p, "rate_acc": q, "both": both, "median_duration_ratio": ratio, "n": len(res)}
    return rows, raw


def speed(tok: SpeechTokenizer, clips: list[SpeechClip], with_codecs: bool) -> tuple[list, dict]:
    """Bitrate and real-time factors (one thread), beside Encodec and Mimi with default sizes, random weights."""
    audio = [c.wav for c in clips]
    seconds = sum(a.size for a in audio) / SR
    rows, raw = [], {}

    def measure(name: str, t: Any, bits: float, rate: float, chunked: bool) -> None:
        t0 = time.perf_counter()
        codes = [t.encode(a, SR) for a in audio]
        enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        for c in codes:
            t.decode(c)
        dec = time.perf_counter() - t0
        first = float("nan")
        if chunked:
            t0 = time.perf_counter()
            next(iter(t.decode_chunks(codes[0], None, chunk_frames=max(1, round(0.4 * rate)))))
            first = time.perf_counter() - t0
        rows.append(
            [
                name,
                rate,
                round(bits, 1),
                round(bits * rate),
                round(enc / seconds, 4),
                round(dec / seconds, 4),
                round(first * 1000),
            ]
        )
        raw[name] = {
            "tokens_per_s": rate,
            "bits_per_frame": bits,
            "bps": bits * rate,
            "encode_rtf": enc / seconds,
            "decode_rtf": dec / seconds,
            "first_chunk_ms": first * 1000,
        }

    measure("omnitok speech (FSQ + Griffin-Lim 32 it.)", tok, math.log2(tok.codebook_size), tok.frame_rate, True)
    if with_codecs:
        from transformers import EncodecConfig, EncodecModel, MimiConfig, MimiModel

        from omnitok.tokenizers.hf_speech import HFSpeechTokenizer

        torch.manual_seed(0)
        for name, model in (
            ("EncodecModel 24 kHz, default config, random weights", EncodecModel(EncodecConfig())),
            ("MimiModel, default config, random weights", MimiModel(MimiConfig())),
        ):
            h = HFSpeechTokenizer(model)
            measure(
                f"{name} ({h.num_levels} levels)", h, sum(math.log2(s) for s in h.codebook_sizes), h.frame_rate, True
            )
    return rows, raw


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True, help="tokenizer directory or training run directory")
    ap.add_argument("--clips", type=int, default=160, help="test clips for intelligibility")
    ap.add_argument("--style-clips", type=int, default=90)
    ap.add_argument("--sentences", type=int, default=24, help="sentences spoken by every voice (disentanglement)")
    ap.add_argument("--probe-clips", type=int, default=1000, help="training clips for the linear phone probe")
    ap.add_argument("--speed-clips", type=int, default=12)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: asr,dis,probe,style,speed,codecs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    torch.set_num_threads(1)

    print(f"command: {command()}")
    print(f"machine: {machine()}; torch threads: 1")
    tok = load_speech_tokenizer(args.tokenizer)
    if not isinstance(tok, SpeechTokenizer):
        raise SystemExit("this benchmark measures omnitok's own speech tokenizer (speech_fsq)")
    run_dir = args.tokenizer if (args.tokenizer / "summary.json").is_file() else args.tokenizer.parent
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    print(
        f"tokenizer: {args.tokenizer} ({tok.frame_rate:g} tokens/s, codebook {tok.codebook_size}, "
        f"{tok.bitrate:.0f} bit/s, {sum(p.numel() for p in tok.parameters()) / 1e6:.2f} M parameters)"
    )
    if summary:
        print(
            f"training: {summary.get('steps')} steps in {summary.get('train_seconds')} s "
            f"(+ {summary.get('prepare_seconds')} s reading and mel features), "
            f"{summary.get('n_train_clips')} clips / {summary.get('train_audio_hours')} h; val {summary.get('val')}"
        )
    results: dict[str, Any] = {"tokenizer": str(args.tokenizer), "training": summary}
    test = load_world_clips(args.world, "test", ("scene",), max(args.clips, args.style_clips))
    speaker = Speaker()

    if "asr" not in skip:
        clips = test[: args.clips]
        asr = Transcriber([c.record["text"] for c in clips])
        t0 = time.perf_counter()
        rows, raw = intelligibility(tok, clips, asr)
        print(f"\n### Intelligibility ({len(clips)} test clips, {time.perf_counter() - t0:.0f} s)\n")
        print(table(["audio", "voices", "clips", "WER", "WER of the original", "ratio", "STOI"], rows))
        results["intelligibility"] = raw

    if "dis" not in skip:
        texts = list(dict.fromkeys(c.record["text"] for c in test))[: args.sentences]
        rows, raw = disentanglement(tok, texts, speaker)
        print(f"\n### Disentanglement: normalised token edit distance ({len(texts)} sentences, normal rate)\n")
        print(table(["pair", "pairs", "edit distance / length", "same, repeats merged"], rows))
        results["disentanglement"] = raw

    if "probe" not in skip:
        train = load_world_clips(args.world, "train", ("scene",), args.probe_clips)
        rows, raw = phone_probe(tok, train, test[: args.clips])
        print(f"\n### Phone error rate from tokens (probe trained on {len(train)} train clips)\n")
        print(table(["test clips", "clips", "linear probe PER", "tokenizer's CTC head PER"], rows))
        results["phone_probe"] = raw

    if "style" not in skip:
        texts = list(dict.fromkeys(c.record["text"] for c in test))[:8]
        t0 = time.perf_counter()
        ref = StyleReference.fit(texts, speaker=speaker)
        rows, raw = style_control(tok, test[: args.style_clips], ref)
        print(f"\n### Style control ({args.style_clips} test clips re-decoded; {time.perf_counter() - t0:.0f} s)\n")
        print(table(["decode", "clips", "pitch class ok", "rate class ok", "both", "median duration / eSpeak's"], rows))
        results["style"] = raw

    if "speed" not in skip:
        rows, raw = speed(tok, test[: args.speed_clips], "codecs" not in skip)
        secs = sum(c.wav.size for c in test[: args.speed_clips]) / SR
        print(
            f"\n### Bitrate and CPU speed ({args.speed_clips} clips, {secs:.0f} s of audio, 1 thread; RTF = "
            "processing time / audio duration)\n"
        )
        print(
            table(
                ["tokenizer", "tokens/s", "bits/frame", "bit/s", "encode RTF", "decode RTF", "first 0.4 s chunk (ms)"],
                rows,
            )
        )
        own = next(iter(raw.values()))
        for name, r in list(raw.items())[1:]:
            print(
                f"\n{name}: omnitok encodes {r['encode_rtf'] / own['encode_rtf']:.1f}x and decodes "
                f"{r['decode_rtf'] / own['decode_rtf']:.1f}x faster; uses {r['bps'] / own['bps']:.1f}x fewer bits/s"
            )
        results["speed"] = raw

    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
