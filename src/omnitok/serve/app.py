"""The OpenAI-compatible HTTP API over one bundle: ``create_app(model)`` returns a FastAPI app.

Endpoints (all under ``/v1``; ``GET /`` serves the web chat page when ``serve/static/index.html`` exists):

* ``GET /models``, ``GET /models/{id}``: the one model.
* ``POST /chat/completions``: text, image (data URL) and audio (``input_audio``) in; text out, spoken answers
  (``modalities: ["text", "audio"]``) and, as an omnitok extension, images (``"image"`` in ``modalities``) out;
  ``stream: true`` sends ``chat.completion.chunk`` server-sent events, audio as base64 pcm16 deltas.
* ``POST /audio/speech``: text -> WAV or raw pcm16. ``POST /audio/transcriptions``: WAV/pcm16 upload -> text.
* ``POST /images/generations``: prompt -> base64 PNG.
* ``GET /omnitok/info``: what the bundle reads and writes, its voices, pitches, rates, image size, batch stats.

Every bad input is a 4xx in OpenAI's error shape (see ``errors.py``); unexpected failures are logged and
answered 500 in the same shape while the server keeps running. Generation happens on the batcher's single
worker thread (``batcher.py``); the request handlers only parse, validate, queue and format.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnitok.errors import OmnitokError
from omnitok.generate import OmniModel
from omnitok.sequence import Audio, Image, Segment, Text
from omnitok.serve import media
from omnitok.serve.batcher import Batcher, QueueFull
from omnitok.serve.engine import ASR_PROMPT, EDIT_CFG, TTS_PROMPT, Engine, Result, Task
from omnitok.serve.errors import ApiError, InputError, bad_request, error_body
from omnitok.serve.schemas import AudioPart, ChatRequest, ImagePart, ImageRequest, SpeechRequest, TextPart

log = logging.getLogger("omnitok.serve")
STATIC = Path(__file__).parent / "static"
ROLE = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
AUDIO_EXPIRY_S = 3600
MAX_BEST_OF = 16  # a request's best_of: each candidate is a full drawing or clip on the shared worker


# ------------------------------------------------------------------------------------------------- body limit


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, counting bytes as they arrive (not only Content-Length).

    The body is read here in full (every endpoint needs it whole anyway) and replayed to the app, so the limit
    holds for chunked uploads and lying Content-Length headers alike. An oversize body is still drained (up to
    ``DRAIN_BYTES``) before the 413 goes out: closing a socket with unread data resets the connection, and the
    client would see a reset instead of the error. Clients that sent ``Expect: 100-continue`` are answered at once.
    """

    DRAIN_BYTES = 256 * 2**20

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if headers.get(b"expect", b"").lower() != b"100-continue" and int(declared) <= self.DRAIN_BYTES:
                await self._drain(receive)
            await self._too_large(send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, total)
                await self._too_large(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, seen: int = 0) -> None:
        while seen <= self.DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _too_large(self, send: Send) -> None:
        mb = self.max_bytes / 2**20
        body = json.dumps(
            error_body(f"request body is larger than the {mb:g} MB limit", "invalid_request_error", "payload_too_large")
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------------- helpers


def _json_error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse(error_body(message, type_, code, param), status_code=status, headers=headers)


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    """pydantic's ('body', 'messages', 0, 'content') -> 'messages[0].content' (union branch names dropped)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part.startswith(("function-", "tagged-union"))):
            continue  # pydantic's names of union branches, e.g. 'list[union[TextPart,...]]'
        elif isinstance(part, str) and part in ("TextPart", "ImagePart", "AudioPart", "str"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    if first.get("type") == "model_attributes_type" and not _loc(first.get("loc", ())):
        return "request body must be a JSON object", None
    # A content part of an unknown type fails every branch of the union (and the plain-string form first): name the
    # part's type and the ones there are, not "Input should be a valid string".
    branches: dict[tuple[Any, ...], set[str]] = {}  # part -> the union branches that reported an error
    tags: dict[tuple[Any, ...], list[dict[str, Any]]] = {}  # part -> the branches whose 'type' did not match
    for e in errors:
        loc = tuple(e.get("loc", ()))
        if len(loc) >= 3 and loc[-2] in ("TextPart", "ImagePart", "AudioPart"):
            branches.setdefault(loc[:-2], set()).add(loc[-2])
            if e.get("type") == "literal_error" and loc[-1] == "type":
                tags.setdefault(loc[:-2], []).append(e)
    for part, group in tags.items():
        if len(group) > 1 and len(group) == len(branches[part]):  # no branch took the part's type
            where = _loc(group[0]["loc"])
            expected = ", ".join(str(g.get("ctx", {}).get("expected")) for g in group)
            return f"{where}: expected one of {expected}, got {group[0].get('input')!r}", where
    param = _loc(first.get("loc", ())) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}" if param else msg) + more, param


def _overloaded(e: QueueFull) -> ApiError:
    return ApiError(503, str(e), type="server_overloaded", code="queue_full", headers={"Retry-After": "1"})


def _now() -> int:
    return int(time.time())


def _image_part(pixels: np.ndarray) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": media.png_data_url(pixels)}}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _to_rate(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target or samples.size == 0:
        return samples
    from omnitok.tokenizers.speech import as_mono_audio

    return as_mono_audio(samples.astype(np.float32), int(rate), target)


# ------------------------------------------------------------------------------------------------- the app


class Server:
    """Request handling: turns validated bodies into engine tasks and results into OpenAI responses."""

    def __init__(self, model: OmniModel, model_name: str, engine: Engine, batcher: Batcher) -> None:
        self.model = model
        self.model_name = model_name
        self.engine = engine
        self.batcher = batcher
        self.created = _now()

    # --- shared checks ---------------------------------------------------------------------------------
    def check_model(self, name: str | None, required: bool = True) -> None:
        if name is None or name == "":
            if required:
                raise bad_request("model: required (see GET /v1/models)", "model")
            return
        if name != self.model_name:
            raise ApiError(
                404,
                f"The model {name!r} does not exist; this server serves {self.model_name!r}",
                code="model_not_found",
                param="model",
            )

    def _need(self, what: str, direction: str, param: str) -> None:
        have = self.engine.can_read if direction == "read" else self.engine.can_write
        if what not in have:
            verb = "read" if direction == "read" else "produce"
            message = f"this model cannot {verb} {what} (it {direction}s {have})"
            raise bad_request(message, param, "unsupported_modality")

    def voice(self, name: str, param: str) -> str | None:
        try:
            return self.engine.resolve_voice(name)
        except ValueError as e:
            raise bad_request(str(e), param, "invalid_voice") from e

    async def run(self, task: Task) -> Result:
        try:
            return await self.batcher.submit(task.key, task, self.engine.run_batch)
        except QueueFull as e:
            raise _overloaded(e) from e

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "omnitok"}

    # --- chat ------------------------------------------------------------------------------------------
    def segments(self, req: ChatRequest) -> list[Segment]:
        """Messages -> segments (media decoded and checked, every problem named by its field)."""
        size = self.engine.image_size
        out: list[Segment] = []
        for i, msg in enumerate(req.messages):
            role = ROLE[msg.role]
            if msg.content is None:
                continue
            if isinstance(msg.content, str):
                out.append(Text(msg.content, role=role))
                continue
            for j, part in enumerate(msg.content):
                where = f"messages[{i}].content[{j}]"
                if isinstance(part, TextPart):
                    out.append(Text(part.text, role=role))
                elif isinstance(part, ImagePart):
                    self._need("image", "read", where)
                    _, data = media.parse_data_url(part.image_url.url, f"{where}.image_url.url")
                    out.append(Image(pixels=media.decode_image(data, size or 64, f"{where}.image_url"), role=role))
                elif isinstance(part, AudioPart):
                    self._need("audio", "read", where)
                    a = part.input_audio
                    fmt = media.check_audio_format(a.format, f"{where}.input_audio.format")
                    raw = media.b64decode(a.data, f"{where}.input_audio.data")
                    samples = media.decode_audio(raw, fmt, f"{where}.input_audio")
                    out.append(Audio(samples=samples, sample_rate=media.PCM16_RATE, role=role))
        if not out:
            raise bad_request("messages: no content to answer (every message is empty)", "messages")
        if all(isinstance(s, Text) and not s.text.strip() for s in out):
            raise bad_request("messages: the prompt is empty (only blank text)", "messages")
        return out

    def chat_task(self, req: ChatRequest) -> tuple[Task, str | None]:
        """Validate a chat request's options; returns the task (without segments yet) and the audio format."""
        self.check_model(req.model)
        if req.n not in (None, 1):
            raise bad_request(f"n: only n=1 is supported, got {req.n}", "n")
        modalities = set(req.modalities or ["text"])
        if not modalities:
            raise bad_request("modalities: give at least one of 'text', 'audio', 'image'", "modalities")
        audio_format = None
        style = None
        if "audio" in modalities and "image" in modalities:
            raise bad_request("modalities: 'audio' and 'image' cannot be asked for together", "modalities")
        if "audio" in modalities:
            self._need("audio", "write", "modalities")
            voice_name = req.audio.voice if req.audio is not None else (self.engine.voices or ["default"])[0]
            audio_format = (req.audio.format if req.audio is not None else "wav").lower()
            if audio_format not in ("wav", "pcm16"):
                raise bad_request(
                    f"audio.format: {audio_format!r} is not supported; use 'wav' or 'pcm16' (16 kHz mono s16le)",
                    "audio.format",
                    "unsupported_audio_format",
                )
            voice = self.voice(voice_name, "audio.voice")
            style = {"voice": voice} if voice is not None else {}
            for field_name, known in (("pitch", self.engine.pitches), ("rate", self.engine.rates)):
                value = getattr(req.audio, field_name) if req.audio is not None else None
                if value is not None:
                    if value not in known:
                        raise bad_request(
                            f"audio.{field_name}: unknown {value!r}; valid: {known}", f"audio.{field_name}"
                        )
                    style[field_name] = value
            style = style or None
            output = "speech_answer"
        elif "image" in modalities:
            self._need("image", "write", "modalities")
            output = "image"
        else:
            output = "text"
        limit = req.max_completion_tokens or req.max_tokens
        task = Task([], output, style, limit, req.temperature, req.top_p, req.seed)
        if req.best_of not in (None, 1):
            if not 1 <= req.best_of <= MAX_BEST_OF:
                raise bad_request(f"best_of: between 1 and {MAX_BEST_OF}, got {req.best_of}", "best_of")
            if output not in ("text", "speech_answer") or req.stream:
                raise bad_request(
                    "best_of: re-ranks a text reply describing one picture (modalities ['text']) or the clip of a "
                    "spoken answer (modalities ['text', 'audio']), without stream (pictures: /v1/images/generations "
                    "takes best_of)",
                    "best_of",
                )
            task.best_of = req.best_of
        return task, audio_format

    async def chat(self, request: Request) -> Response:
        req = ChatRequest.model_validate(await _json_body(request))
        task, audio_format = self.chat_task(req)
        task.segments = await run_in_threadpool(self.segments, req)
        if task.output == "image" and any(isinstance(s, Image) for s in task.segments):
            task.cfg_scale = EDIT_CFG  # editing a given picture: guidance off, as evaluated
        if task.best_of > 1 and task.output == "text":  # checked here, not in the worker, where it would fail its batch
            pictures = sum(isinstance(s, Image) for s in task.segments)
            if pictures != 1:
                raise bad_request(
                    f"best_of: re-ranks descriptions of one picture; the messages hold {pictures}", "best_of"
                )
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return await self.chat_stream(task, cid)
        result = await self.run(task)
        message: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
        if task.output == "speech_answer":
            assert result.audio is not None
            message["content"] = None
            message["audio"] = {
                "id": f"audio_{uuid.uuid4().hex}",
                "data": _b64(self._audio_bytes(result.audio, result.sample_rate, audio_format or "wav")),
                "expires_at": _now() + AUDIO_EXPIRY_S,
                "transcript": result.text,
            }
        elif task.output == "image":
            message["content"] = [_image_part(p) for p in result.images]
        body = {
            "id": cid,
            "object": "chat.completion",
            "created": _now(),
            "model": self.model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}],
        }
        return JSONResponse(body)

    async def chat_stream(self, task: Task, cid: str) -> Response:
        try:
            handle = self.batcher.stream(task, self.engine.run_stream)
        except QueueFull as e:
            raise _overloaded(e) from e
        created = _now()
        audio_id = f"audio_{uuid.uuid4().hex}"
        rate = self.engine.sample_rate or media.PCM16_RATE

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            body = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                finish = "stop"
                async for kind, value in handle:
                    if kind == "text" and task.output == "speech_answer":
                        yield chunk({"audio": {"id": audio_id, "transcript": value}})
                    elif kind == "text":
                        yield chunk({"content": value})
                    elif kind == "audio":
                        pcm = media.encode_pcm16(_to_rate(value, rate, media.PCM16_RATE))
                        yield chunk({"audio": {"id": audio_id, "data": _b64(pcm)}})
                    elif kind == "image":
                        yield chunk({"content": [_image_part(value)]})
                    elif kind == "finish":
                        finish = value
                if task.output == "speech_answer":
                    yield chunk({"audio": {"id": audio_id, "expires_at": _now() + AUDIO_EXPIRY_S}})
                yield chunk({}, finish)
                yield "data: [DONE]\n\n"
            except OmnitokError as e:
                yield f"data: {json.dumps(error_body(str(e), 'invalid_request_error'))}\n\n"
            except Exception as e:  # headers are sent: report in-band, keep serving
                log.exception("stream failed")
                yield f"data: {json.dumps(error_body(f'internal error: {type(e).__name__}', 'server_error'))}\n\n"
            finally:
                handle.cancel()  # the client may have gone: stop generating at the next event

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    def _audio_bytes(self, samples: np.ndarray, rate: int, fmt: str) -> bytes:
        if fmt in ("pcm16", "pcm"):
            return media.encode_pcm16(_to_rate(samples, rate, media.PCM16_RATE))
        return media.encode_wav(samples, rate)

    # --- audio -----------------------------------------------------------------------------------------
    async def speech(self, request: Request) -> Response:
        req = SpeechRequest.model_validate(await _json_body(request))
        self.check_model(req.model)
        self._need("audio", "write", "model")
        fmt = req.response_format.lower()
        if fmt not in ("wav", "pcm"):
            raise bad_request(
                f"response_format: {req.response_format!r} is not supported; use 'wav' or 'pcm' (16 kHz mono s16le)",
                "response_format",
                "unsupported_audio_format",
            )
        if req.stream_format not in (None, "audio"):
            raise bad_request(f"stream_format: only 'audio' is supported, got {req.stream_format!r}", "stream_format")
        if not req.input.strip():
            raise bad_request("input: the text to speak is empty", "input")
        style: dict[str, str] = {}
        voice = self.voice(req.voice, "voice")
        if voice is not None:
            style["voice"] = voice
        if req.pitch is not None:
            if req.pitch not in self.engine.pitches:
                raise bad_request(f"pitch: unknown {req.pitch!r}; valid: {self.engine.pitches}", "pitch")
            style["pitch"] = req.pitch
        rate = self.engine.rate_for_speed(req.speed)
        if rate is not None:
            style["rate"] = rate
        best_of = 1 if req.best_of is None else req.best_of
        if not 1 <= best_of <= MAX_BEST_OF:
            raise bad_request(f"best_of: between 1 and {MAX_BEST_OF}, got {req.best_of}", "best_of")
        task = Task(
            [Text(TTS_PROMPT + req.input, role="user")], "speech", style or None, seed=req.seed, best_of=best_of
        )
        result = await self.run(task)
        assert result.audio is not None
        if fmt == "pcm":
            return Response(self._audio_bytes(result.audio, result.sample_rate, "pcm16"), media_type="audio/pcm")
        return Response(media.encode_wav(result.audio, result.sample_rate), media_type="audio/wav")

    async def transcription(self, request: Request) -> Response:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise bad_request(f"expected a multipart/form-data upload, got content type {ctype!r}", "file")
        try:
            form = await request.form()
        except Exception as e:  # python-multipart's parse errors
            raise bad_request(f"malformed multipart body ({e})", "file") from e
        self.check_model(_form_str(form, "model"))
        self._need("audio", "read", "file")
        fmt = (_form_str(form, "response_format") or "json").lower()
        if fmt not in ("json", "text"):
            raise bad_request(f"response_format: {fmt!r} is not supported; use 'json' or 'text'", "response_format")
        upload = form.get("file")
        if upload is None or isinstance(upload, str) or not hasattr(upload, "read"):
            raise bad_request("file: required (an uploaded WAV or raw pcm16 file)", "file")
        data = await upload.read()
        if not data:
            raise bad_request("file: the upload is empty", "file")
        audio_fmt = media.sniff_audio_format(data, getattr(upload, "filename", None))
        samples = await run_in_threadpool(media.decode_audio, data, audio_fmt, "file")
        segments: list[Segment] = [Audio(samples=samples, sample_rate=media.PCM16_RATE, role="user"),
                                   Text(ASR_PROMPT, role="user")]  # fmt: skip
        temperature = _form_float(form, "temperature")
        result = await self.run(Task(segments, "text", temperature=temperature or None))
        if fmt == "text":
            return PlainTextResponse(result.text)
        return JSONResponse({"text": result.text})

    # --- images ----------------------------------------------------------------------------------------
    async def image(self, request: Request) -> Response:
        req = ImageRequest.model_validate(await _json_body(request))
        self.check_model(req.model, required=False)
        self._need("image", "write", "model")
        if not req.prompt.strip():
            raise bad_request("prompt: empty", "prompt")
        if req.n not in (None, 1):
            raise bad_request(f"n: only n=1 is supported, got {req.n}", "n")
        size = self.engine.image_size
        if req.size not in (None, "auto", f"{size}x{size}"):
            raise bad_request(f"size: this model draws {size}x{size} images only, got {req.size!r}", "size")
        if req.response_format not in (None, "b64_json"):
            raise bad_request(
                f"response_format: only 'b64_json' is supported (no files are stored), got {req.response_format!r}",
                "response_format",
            )
        if req.output_format not in (None, "png"):
            raise bad_request(f"output_format: only 'png' is supported, got {req.output_format!r}", "output_format")
        best_of = 1 if req.best_of is None else req.best_of
        if not 1 <= best_of <= MAX_BEST_OF:
            raise bad_request(f"best_of: between 1 and {MAX_BEST_OF}, got {req.best_of}", "best_of")
        task = Task([Text(req.prompt, role="user")], "image", seed=req.seed, best_of=best_of)
        result = await self.run(task)
        if not result.images:
            raise ApiError(500, "the model did not produce an image", type="server_error")
        data = [{"b64_json": _b64(media.encode_png(p)), "revised_prompt": None} for p in result.images[:1]]
        return JSONResponse({"created": _now(), "data": data})

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, **self.engine.info(), "stats": self.batcher.stats()}


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise bad_request("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON ({e})") from e
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _form_str(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name}: expected a text field", name)
    return value


