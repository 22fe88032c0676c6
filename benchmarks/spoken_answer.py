"""How should a spoken answer be spoken? In one sequence or read aloud, once or best of N.

A spoken question about a picture is answered in words, then in speech. Ways to speak the words: in the same reply
(``output="text+speech"``: the clip follows the written answer, as the spoken_qa task was trained), with the voice
of the model's own choosing (as ``omnitok eval`` asks) or a voice given (placed after ``<speech>``, as the server's
chat completions ask for one), or as those chat completions did before, a second request "Say this: <answer>" (the
read-aloud task) in the given voice. Each can take ``best_of``: the words are written once, the clip spoken N times
and the one in which the LM hears the words likeliest kept. For the evaluation's spoken_qa examples (test split),
each arm's answers are heard by the evaluation's instrument (pocketsphinx with its domain LM) and graded as
``spoken_qa_acc`` grades them; the written answers' own accuracy is the ceiling of any way of speaking them.

    python benchmarks/spoken_answer.py runs/demo38/bundle --world runs/demo38/world --limit 50 --best-of 6

``--typed`` asks the same questions as text (the chat page's usual request, trained as the ``vqa`` task), where the
model ends its words without opening speech itself: ``output="text+speech"`` then opens it after them.

A measurement for a decision, not a feature.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import command, machine, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--world", required=True)
    ap.add_argument("--limit", type=int, default=30, help="spoken questions (the evaluation's first ones)")
    ap.add_argument("--best-of", type=int, default=6, help="clips spoken per answer in the best_of arms")
    ap.add_argument("--voice", help="the voice given to the arms that name one (default: the bundle's first)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--typed", action="store_true", help="ask the questions as text, not as their recordings")
    args = ap.parse_args()

    import omnitok
    from omnitok.eval import metrics as M
    from omnitok.eval.asr import wer
    from omnitok.eval.suite import EvalConfig, Suite, _take
    from omnitok.sequence import Audio, Image, Text

    torch.set_num_threads(args.threads)
    model = omnitok.load(args.bundle)
    suite = Suite(model, args.world, EvalConfig(limit=args.limit))
    samples = [s for s in _take(args.world, "spoken_qa", args.limit) if "question.wav" in s]
    answers = [s["meta"]["answer"] for s in samples]

    def question(s: dict) -> Text | Audio:
        return Text(s["meta"]["question"]) if args.typed else Audio(samples=s["question.wav"], sample_rate=16000)

    prompts = [[Image(pixels=s["png"]), question(s)] for s in samples]

    def words(reply: list) -> str:
        return "".join(s.text for s in reply if isinstance(s, Text)).strip()

    def clip(reply: list):
        return next((s.samples for s in reply if isinstance(s, Audio) and s.samples is not None), None)

    def run(batches: list[list], style: list | None = None, **opts: object) -> tuple[list[list], float]:
        t0, out = time.perf_counter(), []
        for lo in range(0, len(batches), 16):
            per = {"style": style[lo : lo + 16]} if style is not None else {}
            out += model.generate_batch(batches[lo : lo + 16], seed=0, **opts, **per)
        return out, time.perf_counter() - t0

    arms: dict[str, tuple[list[str], list, float]] = {}  # name -> (written words, clips, seconds)
    voices = [n[len("<|voice:") : -2] for n in model.vocab.specials if n.startswith("<|voice:")]
    given = [{"voice": args.voice or voices[0]}] * len(prompts)  # the server's default: the bundle's first voice
    for k in (1, args.best_of):
        for name, style in (("its own voice", None), (f"voice {given[0]['voice']} given", given)):
            replies, secs = run(prompts, output="text+speech", best_of=k, style=style)
            label = f"in one sequence, {name}" + (f", best of {k}" if k > 1 else "")
            arms[label] = ([words(r) for r in replies], [clip(r) for r in replies], secs)
    written, write_s = run(prompts, output="text")
    texts = [words(r) for r in written]
    for k in (1, args.best_of):
        asks = [[Text("Say this: " + t)] for t in texts]
        said = [i for i, t in enumerate(texts) if t]  # an empty answer has nothing to read
        spoken, secs = run([asks[i] for i in said], output="speech", best_of=k, style=[given[i] for i in said])
        clips = [None] * len(texts)
        for i, r in zip(said, spoken, strict=True):
            clips[i] = clip(r)
        label = f"written, then read aloud in voice {given[0]['voice']}" + (f", best of {k}" if k > 1 else "")
        arms[label] = (texts, clips, write_s + secs)

    t0 = time.perf_counter()
    flat = [c for _, clips, _ in arms.values() for c in clips if c is not None and len(c) > 160]
    heard_flat = iter(suite.transcriber.transcribe_many(flat, 16000))
    hear_s = time.perf_counter() - t0
    rows = []
    ceiling = [M.answer_correct(t, a) for t, a in zip(texts, answers, strict=True)]
    rows.append(["the written answers themselves (ceiling)", f"{sum(ceiling) / len(samples):.3f}", "", "", ""])
    for name, (said, clips, secs) in arms.items():
        heard = [next(heard_flat) if c is not None and len(c) > 160 else "" for c in clips]
        right = [M.answer_correct(h, a) for h, a in zip(heard, answers, strict=True)]
        pairs = [(t, h) for t, h in zip(said, heard, strict=True) if t]
        agree = sum(w == t for w, t in zip(said, texts, strict=True))
        rows.append([
            name, f"{sum(right) / len(samples):.3f}", f"{wer([t for t, _ in pairs], [h for _, h in pairs]):.3f}",
            f"{agree}/{len(samples)}", f"{secs:.0f}",
        ])  # fmt: skip
    asked = "typed" if args.typed else "spoken"
    print(f"{command()}\n{machine()}; {len(samples)} {asked} questions; hearing every arm {hear_s:.0f} s\n")
    print(table(["spoken answer", "spoken_qa_acc", "WER heard vs written", "words as written alone", "s"], rows))


if __name__ == "__main__":
    main()
