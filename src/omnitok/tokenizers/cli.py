"""``omnitok tokenizer ...``: train, encode and decode with modality tokenizers.

``omnitok tokenizer train image --data WORLD --out DIR`` trains the FSQ image tokenizer (resumable: run the
same command again to continue); ``encode`` turns PNGs into code ids (JSON) and ``decode`` turns them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from omnitok.errors import OmnitokError

app = typer.Typer(help="Train, encode and decode with modality tokenizers.", no_args_is_help=True)
train_app = typer.Typer(help="Train a tokenizer.", no_args_is_help=True)
app.add_typer(train_app, name="train")
console = Console()


def _int_list(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError as e:
        raise OmnitokError(f"--{name}: expected comma-separated integers like 8,8,8,5,5,5, got {text!r}") from e
    if not vals:
        raise OmnitokError(f"--{name}: expected at least one integer, got {text!r}")
    return vals


def _read_recipe(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    if not path.is_file():
        raise OmnitokError(f"recipe not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise OmnitokError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise OmnitokError(f"recipe {path}: expected a mapping at the top level")
    section = doc.get("image_tokenizer", doc)
    if not isinstance(section, dict):
        raise OmnitokError(f"recipe {path}: 'image_tokenizer' must be a mapping")
    return dict(section)


def _start_afresh(out: Path, resume: bool) -> None:
    """``--no-resume``: remove OUT/checkpoint, only once the run's config and data have been checked."""
    if resume is False and (out / "checkpoint").exists():
        import shutil

        shutil.rmtree(out / "checkpoint")


