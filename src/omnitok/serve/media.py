"""Bytes on the wire <-> arrays the model reads and writes.

Inputs arrive as base64 strings or data URLs inside JSON, or as uploaded files. Every refusal is an
:class:`InputError` naming the request field, so the client learns which part of its request was wrong.

Policies (also documented in ``GET /v1/omnitok/info``):

* **Images** are read with Pillow (PNG, JPEG, WebP, GIF's first frame, BMP...), converted to RGB (transparent
  pixels composited over white), centre-cropped to a square and resized with Lanczos filtering to the image
  tokenizer's size. The model was trained on square images of exactly that size, and cropping keeps objects
  at their aspect ratio instead of squashing them.
* **Audio** is WAV (integer PCM, 8/16/32 bit, or 32-bit float; mono or stereo, any sample rate) or raw
  ``pcm16`` (16 kHz mono signed 16-bit little-endian, OpenAI's streaming format). Stereo is averaged to mono and
  other rates are resampled to 16 kHz with a polyphase filter (``scipy.signal.resample_poly``), since every
  speech tokenizer here is 16 kHz mono. Compressed formats (mp3, flac, ogg, ...) are refused: decoding them
  would need a native codec library the server does not ship.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import wave

import numpy as np

from omnitok.serve.errors import InputError

PCM16_RATE = 16000
MAX_IMAGE_PIXELS = 40_000_000  # refuse decompression bombs before decoding them
COMPRESSED_AUDIO = ("mp3", "flac", "ogg", "opus", "aac", "m4a", "webm", "mp4", "mpeg", "mpga")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


# --------------------------------------------------------------------------------------------- base64 / URLs


def b64decode(data: object, param: str) -> bytes:
    """Strict base64 (standard or URL-safe alphabet, whitespace tolerated); refuses anything else."""
    if not isinstance(data, str):
        raise InputError(f"expected a base64 string, got {type(data).__name__}", param)
    s = "".join(data.split())
    if not s:
        raise InputError("empty base64 data", param)
    if "-" in s or "_" in s:
        s = s.replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"invalid base64 ({e})", param) from e


def parse_data_url(url: object, param: str) -> tuple[str, bytes]:
    """``data:image/png;base64,...`` -> (mime type, bytes). Remote URLs are refused: the server never fetches."""
    if not isinstance(url, str):
        raise InputError(f"expected a data URL string, got {type(url).__name__}", param)
    if re.match(r"^[a-z][a-z0-9+.-]*://", url, re.I):
        raise InputError(
            "only data URLs (data:image/png;base64,...) are accepted: this server never fetches remote URLs", param
        )
    m = _DATA_URL.match(url)
    if not m:
        raise InputError("expected a data URL like data:image/png;base64,<data>", param)
    if not m.group("b64"):
        raise InputError("data URL must be base64-encoded (data:<mime>;base64,<data>)", param)
    return (m.group("mime") or "").lower(), b64decode(url[m.end() :], param)


# --------------------------------------------------------------------------------------------- images


def decode_image(data: bytes, size: int, param: str) -> np.ndarray:
    """Image file bytes -> ``size`` x ``size`` x 3 uint8 (RGB, centre-cropped, Lanczos-resized)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError("not an image (0 bytes)", param)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
                raise InputError(f"image is {w}x{h}; expected at most {MAX_IMAGE_PIXELS} pixels", param)
            im.seek(0)
            im.load()
            rgba = im.convert("RGBA")
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise InputError(f"not an image ({_short(e)})", param) from e
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    side = min(rgb.size)
    left, top = (rgb.size[0] - side) // 2, (rgb.size[1] - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side))
    if side != size:
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8).copy()


def encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), "RGB").save(out, format="PNG")
    return out.getvalue()


def png_data_url(pixels: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(pixels)).decode("ascii")


# --------------------------------------------------------------------------------------------- audio


