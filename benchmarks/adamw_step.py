"""AdamW's step alone: torch's for-loop (its default on a CPU), foreach, and the fused kernel, on omnitok's models.

torch fuses AdamW by default on no device and runs its for-loop on a CPU: ~10 small operations per parameter
tensor, which on a 2-core machine cost a measurable share of a tokenizer's step. Each arm steps the same
parameters with the same gradients (drawn once per model and seed), arms interleaved over ``--rounds``; the last
column is how far each arm's parameters end from the for-loop's after the timed steps (float rounding, not a
different update). Gradients are laid out like their parameters, as autograd's are: given a contiguous gradient for
a channels_last convolution weight, the fused kernel silently updates it wrong (0.8 of the weight's largest value
apart after 23 steps here), which is why loaded optimizer moments are re-laid out too
(``omnitok.optim.load_state``).

    python benchmarks/adamw_step.py --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from _common import command, machine, table

ARMS = {"for-loop (torch's CPU default)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _models() -> dict[str, torch.nn.Module]:
    from omnitok.demo import IMAGE_LEVELS, RECIPE
    from omnitok.model import build_model
    from omnitok.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
    from omnitok.tokenizers.speech import SpeechTokenizer, SpeechTokenizerConfig
    from omnitok.train.recipe import load_recipe

    spec = load_recipe(RECIPE).model
    return {
        "speech tokenizer (default)": SpeechTokenizer(SpeechTokenizerConfig()),
        "image tokenizer (the demo's levels)": ImageTokenizer(ImageTokenizerConfig(levels=IMAGE_LEVELS)),
        "LM, every parameter (the demo recipe's shape, vocab 2,602)": build_model(spec, 2602),
    }


def _time(model: torch.nn.Module, grads: list[torch.Tensor], kw: dict, steps: int) -> tuple[float, list[torch.Tensor]]:
    """ms per step over ``steps`` after 3 warm-up steps, and the parameters at the end."""
    m = copy.deepcopy(model)
    params = [p for p in m.parameters() if p.requires_grad]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-4, **kw)
    for _ in range(3):
        opt.step()
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t) / steps * 1000, [p.detach() for p in params]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}, {args.threads} torch threads, torch {torch.__version__}")
    print(command())
    rows = []
    for name, model in _models().items():
        params = [p for p in model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(0)
        # laid out like their parameters, as autograd's are: the fused kernel walks them by the parameter's strides
        grads = [torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen) * 1e-2) for p in params]
        ms: dict[str, list[float]] = {a: [] for a in ARMS}
        ends: dict[str, list[torch.Tensor]] = {}
        for r in range(args.rounds):
            for arm in ARMS if r % 2 == 0 else list(ARMS)[::-1]:
                t, ends[arm] = _time(model, grads, ARMS[arm], args.steps)
                ms[arm].append(t)
        base = statistics.median(ms[next(iter(ARMS))])
        ref = ends[next(iter(ARMS))]
        for arm in ARMS:
            diff = max(
                float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(ends[arm], ref, strict=True)
            )
            med = statistics.median(ms[arm])
            rows.append(
                [
                    name,
                    f"{len(params)} / {sum(p.numel() for p in params) / 1e6:.2f} M",
                    arm,
                    f"{med:.1f}",
                    " / ".join(f"{x:.1f}" for x in ms[arm]),
                    f"{base / med:.2f}x",
                    f"{diff:.1e}",
                ]
            )
    print(
        table(
            ["model", "tensors / parameters", "AdamW", "ms a step (median)", "each round", "speed-up", "max rel. diff"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
