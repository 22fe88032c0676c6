"""Image tokenizer benchmark on a built world's held-out test split.

Measures, for each trained omnitok tokenizer given (e.g. the f8 default and an f4 variant):
reconstruction PSNR / SSIM, codebook utilisation (fraction of codes used, perplexity), semantic fidelity
(the scene parser's exact-match rate of reconstructions against the originals, split into seen and
held-out attribute combinations, plus against the ground-truth scene), and CPU encode / decode
throughput. In the same run it times transformers' ``JanusVQVAE`` and ``Emu3VQVAE`` at their default
configurations with random weights (speed does not depend on the weights) on the same images, resized as
each requires, and prints the throughput ratios. Output: markdown tables (and JSON with ``--json``).

    python benchmarks/image_tokenizer.py --world runs/world --tokenizer runs/tok_f8 --tokenizer runs/tok_f4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnitok.tokenizers.base import load_image_tokenizer, load_split_images
from omnitok.tokenizers.image import psnr, ssim
from omnitok.tokenizers.quantizers import codebook_usage


def _best_rate(fn: Any, n_items: int, repeats: int, warmup: bool = True) -> float:
    """Images per second, best of ``repeats`` timed calls after one warm-up (least disturbed by other load)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_items / best


def quality(tok: Any, images: np.ndarray, samples: list[Any]) -> dict[str, Any]:
    from omnitok.world import parse_scene, scene_match
    from omnitok.world.scene import scene_from_json

    codes = tok.encode(images)
    rec = tok.decode(codes).numpy()
    level_k = getattr(tok, "level_codebook_size", tok.codebook_size)
    usage = codebook_usage(codes % level_k, level_k)
    match = {"all": [], "seen": [], "heldout": []}
    match_gt = []
    for img, r, s in zip(images, rec, samples, strict=True):
        ok = scene_match(parse_scene(r), parse_scene(img))
        match["all"].append(ok)
        match["heldout" if (s.meta or {}).get("heldout_combo") else "seen"].append(ok)
        if s.meta and "scene" in s.meta:
            match_gt.append(scene_match(parse_scene(r), scene_from_json(s.meta["scene"])))
    rate = {k: (float(np.mean(v)) if v else float("nan")) for k, v in match.items()}
    return {
        "n": len(images),
        "n_heldout": len(match["heldout"]),
        "psnr": psnr(images, rec),
        "ssim": ssim(images, rec),
        "fraction_used": usage["fraction_used"],
        "codes_used": usage["codes_used"],
        "perplexity": usage["perplexity"],
        "exact_match": rate["all"],
        "exact_match_seen": rate["seen"],
        "exact_match_heldout": rate["heldout"],
        "exact_match_vs_truth": float(np.mean(match_gt)) if match_gt else float("nan"),
    }


