"""Would best_of help speaking? Several clips of a sentence, kept by how well the model itself hears the sentence.

The speech counterpart of ``image_rerank.py``: the LM transcribes far better than it speaks (a 15-minute demo on the
Zen 5: ASR WER 0.13, its own speech heard at 0.43), so reading each spoken candidate back may tell a clear one from a
garbled one. For each of the evaluation's TTS examples (test split, its styles; held-out voices get pitch and rate
only and a reference clip, as ``omnitok eval`` does): the plain clip (the shipped sampling) and samples, each scored by
the same LM as a listener, log p(the sentence | the clip's codes, "Transcribe the speech."), as a speaker, log p(the
clip's codes | the request), and by their sum. Every candidate is heard by the evaluation's instrument (pocketsphinx
with its domain LM), and the table gives the corpus WER (as ``tts_wer``) of the plain clip, of each sample, of the
oracle (each sentence's best clip as pocketsphinx hears it: the ceiling of any re-ranker) and of each re-ranker's pick.
``omnitok.generate``'s ``best_of`` for speech is the listener's pick.

    python benchmarks/tts_rerank.py runs/demo37/bundle --world runs/demo37/world --limit 60 --candidates 6

A measurement for a decision, not a feature.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import command, machine, table

LISTEN = "Transcribe the speech."  # the evaluation's ASR prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--world", required=True)
    ap.add_argument("--limit", type=int, default=30, help="test sentences (the evaluation's first ones)")
    ap.add_argument("--candidates", type=int, default=6, help="the plain clip and this many less one samples")
    ap.add_argument("--temperature", type=float, default=0.5, help="the samples' speech temperature (top-k 32)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import omnitok
    from omnitok.decoding import Sampling
    from omnitok.eval.asr import wer
    from omnitok.eval.suite import EvalConfig, Suite, _take
    from omnitok.sequence import Audio, Text

    torch.set_num_threads(args.threads)
    model = omnitok.load(args.bundle)
    suite = Suite(model, args.world, EvalConfig(limit=args.limit))
    samples = _take(args.world, "scene", args.limit, need="wav")
    texts = [s["meta"]["speech"]["text"] for s in samples]
    references = suite._voice_references(samples)
    styles, refs = [], []
    for s in samples:
        sp = s["meta"]["speech"]
        held = sp["heldout_voice"]
        styles.append(
            {"pitch": sp["pitch"], "rate": sp["rate"]} if held else {k: sp[k] for k in ("voice", "pitch", "rate")}
        )
        refs.append(references[s["key"]] if held else None)
    prompts = [[Text("Say this: " + t)] for t in texts]
    n, k = len(samples), args.candidates

    def speak(seed: int, **opts: object) -> list[Audio | None]:
        out: list[Audio | None] = []
        for lo in range(0, n, 16):
            replies = model.generate_batch(
                prompts[lo : lo + 16], output="speech", seed=seed, style=styles[lo : lo + 16],
                reference=refs[lo : lo + 16], **opts,
            )  # fmt: skip
            out += [next((s for s in r if isinstance(s, Audio) and s.codes is not None and len(s.codes)), None)
                    for r in replies]  # fmt: skip
        return out

    t0 = time.perf_counter()
    sampled = Sampling(temperature=args.temperature, top_k=32)
    cands = [speak(0)] + [speak(j, speech=sampled) for j in range(1, k)]
    spoken_s, t0 = time.perf_counter() - t0, time.perf_counter()
    listener, speaker = [], []  # -inf where nothing was spoken: never picked
    for c in cands:
        said = [i for i in range(n) if c[i] is not None]
        hear = [[Audio(codes=c[i].codes, role="user"), Text(LISTEN, role="user"), Text(texts[i], role="assistant")]
                for i in said]  # fmt: skip
        # the speaker: log p(the clip's codes | the request), held-out voices without their voice token, as spoken
        speak_again = [[*prompts[i], Audio(codes=c[i].codes, role="assistant", style=styles[i])] for i in said]
        for scores, out in ((model.score(hear), listener), (model.score(speak_again), speaker)):
            row = [float("-inf")] * n
            for i, score in zip(said, scores, strict=True):
                row[i] = score
            out.append(row)
    scored_s, t0 = time.perf_counter() - t0, time.perf_counter()
    clips = [c[i].samples if c[i] is not None else None for c in cands for i in range(n)]
    heard_flat = suite.transcriber.transcribe_many([x for x in clips if x is not None], 16000)
    it = iter(heard_flat)
    heard_all = [next(it) if x is not None else "" for x in clips]
    heard = [heard_all[j * n : (j + 1) * n] for j in range(k)]
    heard_s = time.perf_counter() - t0

    rows = [
        ["plain (the shipped sampling: T 0.5, top-k 32)" if j == 0 else f"T {args.temperature:g}, seed {j}",
         f"{wer(texts, h):.3f}"]
        for j, h in enumerate(heard)
    ]  # fmt: skip
    oracle = [min((h[i] for h in heard), key=lambda x, i=i: wer([texts[i]], [x])) for i in range(n)]
    rows.append(["oracle: each sentence's best clip as pocketsphinx hears it", f"{wer(texts, oracle):.3f}"])
    both = [[a + b for a, b in zip(x, y, strict=True)] for x, y in zip(listener, speaker, strict=True)]
    for name, score in (("the listener", listener), ("the speaker", speaker), ("their sum", both)):
        pick = [max(range(k), key=lambda j, i=i: score[j][i]) for i in range(n)]
        rows.append([f"best of {k} by {name}", f"{wer(texts, [heard[pick[i]][i] for i in range(n)]):.3f}"])
        rows.append([f"  (plain clip kept for {sum(p == 0 for p in pick)} of {n})", ""])
    ref = suite.transcriber.transcribe_many([s["wav"] for s in samples], 16000)
    rows.append(["eSpeak's own audio (tts_wer_ref)", f"{wer(texts, ref):.3f}"])
    print(
        f"{command()}\n{machine()}; {n} test sentences; speaking {spoken_s:.0f} s, scoring {scored_s:.0f} s, "
        f"hearing {heard_s:.0f} s\n"
    )
    print(table(["speech", "WER"], rows))


if __name__ == "__main__":
    main()