def sniff_audio_format(data: bytes, filename: str | None = None) -> str:
    """Guess an uploaded file's format from its header, then its extension: 'wav', 'pcm16' or another name."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    magics = ((b"fLaC", "flac"), (b"OggS", "ogg"), (b"ID3", "mp3"), (b"\xff\xfb", "mp3"), (b"\xff\xf3", "mp3"))
    for magic, name in magics:
        if data.startswith(magic):
            return name
    ext = (filename or "").rsplit(".", 1)[-1].lower() if filename and "." in filename else ""
    if ext in ("pcm", "raw", "pcm16", "s16le"):
        return "pcm16"
    return ext or "unknown"


def check_audio_format(fmt: str, param: str) -> str:
    """The normalised name of a supported input format ('wav' or 'pcm16'); refuses the rest by name."""
    fmt = (fmt or "").lower()
    if fmt in ("pcm16", "pcm"):
        return "pcm16"
    if fmt == "wav":
        return fmt
    if fmt in COMPRESSED_AUDIO:
        raise InputError(f"audio format {fmt!r} is not supported: send WAV (PCM) or raw pcm16 (16 kHz mono)", param)
    raise InputError(f"unknown audio format {fmt!r}: expected 'wav' or 'pcm16' (16 kHz mono s16le)", param)


def decode_audio(data: bytes, fmt: str, param: str, target_rate: int = PCM16_RATE) -> np.ndarray:
    """Audio bytes in ``fmt`` ('wav' or 'pcm16') -> float32 mono at ``target_rate``."""
    from omnitok.tokenizers.speech import as_mono_audio

    if check_audio_format(fmt, param) == "wav":
        samples, rate = _read_wav(data, param)
    else:
        if len(data) % 2:
            raise InputError(f"pcm16 audio must have an even number of bytes (16-bit samples), got {len(data)}", param)
        samples, rate = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0, PCM16_RATE
    if samples.size == 0:
        raise InputError("audio has no samples", param)
    try:
        return as_mono_audio(samples, int(rate), target_rate)
    except InputError:
        raise
    except Exception as e:  # OmnitokError from the shared checker: keep its message, add the field
        raise InputError(str(e), param) from e


def _read_wav(data: bytes, param: str) -> tuple[np.ndarray, int]:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InputError(f"not a WAV file (expected a RIFF/WAVE header, got {data[:12]!r})", param)
    fmt_tag = _wav_format_tag(data)
    if fmt_tag == 3:  # IEEE float: the wave module only reads integer PCM
        return _read_float_wav(data, param)
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError, ValueError) as e:
        raise InputError(f"unsupported or corrupt WAV (integer PCM or 32-bit float expected): {e}", param) from e
    if channels not in (1, 2):
        raise InputError(f"WAV has {channels} channels; expected mono or stereo", param)
    if width == 1:
        x = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(frames[: len(frames) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
    elif width == 4:
        x = (np.frombuffer(frames[: len(frames) // 4 * 4], dtype="<i4").astype(np.float64) / 2**31).astype(np.float32)
    else:
        raise InputError(f"WAV sample width {8 * width} bit is not supported: expected 8, 16 or 32", param)
    x = x[: x.size // channels * channels].reshape(-1, channels)
    return (x.mean(axis=1) if channels == 2 else x[:, 0]).astype(np.float32), rate


def _wav_chunks(data: bytes) -> dict[bytes, bytes]:
    chunks, pos = {}, 12
    while pos + 8 <= len(data):
        cid, n = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        chunks.setdefault(cid, data[pos + 8 : pos + 8 + n])
        pos += 8 + n + (n & 1)
    return chunks


def _wav_format_tag(data: bytes) -> int:
    fmt = _wav_chunks(data).get(b"fmt ", b"")
    tag = int.from_bytes(fmt[:2], "little") if len(fmt) >= 2 else 0
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag starts the sub-format GUID
        tag = int.from_bytes(fmt[24:26], "little")
    return tag


def _read_float_wav(data: bytes, param: str) -> tuple[np.ndarray, int]:
    chunks = _wav_chunks(data)
    fmt, body = chunks.get(b"fmt "), chunks.get(b"data")
    if fmt is None or body is None or len(fmt) < 16:
        raise InputError("corrupt WAV: missing fmt or data chunk", param)
    channels = int.from_bytes(fmt[2:4], "little")
    rate = int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    if bits != 32 or channels not in (1, 2):
        raise InputError(f"float WAV must be 32-bit mono or stereo, got {bits} bit, {channels} channels", param)
    x = np.frombuffer(body[: len(body) // (4 * channels) * 4 * channels], dtype="<f4").reshape(-1, channels)
    return (x.mean(axis=1) if channels == 2 else x[:, 0]).astype(np.float32), rate


def encode_pcm16(samples: np.ndarray) -> bytes:
    """float samples in [-1, 1] -> raw signed 16-bit little-endian bytes."""
    x = np.nan_to_num(np.asarray(samples, dtype=np.float64))
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """Mono PCM16 WAV bytes (also for empty audio: a valid file with no frames)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(encode_pcm16(samples))
    return out.getvalue()


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."
