"""Generation latency on a bundle: decode speed vs ``transformers.generate``, time to first audio, image latency.

    python benchmarks/generation_latency.py runs/demo/bundle

- decode tokens/s: omnitok's loop (KV cache, modality automaton) vs ``model.generate`` (KV cache, same
  automaton as a logits processor), greedy, same prompts, same number of new tokens, batch 1 and 8;
- time to the first audio chunk of a spoken answer (``OmniModel.stream``), GPT-4o's reported average is 320 ms;
- text-to-image latency with classifier-free guidance (two rows per request) and without.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LogitsProcessorList

import omnitok
from _common import command, machine, table
from omnitok.constraints import ModalityConstraint
from omnitok.decoding import ConstraintProcessor, DecodeConfig, Sampling, decode_tokens
from omnitok.generate import AudioChunk
from omnitok.sequence import Text, prompt


def _time_pair(a, b, repeats: int, clock=time.perf_counter) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b`` run alternately, so load from other processes hits both alike.

    ``clock=time.process_time`` counts this process's CPU time only: on a shared machine (1 torch thread) it is
    the stable measure of work per token, where wall time mostly measures the neighbours.
    """
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t0 = clock()
            fn()
            out.append(clock() - t0)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = omnitok.load(args.bundle)
    lm, vocab, text = model.lm, model.vocab, model.bundle.text
    n = args.new_tokens
    rows = []
    for batch in (1, 8):
        prompts = [
            torch.tensor(prompt([Text(f"Describe scene {i}: a large red circle", role="user")], vocab, text))
            for i in range(batch)
        ]
        # forbid EOS/end so both loops produce exactly n tokens per row
        constraint = ModalityConstraint(vocab, outputs=["text"])
        constraint.table[:, vocab.special("<|eos|>")] = False
        constraint.table[:, vocab.special("<|end|>")] = False
        cfg = DecodeConfig(max_new_tokens=n, text=Sampling(0.0))
        width = max(len(p) for p in prompts)
        ids = torch.full((batch, width), vocab.special("<|pad|>"))
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1

        def hf(ids=ids, mask=mask, c=constraint):
            lm.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                logits_processor=LogitsProcessorList([ConstraintProcessor(c)]),
                pad_token_id=vocab.special("<|pad|>"),
            )

        def ours_fn(prompts=prompts, c=constraint, cfg=cfg):
            decode_tokens(lm, prompts, c, cfg)

        ours, theirs = _time_pair(ours_fn, hf, args.repeats, time.process_time)
        rows.append([f"decode, batch {batch}", n * batch / ours, n * batch / theirs, theirs / ours])
    print(f"machine: {machine()}\ncommand: {command()}\n")
    print(table(["workload", "omnitok tokens/CPU-s", "transformers.generate tokens/CPU-s", "ratio"], rows))

    lat = []
    if model.bundle.speech is not None:
        for style in (
            {"voice": "us_f1", "pitch": "mid", "rate": "normal"},
            {"voice": "us_m1", "pitch": "low", "rate": "fast"},
        ):
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for ev in model.stream(
                    [Text("Say this: a small blue star at the bottom")], output="speech", style=style, seed=0
                ):
                    if isinstance(ev, AudioChunk):
                        lat.append(time.perf_counter() - t0)
                        break
    img = _time_pair(
        *(
            lambda s=scale: model.generate([Text("a large red circle")], output="image", cfg_scale=s, seed=0)
            for scale in (3.0, 1.0)
        ),
        args.repeats,
    )
    print()
    lat_rows = [
        [
            "time to first audio chunk (ms, median)",
            f"{1000 * statistics.median(lat):.0f}" if lat else "no speech tokenizer",
        ],
        ["text-to-image, CFG 3.0 (ms)", f"{1000 * img[0]:.0f}"],
        ["text-to-image, no CFG (ms)", f"{1000 * img[1]:.0f}"],
    ]
    print(table(["latency", "value"], lat_rows))


if __name__ == "__main__":
    main()
