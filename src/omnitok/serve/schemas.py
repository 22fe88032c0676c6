"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

Only the fields omnitok can honour are typed; everything else the OpenAI clients may send (``user``,
``frequency_penalty``, ``stream_options``...) is accepted and ignored, so unmodified clients keep working.
Validation failures become 400 errors in OpenAI's shape (see ``app.py``), naming the offending field.
Content parts are checked loosely here (``type`` decides) and decoded in ``media.py``, where a bad part can
be reported with its exact position.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from omnitok.generate import SEED_MAX, SEED_MIN


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class InputAudio(_Lenient):
    data: str
    format: str = "wav"


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class AudioPart(_Lenient):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = TextPart | ImagePart | AudioPart


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class AudioOutput(_Lenient):
    """``audio`` of a chat request: the voice to speak in and the container of ``message.audio.data``."""

    voice: str
    format: str = "wav"
    pitch: str | None = None  # omnitok extension: a pitch class of the bundle (see /v1/omnitok/info)
    rate: str | None = None  # omnitok extension: a rate class of the bundle


class ChatRequest(_Lenient):
    model: str
    messages: list[Message] = Field(min_length=1)
    modalities: list[Literal["text", "audio", "image"]] | None = None
    audio: AudioOutput | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int | None = 1
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    # omnitok extension: describing one picture, write N and return the model's likeliest; a spoken answer (audio
    # out), speak its written answer N times and return the clip the model hears it in likeliest
    best_of: int | None = None


class SpeechRequest(_Lenient):
    model: str
    input: str = Field(max_length=4096)
    voice: str
    response_format: str = "wav"
    speed: float | None = Field(default=None, ge=0.25, le=4.0)
    stream_format: str | None = None  # only "audio" (one response body); "sse" is not supported
    pitch: str | None = None  # omnitok extension: a pitch class of the bundle (low/mid/high)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)  # omnitok extension
    best_of: int | None = None  # omnitok extension: speak N, return the clip the model hears the input in likeliest


class ImageRequest(_Lenient):
    prompt: str = Field(max_length=4000)
    model: str | None = None
    n: int | None = 1
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None  # only "png"
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)  # omnitok extension
    best_of: int | None = None  # omnitok extension: draw N, return the one the model reads back likeliest
