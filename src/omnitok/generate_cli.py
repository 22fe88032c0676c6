"""``omnitok generate BUNDLE``: one request from files on disk, the reply written to a folder.

The command is the shell-side twin of ``OmniModel.generate``: it exists so a researcher can poke a bundle without
writing Python, and so every reply is kept with the exact request that produced it (``request.json``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from omnitok.decoding import IMAGE_CFG_SCALE
from omnitok.errors import OmnitokError
from omnitok.generate import OUTPUTS
from omnitok.io import atomic_path, atomic_write_json, ensure_writable_dir
from omnitok.sequence import Audio, Image, Segment, Text

SPEECH_RATE = 16_000


def read_image(path: Path, size: int | None, resize: bool) -> np.ndarray:
    """An image file -> uint8 [H, W, 3]; resized only when asked, because a silent resize hides a wrong input."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    if path.is_dir():
        raise OmnitokError(f"--image {path}: is a directory; give an image file")
    if not path.is_file():
        raise OmnitokError(f"--image {path}: no such file")
    try:
        with PILImage.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                if not resize:
                    raise OmnitokError(
                        f"--image {path}: {im.size[0]}x{im.size[1]} pixels, but this bundle's image tokenizer reads "
                        f"{size}x{size}; pass --resize to scale it"
                    )
                im = im.resize((size, size), PILImage.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise OmnitokError(f"--image {path}: not a readable image ({e})") from e


def read_audio(path: Path, flag: str = "--audio") -> np.ndarray:
    """A WAV/FLAC/OGG file -> float32 mono at 16 kHz (channels are averaged, other rates are resampled)."""
    import soundfile as sf

    from omnitok.tokenizers.speech import as_mono_audio

    if path.is_dir():
        raise OmnitokError(f"{flag} {path}: is a directory; give an audio file")
    if not path.is_file():
        raise OmnitokError(f"{flag} {path}: no such file")
    try:
        x, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        detail = str(e).strip().rstrip(":") or type(e).__name__
        raise OmnitokError(f"{flag} {path}: not a readable audio file ({detail}); use WAV, FLAC or OGG") from e
    try:  # the tokenizers' own check: empty, NaN/inf, resampling
        return as_mono_audio(x.mean(axis=1), int(rate), SPEECH_RATE)
    except OmnitokError as e:
        raise OmnitokError(f"{flag} {path}: {e}") from e


def build_request(
    text: str | None, images: list[Path], audios: list[Path], image_size: int | None, resize: bool
) -> list[Segment]:
    """Files and text -> one user turn in the order pictures, speech, text (the order the training data uses)."""
    sample: list[Segment] = [Image(pixels=read_image(p, image_size, resize), role="user") for p in images]
    sample += [Audio(samples=read_audio(p), sample_rate=SPEECH_RATE, role="user") for p in audios]
    if text:
        sample.append(Text(text, role="user"))
    if not sample:
        raise OmnitokError("empty prompt: give --text, --image or --audio")
    return sample


def _remove_previous_reply(out: Path) -> None:
    """The files an earlier reply in ``out`` wrote (its request.json lists them), so a text reply written where a
    picture was does not leave the old picture looking like part of it. Only names this command writes are removed."""
    try:
        listed = json.loads((out / "request.json").read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return
    for name in listed if isinstance(listed, list) else []:
        if isinstance(name, str) and re.fullmatch(r"(image_\d+\.png|speech_\d+\.wav)", name):
            (out / name).unlink(missing_ok=True)


def write_reply(segments: list[Segment], out: Path) -> dict[str, Any]:
    """Each reply segment -> a file in ``out``; returns what was written (also saved as reply.json)."""
    from PIL import Image as PILImage

    from omnitok.world.speech import encode_wav

    written: dict[str, Any] = {"text": "", "files": []}
    _remove_previous_reply(out)
    for i, seg in enumerate(segments):
        if isinstance(seg, Text):
            written["text"] += seg.text
        elif isinstance(seg, Image) and seg.pixels is not None:
            name = f"image_{i}.png"
            with atomic_path(out / name) as tmp:
                PILImage.fromarray(seg.pixels).save(tmp, format="PNG")
            written["files"].append(name)
        elif isinstance(seg, Audio) and seg.samples is not None:
            name = f"speech_{i}.wav"
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(encode_wav(np.asarray(seg.samples, np.float32), int(seg.sample_rate or SPEECH_RATE)))
            written["files"].append(name)
    with atomic_path(out / "reply.txt") as tmp:
        tmp.write_text(written["text"] + "\n", encoding="utf-8")
    return written


def generate_command(
    bundle: Annotated[Path, typer.Argument(help="bundle directory (written by `omnitok train`)")],
    text: Annotated[str | None, typer.Option("--text", "-t", help="the user's text")] = None,
    image: Annotated[list[Path] | None, typer.Option("--image", help="input picture (repeatable)")] = None,
    audio: Annotated[list[Path] | None, typer.Option("--audio", help="input speech, WAV/FLAC/OGG (repeatable)")] = None,
    output: Annotated[str, typer.Option(help=f"what to write: {' | '.join(OUTPUTS)}")] = "text",
    out: Annotated[Path, typer.Option(help="folder for reply.txt, images, WAVs and request.json")] = Path("reply"),
    voice: Annotated[str | None, typer.Option(help="speech style: voice name")] = None,
    pitch: Annotated[str | None, typer.Option(help="speech style: pitch class (low, mid, high)")] = None,
    rate: Annotated[str | None, typer.Option(help="speech style: rate class (slow, normal, fast)")] = None,
    reference: Annotated[Path | None, typer.Option(help="speak in the voice of this clip")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="cap on generated tokens")] = None,
    cfg_scale: Annotated[float, typer.Option(help="classifier-free guidance for images (1 = off)")] = IMAGE_CFG_SCALE,
    text_cfg_scale: Annotated[
        float,
        typer.Option(help="guidance for text about an --image, against the request without it (1 = off; try 3)"),
    ] = 1.0,
    best_of: Annotated[
        int,
        typer.Option(
            help="images: draw N, keep the one whose caption the model reads back likeliest; text about one "
            "--image: write N, keep the likeliest as read and as drawn (for descriptions); speech for 'Say this: "
            "<text>': speak N, keep the one in which the model hears the text likeliest; text+speech: write the "
            "answer once, speak it N times, keep the clip heard likeliest the same way"
        ),
    ] = 1,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = 0,
    temperature: Annotated[
        list[str] | None,
        typer.Option(help="MODALITY=T, repeatable (text, image, speech; 0 = greedy): instead of the default"),
    ] = None,
    top_k: Annotated[list[str] | None, typer.Option(help="MODALITY=K, repeatable")] = None,
    top_p: Annotated[list[str] | None, typer.Option(help="MODALITY=P, repeatable")] = None,
    resize: Annotated[bool, typer.Option(help="scale input pictures to the tokenizer's size")] = False,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
) -> None:
    """Run one request against a bundle and write the reply's text, images and speech to --out."""
    from omnitok.decoding import sampling_overrides
    from omnitok.generate import GenerateOptions, load
    from omnitok.threads import free_cores

    if output not in OUTPUTS:
        raise OmnitokError(f"--output must be one of {list(OUTPUTS)}, got {output!r}")
    sampling = sampling_overrides(temperature, top_k, top_p)  # checked before the bundle loads
    model = load(bundle, device=device)
    if image and model.bundle.image is None:
        raise OmnitokError(f"{bundle} has no image tokenizer, so it cannot read --image")
    if audio and model.bundle.speech is None:
        raise OmnitokError(f"{bundle} has no speech tokenizer, so it cannot read --audio")
    image_cfg = getattr(model.bundle.image, "config", None)
    sample = build_request(text, list(image or []), list(audio or []), getattr(image_cfg, "image_size", None), resize)
    style = {k: v for k, v in (("voice", voice), ("pitch", pitch), ("rate", rate)) if v}
    options: dict[str, Any] = {"output": output, "cfg_scale": cfg_scale, "text_cfg_scale": text_cfg_scale, "seed": seed}
    if style:
        options["style"] = style
    if reference is not None:
        options["reference"] = read_audio(reference, "--reference")
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    if best_of != 1:
        options["best_of"] = best_of
    options |= sampling
    GenerateOptions(**options)  # a bad option fails before --out is made
    ensure_writable_dir(out)
    with free_cores():
        t0 = time.perf_counter()
        reply = model.generate(sample, **options)
        seconds = time.perf_counter() - t0
    written = write_reply(reply, out)
    request = {
        "bundle": str(bundle),
        "text": text,
        "image": [str(p) for p in image or []],
        "audio": [str(p) for p in audio or []],
        "reference": str(reference) if reference else None,
        **{k: v for k, v in options.items() if k != "reference" and k not in sampling},
        "sampling": {m: asdict(s) for m, s in sampling.items()},
        "seconds": round(seconds, 3),
        "files": written["files"],
    }
    atomic_write_json(out / "request.json", request)
    typer.echo(json.dumps({"text": written["text"], "files": [str(out / f) for f in written["files"]]}))
