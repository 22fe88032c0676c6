"""Reading aloud with the text interleaved into the speech: does the LM keep its place in the sentence?

The demo's TTS clips say fluent toy-world sentences with the wrong words: the first clause is often right, the rest
drifts to another scene (runs/demo48's report). The LM writes ~150 codes after a text it has to keep its place in.
This benchmark tries the layout that gives it that place: the assistant turn writes the sentence a few words at a
time, each chunk one chunk ahead of the speech that says it,

    <|assistant|> w1 w2 <speech> style S1 </speech> w3 <speech> S2 </speech> ... <speech> Sn </speech> <|end|>

where the clip's codes are cut in proportion to each chunk's characters (no word timings needed). Layouts:
``ahead`` (above: the LM writes the words too), ``behind`` (each chunk's words after its speech, ASR's order) and
``given`` (as ahead, but the words are no training target: generation places the request's own words and the LM
only speaks each chunk and closes its span). ``given`` is now the pipeline's own layout (``omnitok.sequence``'s
read-aloud layout, written by ``omnitok pretokenize`` and decoded by ``omnitok.generate`` for a bundle that records
it); this copy remains for token directories made before it, and ``--mode given`` decodes a bundle trained on
such a copy (whose manifest does not record the layout) with the pipeline's own read-aloud decoding.

``tokens``: a copy of a token directory whose ``tts`` documents (train and val; ``--share`` of them) are laid out
so; every other task is linked, unchanged, and the vocabulary and text tokenizer are the same. Train an arm on it
next to the original (``benchmarks/demo_lm_shapes.py --demo`` a directory whose ``tokens`` is this copy).

``eval``: ``omnitok eval``'s TTS task on a bundle, the reply decoded as usual (``--mode plain``) or in the layout
it was trained on (every span's codes joined into one clip, decoded as the usual reply's would be). Everything else
is the evaluation's: the test sentences, styles, reference clips of held-out voices, pocketsphinx, style check.

``cuts``: how far the cut by characters lies from where the words start, on a world that recorded eSpeak's word
onsets (``omnitok world build`` since they are): for every chunk boundary of every train clip, the signed distance
between the two cuts in milliseconds (positive: the characters cut late). With ``--tokenizer``: how far a speech
tokenizer's forced alignment (``omnitok.tokenizers.align``, what pretokenization uses for clips without onsets)
lies from eSpeak's onsets, per word and per cut at the codes' frames, the characters' cut beside it.

    python benchmarks/tts_interleaved.py tokens runs/demo/tokens runs/tok_given --layout given
    python benchmarks/tts_interleaved.py eval runs/arms/given/lm/bundle --world runs/demo/world --mode given
    python benchmarks/tts_interleaved.py cuts --world runs/demo/world
    python benchmarks/tts_interleaved.py cuts --world runs/demo/world --tokenizer runs/demo/speech_tokenizer
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from _common import command, machine, table

LAYOUTS = ("ahead", "behind", "given")


def read_chunks(said: str, words: int) -> list[str]:
    """The text a TTS request ("Say this: ...") asks to read, ``words`` words a chunk; [] when it asks for none.

    Shared by the documents and the given layout's decoding, so the two cut a sentence alike."""
    from omnitok.data.tasks import TTS_ASKS
    from omnitok.sequence import read_aloud_chunks

    ask = next((a for a in TTS_ASKS if said.startswith(a)), None)
    return [] if ask is None else read_aloud_chunks(said[len(ask) :], words)