def _form_float(form: Any, name: str) -> float | None:
    value = _form_str(form, name)
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except ValueError as e:
        raise bad_request(f"{name}: expected a number, got {value!r}", name) from e
    if not 0 <= f <= 2:
        raise bad_request(f"{name}: expected 0..2, got {f}", name)
    return f


def create_app(
    model: OmniModel,
    model_name: str | None = None,
    api_key: str | None = None,
    max_request_mb: float = 20.0,
    max_batch: int = 8,
    max_queue: int = 256,
    speech_max_tokens: int | None = None,
    text_cfg_scale: float = 1.0,
) -> FastAPI:
    """The ASGI app serving ``model``; ``model_name`` defaults to the bundle directory's name."""
    name = model_name or Path(model.bundle.path).resolve().name
    engine = Engine(model, speech_max_tokens, text_cfg_scale)
    batcher = Batcher(max_batch=max_batch, max_queue=max_queue)
    server = Server(model, name, engine, batcher)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="omnitok", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != api_key:
            message = "Incorrect or missing API key (send 'Authorization: Bearer KEY')"
            raise ApiError(401, message, code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    def handler(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await fn(request)

        return endpoint

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [server.model_card()]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        server.check_model(model_id)
        return server.model_card()

    @v1.get("/omnitok/info")
    async def info() -> dict[str, Any]:
        return server.info()

    v1.add_api_route("/chat/completions", handler(server.chat), methods=["POST"])
    v1.add_api_route("/audio/speech", handler(server.speech), methods=["POST"])
    v1.add_api_route("/audio/transcriptions", handler(server.transcription), methods=["POST"])
    v1.add_api_route("/images/generations", handler(server.image), methods=["POST"])
    app.include_router(v1)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            return PlainTextResponse(f"omnitok is serving {name!r}; the API is at /v1 (no web page installed)")
        return FileResponse(page, media_type="text/html")

    if STATIC.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(InputError)
    async def input_error(_: Request, e: InputError) -> JSONResponse:
        return _json_error(400, str(e), "invalid_request_error", "invalid_value", e.param)

    @app.exception_handler(OmnitokError)
    async def omnitok_error(_: Request, e: OmnitokError) -> JSONResponse:
        return _json_error(400, str(e), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(e.errors()))
        return _json_error(400, message, "invalid_request_error", "invalid_value", param)

    @app.exception_handler(ValidationError)
    async def body_invalid(_: Request, e: ValidationError) -> JSONResponse:
        message, param = _validation_message(list(e.errors()))
        return _json_error(400, message, "invalid_request_error", "invalid_value", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif e.status_code == 405:
            message = f"method {request.method} is not allowed for {request.url.path}"
        else:
            message = str(e.detail)
        return _json_error(e.status_code, message, "invalid_request_error", None, None, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=e)
        return _json_error(500, f"internal server error ({type(e).__name__}); see the server log", "server_error")

    app.add_middleware(BodyLimit, max_bytes=int(max_request_mb * 2**20))
    return app