@train_app.command("image")
def train_image(
    data: Path = typer.Option(..., "--data", help="World directory with train/ (and val/) WebDataset shards."),
    out: Path = typer.Option(..., "--out", help="Run directory; the tokenizer lands in OUT/tokenizer/."),
    recipe: Path | None = typer.Option(None, "--recipe", help="YAML with train fields and an 'arch' mapping."),
    steps: int | None = typer.Option(None, help="Optimizer steps."),
    batch_size: int | None = typer.Option(None, help="Images per step."),
    lr: float | None = typer.Option(None, help="Peak learning rate (cosine decay after warmup)."),
    downsample: int | None = typer.Option(None, help="4, 8 or 16: tokens per 64x64 image are 256, 64 or 16."),
    levels: str | None = typer.Option(None, help="FSQ levels, e.g. 8,8,8,5,5,5."),
    num_quantizers: int | None = typer.Option(None, help="Residual FSQ stages (1 = plain FSQ)."),
    widths: str | None = typer.Option(None, help="Channels per stage, e.g. 32,64,96."),
    depths: str | None = typer.Option(None, help="Gated-CNN blocks per stage, e.g. 1,1,2."),
    edge_weight: float | None = typer.Option(None, help="Weight of the gradient/edge loss."),
    disc_weight: float | None = typer.Option(None, help="Patch discriminator weight (0 = off; GPU recipes)."),
    max_images: int | None = typer.Option(None, help="Use at most this many training images."),
    max_minutes: float | None = typer.Option(None, help="Stop (and checkpoint) after this much training time."),
    device: str | None = typer.Option(None, help="torch device, e.g. cpu or cuda."),
    seed: int | None = typer.Option(None, help="Seed for init and batch order."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/checkpoint if present."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train the FSQ image tokenizer on a world's images."""
    from omnitok.tokenizers.base import find_image_shards
    from omnitok.tokenizers.image import TrainConfig, train_image_tokenizer

    cfg = _read_recipe(recipe)
    arch = dict(cfg.pop("arch", {}) or {})
    flags = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "edge_weight": edge_weight,
        "disc_weight": disc_weight,
        "max_images": max_images,
        "max_minutes": max_minutes,
        "device": device,
        "seed": seed,
    }
    cfg.update({k: v for k, v in flags.items() if v is not None})
    arch_flags = {
        "downsample": downsample,
        "levels": _int_list(levels, "levels"),
        "num_quantizers": num_quantizers,
        "widths": _int_list(widths, "widths"),
        "depths": _int_list(depths, "depths"),
    }
    arch.update({k: v for k, v in arch_flags.items() if v is not None})
    cfg["arch"] = arch
    train = TrainConfig.from_dict(cfg, str(recipe or "flags"))
    find_image_shards(data, "train")  # a bad config or --data fails before --no-resume removes anything
    _start_afresh(out, resume)
    summary = train_image_tokenizer(data, out, train, resume=resume, progress=progress)
    val = summary["val"]
    console.print(
        f"tokenizer saved to {summary['tokenizer']}  ({summary['tokens_per_item']} tokens/image, "
        f"codebook {summary['codebook_size']})  val PSNR {val['psnr']:.2f} dB  SSIM {val['ssim']:.4f}  "
        f"trained {summary['train_seconds']:.0f}s"
    )


@train_app.command("speech")
def train_speech(
    data: Path = typer.Option(..., "--data", help="World directory built with speech (train/ and val/ shards)."),
    out: Path = typer.Option(..., "--out", help="Run directory; the tokenizer lands in OUT/tokenizer/."),
    recipe: Path | None = typer.Option(
        None, "--recipe", help="YAML with train fields and an 'arch' mapping (or a 'speech_tokenizer' section)."
    ),
    steps: int | None = typer.Option(None, help="Optimizer steps."),
    batch_seconds: float | None = typer.Option(None, help="Seconds of audio per batch."),
    lr: float | None = typer.Option(None, help="Peak learning rate (cosine decay after warmup)."),
    levels: str | None = typer.Option(None, help="FSQ levels, e.g. 8,5,5,5 (1000 codes)."),
    recon_grad: float | None = typer.Option(
        None, help="Share of the mel loss gradient reaching the encoder (0 = tokens shaped by phone CTC only)."
    ),
    max_clips: int | None = typer.Option(None, help="Use at most this many training utterances."),
    max_minutes: float | None = typer.Option(None, help="Stop (and checkpoint) after this much training time."),
    threads: int | None = typer.Option(None, help="torch threads (default: the cores other processes leave free now)."),
    seed: int | None = typer.Option(None, help="Seed for init and batch order."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/checkpoint if present."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train omnitok's speech tokenizer (FSQ content tokens at 25/s, style kept apart) on a world's speech."""
    from omnitok.tokenizers.speech_train import SpeechTrainConfig, read_speech_recipe, train_speech_tokenizer
    from omnitok.world.read import load_manifest

    cfg = read_speech_recipe(recipe)
    arch = dict(cfg.pop("arch", {}) or {})
    flags = {
        "steps": steps,
        "batch_seconds": batch_seconds,
        "lr": lr,
        "recon_grad": recon_grad,
        "max_clips": max_clips,
        "max_minutes": max_minutes,
        "threads": threads,
        "seed": seed,
    }
    cfg.update({k: v for k, v in flags.items() if v is not None})
    lv = _int_list(levels, "levels")
    if lv is not None:
        arch["levels"] = lv
    cfg["arch"] = arch
    train = SpeechTrainConfig.from_dict(cfg, str(recipe or "flags"))
    load_manifest(data)  # a bad config or --data fails before --no-resume removes anything
    _start_afresh(out, resume)
    summary = train_speech_tokenizer(data, out, train, resume=resume, progress=progress)
    val = summary["val"]
    console.print(
        f"tokenizer saved to {summary['tokenizer']}  ({summary['frame_rate']:.0f} tokens/s, codebook "
        f"{summary['codebook_size']}, {summary['bitrate']:.0f} bit/s)  val mel L1 {val.get('mel_l1', float('nan')):.3f}"
        f"  phone error {val.get('per', float('nan')):.3f}  trained {summary['train_seconds']:.0f}s"
    )


@app.command("encode")
def encode(
    images: list[Path] = typer.Argument(..., help="PNG files."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer directory (or a training run directory)."),
    out: Path = typer.Option(..., "--out", help="JSON file: {file name: [codes]}."),
) -> None:
    """Encode PNG images to code ids."""
    import numpy as np

    from omnitok.io import atomic_write_json
    from omnitok.tokenizers.base import load_image_tokenizer, read_image_file

    if out.is_dir():
        raise OmnitokError(f"--out {out} is a directory; give the JSON file to write, e.g. {out / 'codes.json'}")
    tok = load_image_tokenizer(tokenizer)
    arrays = [read_image_file(p) for p in images]
    result = {}
    for p, a in zip(images, arrays, strict=True):
        codes = tok.encode(np.asarray(a)).reshape(-1).tolist()
        if len(codes) != tok.tokens_per_item:  # the file records one grid, which decode and the LM rely on
            h, w = np.asarray(a).shape[:2]
            raise OmnitokError(
                f"{p}: a {w}x{h} image gives {len(codes)} codes; this tokenizer's grid is "
                f"{'x'.join(map(str, tok.grid))} = {tok.tokens_per_item} codes (the image size it was trained on)"
            )
        result[p.name] = codes
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"codebook_size": tok.codebook_size, "grid": list(tok.grid), "codes": result})
    console.print(f"encoded {len(arrays)} image(s) to {out} ({tok.tokens_per_item} tokens each)")


@app.command("decode")
def decode(
    codes: Path = typer.Argument(..., help="JSON written by `omnitok tokenizer encode`."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer directory (or a training run directory)."),
    out: Path = typer.Option(..., "--out", help="Directory for the decoded PNGs."),
) -> None:
    """Decode code ids back to PNG images."""
    import torch
    from PIL import Image

    from omnitok.io import atomic_path, ensure_writable_dir, read_json
    from omnitok.tokenizers.base import load_image_tokenizer

    doc = read_json(codes, "codes file")
    table = doc.get("codes") if isinstance(doc, dict) else None
    if not isinstance(table, dict) or not table:
        raise OmnitokError(f"{codes}: expected a JSON object with a non-empty 'codes' mapping of name -> ids")
    tok = load_image_tokenizer(tokenizer)
    images = {}
    for name, ids in table.items():  # every entry decoded before the first file is written
        try:
            t = torch.tensor(ids)
        except (TypeError, ValueError) as e:
            raise OmnitokError(f"{codes}: codes for {name!r} are not a list of integers: {json.dumps(ids)[:80]}") from e
        images[name] = tok.decode(t).numpy()
    out_dir = ensure_writable_dir(out, "decode output directory")
    for name, img in images.items():
        target = out_dir / (Path(name).stem + ".png")
        with atomic_path(target) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
    console.print(f"decoded {len(table)} image(s) into {out_dir}")