def interleave_tokens(src: Path, dst: Path, words: int, layout: str, share: float = 1.0) -> dict[str, int]:
    """Write ``dst``: ``src`` with its tts documents interleaved (see the module docstring); ``share``: the fraction
    of documents laid out so, spread evenly (the rest stay as they were). Returns the documents changed per split."""
    from omnitok.data.shards import ShardWriter, write_manifest
    from omnitok.tokenizers.text import TextTokenizer
    from omnitok.vocab import ROLE_TOKENS, SPAN_TOKENS, Vocabulary

    if dst.exists():
        raise SystemExit(f"{dst} exists: give a new directory")
    vocab = Vocabulary.load(str(src))
    text = TextTokenizer.load(src / "text_tokenizer")
    opener, closer = (vocab.special(t) for t in SPAN_TOKENS["speech"])
    assistant = vocab.special(ROLE_TOKENS["assistant"])
    dst.mkdir(parents=True)
    for f in ("vocab.json", "config.json"):
        shutil.copy(src / f, dst / f)
    shutil.copytree(src / "text_tokenizer", dst / "text_tokenizer")
    done = {}
    for split in ("train", "val"):
        (dst / split).mkdir()
        for task in os.listdir(src / split):
            if task != "tts":
                os.symlink((src / split / task).resolve(), dst / split / task)
        ids = np.load(src / split / "tts" / "shard-00000.ids.npy")
        offsets = np.load(src / split / "tts" / "shard-00000.offsets.npy")
        done[split] = 0
        with ShardWriter(dst, split, "tts") as w:
            for n, (a, b) in enumerate(itertools.pairwise(offsets)):
                doc = [int(t) for t in ids[a:b]]
                k = doc.index(assistant) + 1
                user, reply = doc[:k], doc[k:]
                chunks = read_chunks(text.decode([t for t in user if vocab.kind(t) == "text"]), words)
                # not this one's turn (share), a dropped prompt or no text: as it was
                if int((n + 1) * share) == int(n * share) or reply[0] != opener or not chunks:
                    w.add(doc, [0] * k + [1] * len(reply))
                    continue
                j = 1
                while vocab.kind(reply[j]) == "special":  # the style tokens after <speech>
                    j += 1
                style, end = reply[1:j], reply.index(closer, j)
                codes, tail = reply[j:end], reply[end + 1 :]
                sizes = np.array([len(c) for c in chunks], float)
                cuts = np.round(np.cumsum(sizes) / sizes.sum() * len(codes)).astype(int)
                ahead = layout in ("ahead", "given")
                body = list(text.encode(chunks[0])) if ahead else []
                mask = [0 if layout == "given" else 1] * len(body)  # "given": the words are no target
                for i, (lo, hi) in enumerate(zip(np.r_[0, cuts[:-1]], cuts, strict=True)):
                    if ahead and i + 1 < len(chunks):  # the text one chunk ahead of its speech
                        words_ids = text.encode(chunks[i + 1])
                        body += words_ids
                        mask += [0 if layout == "given" else 1] * len(words_ids)
                    span = [opener, *(style if i == 0 else []), *codes[lo:hi], closer]
                    body, mask = body + span, mask + [1] * len(span)
                    if layout == "behind":  # the words just said, as ASR writes them after the speech
                        words_ids = text.encode(chunks[i])
                        body, mask = body + words_ids, mask + [1] * len(words_ids)
                w.add(user + body + tail, [0] * k + mask + [1] * len(tail))
                done[split] += 1
    write_manifest(dst, vocab.size)
    return done


def interleaved_replies(model, samples, opts, layout, media=True):  # type: ignore[no-untyped-def]
    """``OmniModel._replies`` for ``output="speech"``, decoded in the interleaved layout (module docstring)."""
    import torch

    from omnitok.constraints import ModalityConstraint
    from omnitok.decoding import DecodeConfig
    from omnitok.vocab import SPAN_TOKENS

    styles, refs = model._per_request(opts, len(samples))
    as_text = replace(opts, output="text+speech", style=None)  # the prompt ends at the assistant's turn
    prompts = [torch.tensor(model._prompt_ids(model._coded(s, as_text), as_text)) for s in samples]
    opener, closer = (model.vocab.special(t) for t in SPAN_TOKENS["speech"])
    constraint = ModalityConstraint(model.vocab, outputs={"text", "speech"})
    cfg = DecodeConfig(max_new_tokens=500, text=opts.text, image=opts.image, speech=opts.speech)
    gen = model._generator(opts.seed)
    n = len(prompts)
    if layout == "ahead":  # the first words, then <speech> and the style tokens
        heads = model._decode_ids(prompts, constraint, replace(cfg, max_new_tokens=40), None, [40] * n, gen, opener)
    else:  # the clip starts the reply, as a usual one does
        heads = [[opener] for _ in prompts]
    heads = [h + model._style_ids(st) if h and h[-1] == opener else h for h, st in zip(heads, styles, strict=True)]
    rows = [torch.cat([p, torch.tensor(h, dtype=torch.long)]) for p, h in zip(prompts, heads, strict=True)]
    rest = model._decode_ids(rows, constraint, cfg, None, [cfg.max_new_tokens] * n, gen)
    out = []
    for h, r, st, ref in zip(heads, rest, styles, refs, strict=True):
        codes = [t for t in h + r if model.vocab.kind(t) == "speech"]
        clip = [opener, *model._style_ids(st), *codes, closer]
        out.append(model._render(clip, replace(opts, style=st, reference=ref), [], media))
    return out


