"""Would best_of help transcription? Several transcripts of a clip, kept by the model's own scores.

The speech counterpart of ``caption_rerank.py``. For each test clip: the greedy transcript and samples (temperature
0.7 among the 32 likeliest tokens), each scored by the same LM

- as a listener: log p(transcript | the clip, "Transcribe the speech.");
- as a speaker: log p(the clip's codes | "Say this: <transcript>"), without style tokens (nobody says who spoke);
- and by their sum;

reporting the corpus WER (``omnitok.eval.asr.wer``, as ``omnitok eval``'s asr_wer) of each candidate, of the oracle
(each clip's best candidate: the ceiling of any re-ranker) and of each re-ranker.

``--beams W ...`` adds beam search: the W likeliest transcripts by the listener's own log-probability, kept step by
step under the same modality automaton as greedy decoding (text only, then EOS), the likeliest finished one taken
(``--length-penalty a`` divides its score by length**a). One beam is greedy decoding: the benchmark checks that it
writes the same transcripts. It asks whether the listener's errors are search errors (a likelier transcript that
greedy missed) or the model's (the wrong transcript is the likelier one).

    python benchmarks/asr_rerank.py runs/demo15/bundle --world runs/demo15/world --limit 60 --beams 1 4 8

A measurement for a decision, not a feature.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import command, machine, table

ASK, SAY = "Transcribe the speech.", "Say this: "  # the evaluation's ASR prompt; a TTS prompt of the training set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--world", required=True)
    ap.add_argument("--limit", type=int, default=60, help="test clips")
    ap.add_argument("--candidates", type=int, default=6, help="the greedy transcript and this many less one samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beams", type=int, nargs="*", default=[], help="beam widths to compare with greedy")
    ap.add_argument("--length-penalty", type=float, default=0.0, help="finished beams score log p / length**a")
    args = ap.parse_args()

    import omnitok
    from omnitok.decoding import Sampling
    from omnitok.eval.asr import wer
    from omnitok.eval.suite import _take
    from omnitok.sequence import Audio, Text

    torch.set_num_threads(args.threads)
    model = omnitok.load(args.bundle)
    clips = _take(args.world, "scene", args.limit, need="wav")
    refs = [s["meta"]["speech"]["text"] for s in clips]
    asks = [[Audio(samples=s["wav"], sample_rate=16000, role="user"), Text(ASK, role="user")] for s in clips]
    model.media(asks)  # codes once, for writing and both scores
    n, k = len(clips), args.candidates

    def write(**opts: object) -> list[str]:
        out = []
        for lo in range(0, n, 16):
            for reply in model.generate_batch(asks[lo : lo + 16], output="text", **opts):
                out.append(" ".join(s.text for s in reply if isinstance(s, Text)).strip())
        return out

    t0 = time.perf_counter()
    cands = [write(seed=0)] + [write(seed=j, text=Sampling(temperature=0.7, top_k=32)) for j in range(1, k)]
    written_s, t0 = time.perf_counter() - t0, time.perf_counter()

    def said(t: str) -> str:
        return t or "."  # an empty transcript still needs a token to score

    listener = [model.score([[*asks[i], Text(said(c[i]), role="assistant")] for i in range(n)]) for c in cands]
    speaker = [
        model.score(
            [[Text(SAY + said(c[i]), role="user"), Audio(codes=asks[i][0].codes, role="assistant")] for i in range(n)]
        )
        for c in cands
    ]
    scored_s = time.perf_counter() - t0

    def pick(score: list[list[float]]) -> list[str]:
        return [cands[max(range(k), key=lambda j, i=i: score[j][i])][i] for i in range(n)]

    rows = [["greedy" if j == 0 else f"T 0.7, seed {j}", f"{wer(refs, c):.3f}"] for j, c in enumerate(cands)]
    oracle = [min((c[i] for c in cands), key=lambda h, i=i: wer([refs[i]], [h])) for i in range(n)]
    rows.append(["oracle: each clip's best candidate", f"{wer(refs, oracle):.3f}"])
    both = [[a + b for a, b in zip(x, y, strict=True)] for x, y in zip(listener, speaker, strict=True)]
    for name, score in (("the listener", listener), ("the speaker", speaker), ("their sum", both)):
        rows.append([f"best by {name}", f"{wer(refs, pick(score)):.3f}"])
    for width in args.beams:
        t0 = time.perf_counter()
        found = [beam_search(model, ask, width, args.length_penalty) for ask in asks]
        same = sum(a == b for a, b in zip(found, cands[0], strict=True))
        took = time.perf_counter() - t0
        name = f"beam search, {width} beams (length penalty {args.length_penalty:g}; {took:.0f} s; "
        rows.append([name + f"{same} of {n} transcripts as greedy)", f"{wer(refs, found):.3f}"])
    print(f"{command()}\n{machine()}; {n} test clips; writing {written_s:.0f} s, scoring {scored_s:.0f} s\n")
    print(table(["transcript", "WER"], rows))


def beam_search(model: object, ask: list, width: int, length_penalty: float, limit: int = 96) -> str:
    """The likeliest transcript of ``ask`` that ``width`` beams find; one beam is greedy decoding.

    Each step runs the LM over every live beam's whole sequence (no KV cache: a measurement of quality, not speed),
    masks the logits with the request's modality automaton as ``omnitok.decoding`` does, and keeps the ``width``
    likeliest extensions; a beam that ends (EOS) is set aside. Without a length penalty the search stops once the best
    finished beam is likelier than every live one (log-probabilities only fall as a beam grows).
    """
    from omnitok.constraints import DONE
    from omnitok.generate import GenerateOptions
    from omnitok.sequence import Text

    opts = GenerateOptions(output="text")
    prompt, automaton = model._request(model._coded(ask, opts), opts)
    live = [(0.0, [], automaton.after_prompt(prompt.view(1, -1)))]
    done: list[tuple[float, list[int]]] = []
    for _ in range(limit):
        rows = torch.stack([torch.cat([prompt, torch.tensor(ids, dtype=torch.long)]) for _, ids, _ in live])
        with torch.inference_mode():
            logits = model.lm(input_ids=rows).logits[:, -1].float()
        state = {k: torch.cat([st[k] for _, _, st in live]) for k in live[0][2]}
        logp = automaton.apply(logits, state).log_softmax(-1)
        top = logp.topk(width, dim=-1)
        grown = [
            (score + v, [*ids, t], st)
            for (score, ids, st), vs, ts in zip(live, top.values.tolist(), top.indices.tolist(), strict=True)
            for v, t in zip(vs, ts, strict=True)
            if v > float("-inf")
        ]
        grown.sort(key=lambda c: -c[0])
        live = []
        for score, ids, st in grown:
            after = automaton.advance(st, torch.tensor([ids[-1]]))
            if int(after["state"][0]) == DONE:
                done.append((score / len(ids) ** length_penalty, ids))
            elif len(live) < width:
                live.append((score, ids, after))
        if not live or (not length_penalty and done and max(d[0] for d in done) >= live[0][0]):
            break
    best = max(done, key=lambda d: d[0])[1] if done else live[0][1]
    reply = model._render(best, opts, [])
    return " ".join(s.text for s in reply if isinstance(s, Text)).strip()


if __name__ == "__main__":
    main()