def speed(tok: Any, images: np.ndarray, repeats: int, warmup: bool = True) -> dict[str, float]:
    """Encode and decode throughput; the untimed first encode doubles as the warm-up for the big models."""
    codes = tok.encode(images)
    with torch.inference_mode():
        return {
            "encode_ips": _best_rate(lambda: tok.encode(images), len(images), repeats, warmup),
            "decode_ips": _best_rate(lambda: tok.decode(codes), len(images), repeats, warmup),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", required=True, type=Path)
    ap.add_argument("--tokenizer", action="append", type=Path, required=True, help="repeatable")
    ap.add_argument("--n", type=int, default=None, help="test images for quality (default: all)")
    ap.add_argument("--speed-images", type=int, default=64, help="batch for own-tokenizer throughput")
    ap.add_argument("--hf-images", type=int, default=2, help="batch for the (much slower) HF models")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="default: cores not busy with other work")
    ap.add_argument("--no-hf", action="store_true", help="skip the Janus/Emu3 timing")
    ap.add_argument("--json", type=Path, default=None, help="also write results here")
    args = ap.parse_args(argv)
    from omnitok.threads import auto_threads

    torch.set_num_threads(args.threads or auto_threads())
    load_before = os.getloadavg()[0]

    images, samples = load_split_images(args.world, "test", limit=args.n, with_meta=True)
    speed_imgs = images[: args.speed_images]
    hf_imgs = images[: args.hf_images]
    results: dict[str, Any] = {"own": {}, "hf": {}}
    for path in args.tokenizer:
        tok = load_image_tokenizer(path)
        name = f"omnitok f{tok.config.downsample} ({tok.tokens_per_item} tok, {tok.codebook_size} codes)"
        if name in results["own"]:  # two tokenizers of one shape (say, trained for different times): keep both
            name = f"{name} {path}"
        q = quality(tok, images, samples)
        s = speed(tok, speed_imgs, args.repeats)
        # the summary sits beside the tokenizer (`omnitok tokenizer train image --out DIR` writes DIR/tokenizer)
        summaries = [p / "summary.json" for p in (Path(path), Path(path).parent) if (p / "summary.json").is_file()]
        train_s = json.loads(summaries[0].read_text())["train_seconds"] if summaries else None
        results["own"][name] = q | s | {"train_seconds": train_s, "path": str(path)}
        print(f"measured {name}", file=sys.stderr)

    if not args.no_hf:
        from omnitok.tokenizers.hf import random_emu3, random_janus

        for label, make in (
            ("JanusVQVAE (default config, random weights)", random_janus),
            ("Emu3VQVAE (default config, random weights)", random_emu3),
        ):
            torch.manual_seed(0)
            tok = make() if make is random_janus else make(image_size=images.shape[1])
            s = speed(tok, hf_imgs, 1, warmup=False)  # seconds per image: one timed call is enough
            params = sum(p.numel() for p in tok.model.parameters())
            results["hf"][label] = s | {
                "image_size": tok.image_size,
                "tokens_per_item": tok.tokens_per_item,
                "codebook_size": tok.codebook_size,
                "params_m": params / 1e6,
            }
            print(f"measured {label}", file=sys.stderr)
            del tok

    cmd = "python benchmarks/image_tokenizer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"\nImage tokenizer on {args.world}/test ({len(images)} images, "
        f"{results['own'] and next(iter(results['own'].values()))['n_heldout']} with held-out combos); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after (other processes share the CPU)\n"
    )
    print(
        "| tokenizer | train s | PSNR dB | SSIM | codes used | perplexity | exact match | seen | held-out "
        "| vs truth | encode img/s | decode img/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results["own"].items():
        ts = f"{r['train_seconds']:.0f}" if r["train_seconds"] is not None else "-"
        print(
            f"| {name} | {ts} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['fraction_used']:.1%} ({r['codes_used']}) "
            f"| {r['perplexity']:.0f} | {r['exact_match']:.1%} | {r['exact_match_seen']:.1%} "
            f"| {r['exact_match_heldout']:.1%} | {r['exact_match_vs_truth']:.1%} "
            f"| {r['encode_ips']:.0f} | {r['decode_ips']:.0f} |"
        )
    if results["hf"]:
        ref_name = next(iter(results["own"]))
        ref = results["own"][ref_name]
        print(
            f"\n| model | params | input px | tokens | codes | encode img/s | decode img/s "
            f"| {ref_name.split(' (')[0]} encode / this | decode / this |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, r in results["hf"].items():
            print(
                f"| {name} | {r['params_m']:.1f}M | {r['image_size']} | {r['tokens_per_item']} | {r['codebook_size']} "
                f"| {r['encode_ips']:.2f} | {r['decode_ips']:.2f} | {ref['encode_ips'] / r['encode_ips']:.0f}x "
                f"| {ref['decode_ips'] / r['decode_ips']:.0f}x |"
            )
    print(f"\ncommand: {cmd}")
    if args.json:
        args.json.write_text(json.dumps(results | {"command": cmd}, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