def cut_distances(world: Path, per_chunk: list[int]) -> tuple[dict[int, np.ndarray], float]:
    """For each chunk size, the characters' cut minus the onsets' cut (ms) at every chunk boundary of the train
    clips, both made by the layout's own ``_read_aloud_cuts`` at sample resolution; and the mean word's length (ms:
    clip length / words, over clips). The world's records are read once, no picture or clip decoded."""
    from omnitok.sequence import _read_aloud_cuts, read_aloud_chunks

    diffs: dict[int, list[float]] = {k: [] for k in per_chunk}
    word_ms = []
    for rec, _ in _timed_clips(world, None):
        n, ms = rec["num_samples"], 1000 / rec["sample_rate"]
        onsets = [o / n for o in rec["word_onsets"]]  # as omnitok.data.tasks.tts hands them to the clip
        word_ms.append(n / len(rec["text"].split()) * ms)
        for k in per_chunk:
            chunks = read_aloud_chunks(rec["text"], k)
            by_chars = _read_aloud_cuts(chunks, k, n, None)[:-1]
            by_onsets = _read_aloud_cuts(chunks, k, n, onsets)[:-1]
            diffs[k] += [(c - o) * ms for c, o in zip(by_chars, by_onsets, strict=True)]
    return {k: np.array(d) for k, d in diffs.items()}, float(np.mean(word_ms))


def _timed_clips(world: Path, limit: int | None, wav: bool = False):  # type: ignore[no-untyped-def]
    """(speech record, clip or None) of the train scenes that speak, in order; ``limit`` of them at most."""
    from omnitok.world.read import decode_sample, iter_samples

    seen = 0
    for raw in iter_samples(world, "train", "scene", decode=False):
        rec = json.loads(raw["json"]).get("speech")
        if rec is None:
            continue
        if "word_onsets" not in rec:
            raise SystemExit(f"{world}: its speech records have no word_onsets (built before they were recorded)")
        yield rec, decode_sample(raw)["wav"] if wav else None
        seen += 1
        if limit is not None and seen >= limit:
            return


