"""Reading with the drawer: several captions of a picture, kept by how likely the model draws the picture from each.

The other direction of ``image_rerank.py``. For each test picture this writes candidate captions (the greedy one,
and samples at temperature 0.7 among the 32 likeliest tokens), scores each with the same LM, and keeps the best:

- **p(caption | picture)**: log-probability of the caption as the answer to "Describe the picture." (the reader);
- **p(picture | caption)**: log-probability of the picture's codes drawn from the caption (the drawer: a
  noisy-channel score, which asks whether the caption accounts for every object);
- **sum** of the two;

and reports exact captions (``omnitok.eval.metrics.caption_correct``) of each candidate, of the oracle (any
candidate exact) and of each re-ranker.

    python benchmarks/caption_rerank.py runs/demo60p/bundle --world runs/demo60p/world --split val --limit 200

A measurement for a decision, not a feature: nothing here is in the API.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import command, machine, table

CAPTION_ASK = "Describe the picture."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--world", required=True)
    ap.add_argument("--split", default="val", help="val to decide, test to report")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=6, help="the greedy caption and this many less one samples")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import omnitok
    from omnitok.decoding import Sampling
    from omnitok.eval import metrics as M
    from omnitok.sequence import Image, Text, encode
    from omnitok.world.read import iter_samples
    from omnitok.world.scene import scene_from_json

    model = omnitok.load(args.bundle)
    vocab, lm = model.vocab, model.lm
    samples = [s for _, s in zip(range(args.limit), iter_samples(args.world, args.split, "scene"), strict=False)]
    if not samples:
        raise SystemExit(f"{args.world}: no {args.split} scenes")
    truth = [scene_from_json(s["meta"]["scene"]) for s in samples]
    codes = [c.numpy() for c in model.bundle.image.encode(torch.as_tensor(np.stack([s["png"] for s in samples])))]

    def write(**opts: object) -> list[str]:
        out = []
        for lo in range(0, len(samples), 16):
            prompts = [[Image(pixels=s["png"]), Text(CAPTION_ASK)] for s in samples[lo : lo + 16]]
            for reply in model.generate_batch(prompts, output="text", **opts):
                out.append(" ".join(x.text for x in reply if isinstance(x, Text)).strip())
        return out

    t0 = time.perf_counter()
    sampled = Sampling(temperature=0.7, top_k=32)
    candidates = [write()] + [write(seed=k, text=sampled) for k in range(1, args.candidates)]
    written_s = time.perf_counter() - t0

    def log_p(requests: list[list[object]]) -> list[float]:
        """Summed log-probability of each request's assistant tokens (its loss mask), 8 requests a pass."""
        out: list[float] = []
        for lo in range(0, len(requests), 8):
            encs = [encode(r, vocab, model.bundle.text) for r in requests[lo : lo + 8]]
            width = max(len(e.ids) for e in encs)
            ids = torch.zeros((len(encs), width), dtype=torch.long)
            att = torch.zeros_like(ids)
            keep = torch.zeros((len(encs), width - 1), dtype=torch.bool)
            for i, e in enumerate(encs):
                ids[i, : len(e.ids)] = torch.as_tensor(e.ids)
                att[i, : len(e.ids)] = 1
                keep[i, : len(e.ids) - 1] = torch.as_tensor(e.mask[1:], dtype=torch.bool)
            with torch.inference_mode():
                logp = lm(input_ids=ids, attention_mask=att).logits[:, :-1].float().log_softmax(-1)
            out += torch.where(keep, logp.gather(-1, ids[:, 1:, None])[..., 0], 0.0).sum(-1).tolist()
        return out

    t0 = time.perf_counter()
    n = len(samples)
    reader = [
        log_p(
            [
                [Image(codes=codes[i], role="user"), Text(CAPTION_ASK, role="user"), Text(c[i], role="assistant")]
                for i in range(n)
            ]
        )
        for c in candidates
    ]
    drawer = [
        log_p([[Text(c[i], role="user"), Image(codes=codes[i], role="assistant")] for i in range(n)])
        for c in candidates
    ]
    scored_s = time.perf_counter() - t0

    right = [[M.caption_correct(c[i], truth[i]) for i in range(n)] for c in candidates]
    rows = [["greedy" if k == 0 else f"T 0.7, seed {k}", f"{np.mean(right[k]):.3f}"] for k in range(len(candidates))]
    rows.append(["oracle: any candidate exact", f"{np.mean([any(r[i] for r in right) for i in range(n)]):.3f}"])
    both = [[a + b for a, b in zip(x, y, strict=True)] for x, y in zip(reader, drawer, strict=True)]
    for name, score in (
        ("the reader, p(caption given picture)", reader),
        ("the drawer, p(picture given caption)", drawer),
        ("their sum", both),
    ):
        pick = [max(range(len(candidates)), key=lambda k, i=i: score[k][i]) for i in range(n)]
        rows.append([f"best by {name}", f"{np.mean([right[k][i] for i, k in enumerate(pick)]):.3f}"])
    print(f"{command()}\n{machine()}; {n} {args.split} scenes; writing {written_s:.0f} s, scoring {scored_s:.0f} s\n")
    print(table(["caption", "exact"], rows))


if __name__ == "__main__":
    main()
