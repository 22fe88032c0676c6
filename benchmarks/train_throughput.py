"""Training throughput: ``omnitok train`` (packed rows) vs a plain ``transformers.Trainer`` (pad to longest).

Both train the same Llama (same config, same seed, same AdamW settings, constant lr, grad clip 1.0) on the same
synthetic documents, whose lengths mimic a multimodal mixture: captions (20-60 tokens), text-to-image samples
(a 16x16 image grid plus a prompt, 270-290) and speech (80-400). The Trainer gets about as many real tokens per
step as a packed step holds. Each side runs in its own subprocess, so peak RSS is its own.

Speed counts real (non-padding) tokens only, after warm-up steps, per second of wall clock.

    python benchmarks/train_throughput.py                 # about 6 minutes on 2 shared CPU cores
    python benchmarks/train_throughput.py --steps 3 --warmup 1 --docs 200 --hidden 64 --layers 1 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASKS = {"caption": (20, 60), "t2i": (270, 290), "asr": (80, 400)}


def _model_spec(args: argparse.Namespace) -> dict:
    return {
        "arch": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden // 64),
        "num_key_value_heads": max(1, args.hidden // 64),
        "max_position_embeddings": args.seq_len,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _speeds(stamps: list[tuple[float, float]], real: int, warmup: int) -> dict:
    """Real tokens per second of wall clock and per second of this process's CPU time, over the measured steps.

    CPU time is the steadier number on a machine shared with other jobs: waiting for a core does not count.
    """
    (w0, c0), (w1, c1) = stamps[warmup - 1], stamps[-1]
    return {"real_tokens_per_s": real / (w1 - w0), "real_tokens_per_cpu_s": real / (c1 - c0)}


def run_omnitok(args: argparse.Namespace) -> dict:
    from omnitok.train import loop
    from omnitok.train.recipe import parse_recipe

    stamps: list[tuple[float, float]] = []  # (wall, cpu) at the end of every optimizer step
    step_fn = loop._optimizer_step

    def timed_step(*a, **k):
        out = step_fn(*a, **k)
        stamps.append((time.perf_counter(), time.process_time()))
        return out

    loop._optimizer_step = timed_step
    out = args.out / "omnitok-run"
    shutil.rmtree(out, ignore_errors=True)
    recipe = parse_recipe(
        {
            "name": "bench",
            "seed": 0,
            "data": str(args.out / "tokens"),
            "out": str(out),
            "model": _model_spec(args),
            "batch": {"seq_len": args.seq_len, "micro_batch": args.rows, "grad_accum": 1},
            "optim": {"lr": 3e-4, "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0, "schedule": "constant"},
            "precision": args.precision,
            "checkpoint": {"every": 0, "keep": 1},
            "log": {"every": 1, "tensorboard": False},
            "stages": [{"name": "bench", "steps": args.warmup + args.steps, "mixture": dict.fromkeys(TASKS, 1 / 3)}],
        }
    )
    log = loop.train(recipe, resume=False, progress=False)["log"]
    real = log[-1]["tokens"] - log[args.warmup - 1]["tokens"]
    return {
        **_speeds(stamps, real, args.warmup),
        "real_tokens_per_step": real / args.steps,
        "padding_fraction": 1 - real / (args.steps * args.rows * args.seq_len),
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_trainer(args: argparse.Namespace) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from omnitok.data.shards import TokenDataset
    from omnitok.model import build_model

    docs = []
    for task in TASKS:
        ds = TokenDataset(args.out / "tokens", "train", task)
        for i in range(len(ds)):
            ids, mask = ds[i]
            labels = ids.copy()
            labels[mask == 0] = -100
            docs.append({"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)})
    counts: list[tuple[int, int]] = []  # (real, padded positions) per batch

    def pad_to_longest(batch: list[dict]) -> dict:
        n = max(len(x["input_ids"]) for x in batch)
        ids = torch.zeros(len(batch), n, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        attn = torch.zeros(len(batch), n, dtype=torch.long)
        for i, x in enumerate(batch):
            k = len(x["input_ids"])
            ids[i, :k], labels[i, :k], attn[i, :k] = x["input_ids"], x["labels"], 1
        counts.append((int(attn.sum()), attn.numel()))
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}

    stamps: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append((time.perf_counter(), time.process_time()))

    vocab = json.loads((args.out / "tokens" / "vocab.json").read_text())["size"]
    torch.manual_seed(0)
    model = build_model(_model_spec(args), vocab)
    targs = TrainingArguments(
        output_dir=str(args.out / "trainer-run"),
        per_device_train_batch_size=args.trainer_batch,
        max_steps=args.warmup + args.steps,
        learning_rate=3e-4,
        lr_scheduler_type="constant",
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=args.precision == "bf16",
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=docs, data_collator=pad_to_longest, callbacks=[Clock()])
    result = trainer.train()
    measured = counts[args.warmup : args.warmup + args.steps]
    real = sum(c[0] for c in measured)
    return {
        **_speeds(stamps, real, args.warmup),
        "real_tokens_per_step": real / len(measured),
        "padding_fraction": 1 - real / sum(c[1] for c in measured),
        "steps": result.global_step,
        "peak_rss_mb": _peak_rss_mb(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/omnitok-bench-train"))
    ap.add_argument("--docs", type=int, default=2000, help="documents per task")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=4, help="packed rows per omnitok step")
    ap.add_argument("--trainer-batch", type=int, default=0, help="documents per Trainer step (0: match real tokens)")
    ap.add_argument("--steps", type=int, default=12, help="measured steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the median is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per side (1: steady on a shared machine)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--variant", choices=["omnitok", "trainer"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.variant:  # child process: one side, result as JSON on the last line
        import torch

        torch.set_num_threads(args.threads)
        result = run_omnitok(args) if args.variant == "omnitok" else run_trainer(args)
        print(json.dumps(result))
        return

    from _common import command, machine, table
    from omnitok.data.shards import TokenDataset
    from omnitok.train.synthetic import write_synthetic_tokens

    shutil.rmtree(args.out, ignore_errors=True)
    write_synthetic_tokens(args.out / "tokens", vocab_size=args.vocab, tasks=TASKS, docs=args.docs, shards=1)
    mean_len = sum(TokenDataset(args.out / "tokens", "train", t).lengths.mean() for t in TASKS) / len(TASKS)
    if not args.trainer_batch:  # as many real tokens per step as a packed step (about 97 % full) holds
        args.trainer_batch = max(1, round(0.97 * args.rows * args.seq_len / mean_len))

    # Sides alternate (omnitok, Trainer, omnitok, ...) so a shared machine's load drifts over both alike.
    runs: dict[str, list[dict]] = {"omnitok": [], "trainer": []}
    for _ in range(args.repeats):
        for variant in runs:
            argv = [a for a in sys.argv[1:] if not a.startswith("--trainer-batch")]
            cmd = [sys.executable, __file__, *argv, "--variant", variant, "--trainer-batch", str(args.trainer_batch)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    print(f"machine: {machine()}\ncommand: {command()}\n")
    print(
        f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.threads} torch thread(s), "
        f"{args.precision}; docs: {args.docs} per task of {TASKS} (mean {mean_len:.0f} tokens); "
        f"omnitok {args.rows} rows x {args.seq_len}, Trainer {args.trainer_batch} docs per step; "
        f"{args.steps} measured steps after {args.warmup} warm-up; median of {args.repeats} alternating runs\n"
    )
    names = {"omnitok": "omnitok train (packed)", "trainer": "transformers Trainer (pad to longest)"}
    rows = [
        [
            names[v],
            median(v, "real_tokens_per_s"),
            median(v, "real_tokens_per_cpu_s"),
            median(v, "real_tokens_per_step"),
            f"{100 * median(v, 'padding_fraction'):.1f} %",
            max(r["peak_rss_mb"] for r in runs[v]),
        ]
        for v in runs
    ]
    headers = ["trainer", "real tokens/s (wall)", "real tokens/CPU-s", "real tokens/step", "padding", "peak RSS MB"]
    print(table(headers, rows))
    pairs = list(zip(runs["omnitok"], runs["trainer"], strict=True))
    ratios = [o["real_tokens_per_s"] / t["real_tokens_per_s"] for o, t in pairs]
    cpu_ratios = [o["real_tokens_per_cpu_s"] / t["real_tokens_per_cpu_s"] for o, t in pairs]
    pad_t, pad_o = median("trainer", "padding_fraction"), median("omnitok", "padding_fraction")
    speedup = median("omnitok", "real_tokens_per_s") / median("trainer", "real_tokens_per_s")
    cpu_speedup = median("omnitok", "real_tokens_per_cpu_s") / median("trainer", "real_tokens_per_cpu_s")
    print(
        f"\nspeed-up, wall clock: {speedup:.2f}x (per run: {', '.join(f'{r:.2f}x' for r in ratios)}); "
        f"CPU time: {cpu_speedup:.2f}x (per run: {', '.join(f'{r:.2f}x' for r in cpu_ratios)})\n"
        f"padding: {100 * pad_t:.1f} % -> {100 * pad_o:.1f} % of positions, i.e. "
        f"{100 * (1 - (1 - pad_t) / (1 - pad_o)):.0f} % fewer positions computed per real token"
    )
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