def aligned_distances(world: Path, tokenizer: Path, per_chunk: int, limit: int) -> dict[str, np.ndarray]:
    """The speech tokenizer's forced alignment (``omnitok.tokenizers.align``) against eSpeak's word onsets, and the
    characters' cut beside it, on the same clips, at the resolution the layout cuts: the codes' frames. Per word
    (the aligner's onset minus eSpeak's, ms; the first word of a clip left out) and per chunk boundary of
    ``per_chunk`` words (the frame each cuts at, minus the one eSpeak's onsets cut at, ms); with the seconds the
    alignment took (its CTC head and Viterbi path; encoding the clips not counted)."""
    import time

    from omnitok.sequence import _read_aloud_cuts, read_aloud_chunks
    from omnitok.tokenizers.align import align_words
    from omnitok.tokenizers.speech import load_speech_tokenizer

    tok = load_speech_tokenizer(tokenizer).eval()
    clips = list(_timed_clips(world, limit, wav=True))
    codes = []
    for i in range(0, len(clips), 16):
        codes += tok.encode_batch([w for _, w in clips[i : i + 16]])
    out: dict[str, list[float]] = {"word": [], "aligner": [], "characters": [], "failed": []}
    took = 0.0
    for (rec, _), c in zip(clips, codes, strict=True):
        frames, frame_ms = len(c), 1000 / tok.frame_rate
        covered = frames * tok.samples_per_token  # the codes cover the clip padded to whole frames
        truth = np.asarray(rec["word_onsets"]) / covered
        t0 = time.perf_counter()
        onsets = align_words(tok, c, rec["text"], rec["phonemes"])
        took += time.perf_counter() - t0
        if onsets is None:
            out["failed"].append(1.0)
            continue
        out["word"] += ((np.asarray(onsets) - truth)[1:] * covered * 1000 / rec["sample_rate"]).tolist()
        chunks = read_aloud_chunks(rec["text"], per_chunk)
        want = _read_aloud_cuts(chunks, per_chunk, frames, truth)[:-1]
        for name, o in (("aligner", onsets), ("characters", None)):
            got = _read_aloud_cuts(chunks, per_chunk, frames, o)[:-1]
            out[name] += [(g - w) * frame_ms for g, w in zip(got, want, strict=True)]
    res = {k: np.asarray(v) for k, v in out.items()}
    res["seconds"] = np.asarray([took, len(clips)])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokens", help="an interleaved copy of a token directory")
    t.add_argument("src", type=Path)
    t.add_argument("dst", type=Path)
    t.add_argument("--words", type=int, default=2, help="words per text chunk")
    t.add_argument("--share", type=float, default=1.0, help="fraction of the tts documents interleaved")
    t.add_argument("--layout", choices=LAYOUTS, default="ahead", help="each chunk's text before or after its speech")
    e = sub.add_parser("eval", help="the evaluation's TTS on a bundle, decoded plain or interleaved")
    e.add_argument("bundle")
    e.add_argument("--world", required=True)
    e.add_argument("--mode", choices=["plain", *LAYOUTS], required=True, help="plain, or the layout trained")
    e.add_argument("--limit", type=int, default=30)
    e.add_argument("--words", type=int, default=2, help="given: words per chunk, as its tokens were made")
    e.add_argument("--out", type=Path, default=None, help="the evaluation's directory (default: a temporary one)")
    c = sub.add_parser("cuts", help="the cut by characters against the words' onsets")
    c.add_argument("--world", type=Path, required=True)
    c.add_argument("--words", type=int, nargs="+", default=[1, 2, 3], help="words per chunk")
    c.add_argument("--tokenizer", type=Path, help="also: this speech tokenizer's forced alignment (2 words a chunk)")
    c.add_argument("--limit", type=int, default=400, help="clips the aligner reads")
    args = ap.parse_args()
    print(f"{command()}\n{machine()}\n")
    if args.cmd == "cuts" and args.tokenizer:
        torch_threads = os.environ.get("OMP_NUM_THREADS")
        res = aligned_distances(args.world, args.tokenizer, 2, args.limit)
        rows = []
        for name in ("word", "aligner", "characters"):
            d = res[name]
            a = np.abs(d)
            q = np.percentile(a, [50, 90])
            rows.append([name, len(d), f"{a.mean():.0f}", f"{q[0]:.0f}", f"{q[1]:.0f}", f"{(a > 100).mean():.3f}",
                         f"{d.mean():+.0f}"])  # fmt: skip
        print(table(["onsets of", "n", "mean |ms|", "median", "p90", "share > 100 ms", "mean signed"], rows))
        took, n = res["seconds"]
        print(f"{int(n)} clips, {len(res['failed'])} not aligned; alignment {took:.2f} s ({took / n * 1000:.1f} ms a "
              f"clip; OMP_NUM_THREADS={torch_threads})")  # fmt: skip
        return
    if args.cmd == "cuts":
        diffs, word_ms = cut_distances(args.world, args.words)
        rows = []
        for k, d in diffs.items():
            a = np.abs(d)
            q = np.percentile(a, [50, 90])
            share = f"{(a > 100).mean():.2f}"
            rows.append([k, len(d), f"{a.mean():.0f}", f"{q[0]:.0f}", f"{q[1]:.0f}", share, f"{d.mean():+.0f}"])
        hdr = ["words a chunk", "boundaries", "mean |ms|", "median", "p90", "share > 100 ms", "mean signed"]
        print(table(hdr, rows))
        print(f"a word lasts {word_ms:.0f} ms on average (clip length / words)")
        return
    if args.cmd == "tokens":
        print(interleave_tokens(args.src, args.dst, args.words, args.layout, args.share))
        return
    import tempfile

    import omnitok
    from omnitok.eval.suite import EvalConfig, evaluate
    from omnitok.generate import OmniModel

    model = omnitok.load(args.bundle)
    if args.mode == "given":  # the pipeline's read-aloud decoding, for a bundle whose manifest predates the field
        model.bundle.read_aloud_words = args.words
    elif args.mode != "plain":
        plain = OmniModel._replies

        def replies(m, s, o, media=True):  # type: ignore[no-untyped-def]
            if o.output != "speech":
                return plain(m, s, o, media)
            return interleaved_replies(m, s, o, args.mode, media)

        OmniModel._replies = replies  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "eval"
        m = evaluate(model, args.world, out, EvalConfig(limit=args.limit, tasks=["tts"]))
    wer, style = m["tts_wer"], m["tts_style_acc"]

    def f(x: float | None) -> str:  # a group with no sample (a small --limit) has no figure
        return "-" if x is None else f"{x:.3f}"

    print(
        f"{args.mode}: tts_wer {f(wer['all'])} (seen {f(wer['seen'])} / held-out {f(wer['heldout'])}), "
        f"reference {f(m['tts_wer_ref']['all'])}, style {f(style['all'])}, n={wer['n']['all']}"
    )


if __name__ == "__main__":
    main()
