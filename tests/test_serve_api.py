"""The OpenAI-compatible server, driven by the official ``openai`` client and by raw HTTP for malformed input.

The bundle is tiny and random (``serve_helpers``), so answers are noise: these tests check the protocol (shapes,
content types, audio/image encodings, streaming, errors, auth, batching), never what the model says.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import wave

import httpx2 as httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from omnitok.serve import media
from omnitok.serve.batcher import Batcher, QueueFull
from serve_helpers import IMAGE_SIZE, build_tiny_bundle, live_server

MODEL = "bundle"
LIMIT_MB = 1.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, especially when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return build_tiny_bundle(root), build_tiny_bundle(root, speech=False)


@pytest.fixture(scope="module")
def url(bundles):
    with live_server(bundles[0], speech_max_tokens=30, max_request_mb=LIMIT_MB, max_batch=8) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="anything", max_retries=0, timeout=60)


def _wav(seconds=0.4, rate=22050, channels=2) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(x[:, None], channels, axis=1).tobytes())
    return out.getvalue()


def _png(size=48, mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (size, size + 16), (200, 30, 30, 255)[: len(mode)]).save(out, format="PNG")
    return out.getvalue()


def _data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _read_wav(data: bytes) -> tuple[int, int]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes(), w.getframerate()


# ------------------------------------------------------------------------------------------------- happy paths


def test_models_and_info(client, url):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    info = httpx.get(url + "/v1/omnitok/info").json()
    assert info["reads"] == ["text", "image", "audio"] and info["writes"] == ["text", "image", "audio"]
    assert info["voices"] == ["us_m1", "us_f1"] and info["pitches"] == ["low", "mid", "high"]
    assert info["image_size"] == IMAGE_SIZE and info["sample_rate"] == 16000
    assert info["openai_voices"]["nova"] == "us_f1" and info["openai_voices"]["onyx"] == "us_m1"


def test_chat_text(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        max_tokens=6, seed=0,
    )  # fmt: skip
    assert r.object == "chat.completion" and r.model == MODEL
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    r2 = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=4, temperature=0.8, top_p=0.9
    )
    assert isinstance(r2.choices[0].message.content, str)


def test_chat_with_image_and_audio_in(client):
    parts = [
        {"type": "image_url", "image_url": {"url": _data_url(_png(mode="RGBA"))}},
        {"type": "text", "text": "What is this?"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=4)
    assert isinstance(r.choices[0].message.content, str)
    # omnitok's extension: write 3 descriptions of the picture, return the model's likeliest
    messages = [{"role": "user", "content": parts}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body={"best_of": 3})
    assert isinstance(r.choices[0].message.content, str)
    pcm = (np.sin(np.arange(8000) / 5) * 8000).astype("<i2").tobytes()
    audio_parts = [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(_wav()).decode(), "format": "wav"}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(pcm).decode(), "format": "pcm16"}},
    ]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": audio_parts}], max_tokens=4)
    assert isinstance(r.choices[0].message.content, str)


def test_chat_audio_out(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=4, seed=0,
        modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"},
    )  # fmt: skip
    msg = r.choices[0].message
    assert msg.content is None and msg.audio is not None and msg.audio.id and msg.audio.expires_at > 0
    frames, rate = _read_wav(base64.b64decode(msg.audio.data))
    assert frames > 0 and rate == 16000 and isinstance(msg.audio.transcript, str)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=4, seed=0,
        modalities=["text", "audio"], audio={"voice": "us_m1", "format": "pcm16"},
    )  # fmt: skip
    assert len(base64.b64decode(r.choices[0].message.audio.data)) % 2 == 0
    r = client.chat.completions.create(  # omnitok extension: pitch and rate classes beside the voice
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=4, seed=0,
        modalities=["text", "audio"], audio={"voice": "us_f1", "format": "wav", "pitch": "high", "rate": "fast"},
    )  # fmt: skip
    assert _read_wav(base64.b64decode(r.choices[0].message.audio.data))[0] > 0
    ask = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 4, "seed": 0}
    voice = {"modalities": ["text", "audio"], "audio": {"voice": "us_f1", "format": "wav"}}
    plain = client.chat.completions.create(model=MODEL, **ask, **voice)
    # omnitok extension: the answer is written once, its clip spoken 3 times and the one heard likeliest returned
    best = client.chat.completions.create(model=MODEL, **ask, **voice, extra_body={"best_of": 3})
    assert best.choices[0].message.audio.transcript == plain.choices[0].message.audio.transcript
    assert _read_wav(base64.b64decode(best.choices[0].message.audio.data))[0] > 0


def test_a_spoken_answer_is_one_reply_and_words_that_end_unspoken_are_spoken_in_it(bundles):
    import omnitok
    from omnitok.sequence import Text
    from omnitok.serve.engine import Engine, Task
    from serve_helpers import steer_to_end

    engine = Engine(omnitok.load(str(bundles[0])), speech_max_tokens=8)
    steer_to_end(engine.model, after_words=True)  # words, then the end of the reply: a typed question's answer
    calls = []
    generate_batch = engine.model.generate_batch

    def spy(prompts, **kw):
        calls.append({k: kw.get(k) for k in ("output", "style", "best_of", "max_text_tokens")})
        return generate_batch(prompts, **kw)

    engine.model.generate_batch = spy
    styles = [{"voice": "us_f1"}, {"voice": "us_m1", "rate": "slow"}]
    asks = zip(("hi", "what?"), styles, strict=True)
    tasks = [Task([Text(q, role="user")], "speech_answer", st, 4, best_of=3) for q, st in asks]
    results = engine.run_batch(tasks)
    # one reply a request, words then clip in the voice asked for, the words capped at the request's max tokens;
    # no second request reads them aloud (the model speaks words that ended in the reply itself)
    assert calls == [{"output": "text+speech", "style": styles, "best_of": 3, "max_text_tokens": 4}]
    assert all(r.text and len(r.audio) > 0 for r in results)
    streams, stream = [], engine.model.stream
    engine.model.stream = lambda segments, **kw: streams.append(kw["output"]) or stream(segments, **kw)
    events = list(engine.run_stream(Task([Text("hi", role="user")], "speech_answer", styles[0], 4)))
    assert [k for k, _ in events if k == "text"] and [k for k, _ in events if k == "audio"]
    assert events[-1][0] == "finish" and streams == ["text+speech"]  # streamed: one reply too


def test_the_operator_guides_text_about_pictures(bundles):
    """``omnitok serve --text-cfg-scale``: text replies get it (batched and streamed), pictures and speech do not."""
    import omnitok
    from omnitok.sequence import Image as Picture
    from omnitok.sequence import Text
    from omnitok.serve.engine import Engine, Task

    engine = Engine(omnitok.load(str(bundles[0])), speech_max_tokens=8, text_cfg_scale=3.0)
    seen = []
    generate_batch, stream = engine.model.generate_batch, engine.model.stream
    engine.model.generate_batch = lambda p, **kw: seen.append(kw.get("text_cfg_scale")) or generate_batch(p, **kw)
    engine.model.stream = lambda segs, **kw: seen.append(kw.get("text_cfg_scale")) or stream(segs, **kw)
    ask = [Picture(pixels=np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), role="user"), Text("what?", role="user")]
    with pytest.warns(UserWarning, match="not trained with captions without their picture"):
        (result,) = engine.run_batch([Task(ask, "text", max_new_tokens=3)])
        list(engine.run_stream(Task(ask, "text", max_new_tokens=3)))
    engine.run_batch([Task([Text("a red circle", role="user")], "image", seed=0)])
    assert isinstance(result.text, str) and seen == [3.0, 3.0, None]


def test_chat_image_out(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a red circle"}], modalities=["image"], seed=0
    )
    parts = r.choices[0].message.content
    assert isinstance(parts, list) and parts[0]["type"] == "image_url"
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_stream_text(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, seed=0, stream=True
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(isinstance(c.choices[0].delta.content or "", str) for c in chunks)


def test_stream_audio(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=4, seed=0, stream=True,
        modalities=["text", "audio"], audio={"voice": "us_f1", "format": "pcm16"},
    )  # fmt: skip
    chunks = list(stream)
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio]
    pcm = [base64.b64decode(a.data) for a in audio if a.data]
    assert pcm and all(len(p) % 2 == 0 for p in pcm) and sum(map(len, pcm)) > 0
    assert len({a.id for a in audio}) == 1 and audio[-1].expires_at
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_speech(client):
    wav = client.audio.speech.create(model=MODEL, voice="us_f1", input="hello there", response_format="wav")
    frames, rate = _read_wav(wav.content)
    assert frames > 0 and rate == 16000
    pcm = client.audio.speech.create(
        model=MODEL, voice="nova", input="hello", response_format="pcm", speed=1.5, extra_body={"pitch": "high"}
    )
    assert len(pcm.content) % 2 == 0 and len(pcm.content) > 0
    best = client.audio.speech.create(
        model=MODEL, voice="us_f1", input="hello there", response_format="wav", extra_body={"best_of": 3, "seed": 1}
    )
    assert _read_wav(best.content)[0] > 0


def test_transcription(client):
    r = client.audio.transcriptions.create(model=MODEL, file=("clip.wav", _wav(), "audio/wav"))
    assert isinstance(r.text, str)
    text = client.audio.transcriptions.create(
        model=MODEL, file=("clip.wav", _wav(channels=1, rate=16000), "audio/wav"), response_format="text"
    )
    assert isinstance(text, str)


def test_image_generation(client):
    r = client.images.generate(model=MODEL, prompt="a large red circle", response_format="b64_json", size="32x32")
    im = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert im.format == "PNG" and im.size == (IMAGE_SIZE, IMAGE_SIZE)
    # omnitok's extension: draw 3, return the one the model reads back likeliest
    r = client.images.generate(model=MODEL, prompt="a large red circle", extra_body={"best_of": 3, "seed": 1})
    im = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert im.format == "PNG" and im.size == (IMAGE_SIZE, IMAGE_SIZE)


# ------------------------------------------------------------------------------------------------- refusals


def _chat(**over):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | over


def _user(*parts):
    return _chat(messages=[{"role": "user", "content": list(parts)}])


def _image(url):
    return {"type": "image_url", "image_url": {"url": url}}


def _audio(data, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


B64 = base64.b64encode
CHAT = "/v1/chat/completions"
WAV_FILE = {"file": ("a.wav", _wav())}
FUZZ = [
    ("post", CHAT, {"content": b"{bad"}, 400),
    ("post", CHAT, {"content": b"[]"}, 400),
    ("post", CHAT, {"content": b""}, 400),
    ("post", CHAT, {"content": b"\xff\xfe\x00garbage"}, 400),
    ("post", CHAT, {"json": {"messages": [{"role": "user", "content": "hi"}]}}, 400),  # no model
    ("post", CHAT, {"json": _chat(messages="hi")}, 400),
    ("post", CHAT, {"json": _chat(messages=[])}, 400),
    ("post", CHAT, {"json": _chat(messages=[{"role": "robot", "content": "hi"}])}, 400),
    ("post", CHAT, {"json": _chat(messages=[{"role": "user", "content": 5}])}, 400),
    ("post", CHAT, {"json": _chat(messages=[{"role": "user", "content": "   "}])}, 400),
    ("post", CHAT, {"json": _chat(max_tokens=-1)}, 400),
    ("post", CHAT, {"json": _chat(temperature="hot")}, 400),
    ("post", CHAT, {"json": _chat(n=2)}, 400),
    ("post", CHAT, {"json": _chat(modalities=["smell"])}, 400),
    ("post", CHAT, {"json": _chat(modalities=["audio", "image"], audio={"voice": "us_m1"})}, 400),
    ("post", CHAT, {"json": _chat(model="gpt-9")}, 404),
    ("post", CHAT, {"json": _user({"type": "video_url", "video_url": {"url": "x"}})}, 400),
    ("post", CHAT, {"json": _user(_image("https://example.com/cat.png"))}, 400),
    ("post", CHAT, {"json": _user(_image("data:image/png;base64,@@@not-base64@@@"))}, 400),
    ("post", CHAT, {"json": _user(_image(_data_url(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)))}, 400),
    ("post", CHAT, {"json": _user(_image(_data_url(b"just some text, not pixels", "text/plain")))}, 400),
    ("post", CHAT, {"json": _user(_image("data:image/png,notbase64"))}, 400),
    ("post", CHAT, {"json": _user(_audio(B64(b"ID3\x03fake mp3").decode(), "mp3"))}, 400),
    ("post", CHAT, {"json": _user(_audio(B64(b"fLaC fake").decode(), "flac"))}, 400),
    ("post", CHAT, {"json": _user(_audio(B64(b"whatever").decode(), "xyz"))}, 400),
    ("post", CHAT, {"json": _user(_audio("%%%"))}, 400),
    ("post", CHAT, {"json": _user(_audio(B64(b"RIFF\x00\x00\x00\x00WAVEjunk").decode()))}, 400),
    ("post", CHAT, {"json": _user(_audio(B64(b"abc").decode(), "pcm16"))}, 400),  # odd byte count
    ("post", CHAT, {"json": _chat(modalities=["text", "audio"], audio={"voice": "darth", "format": "wav"})}, 400),
    ("post", CHAT, {"json": _chat(modalities=["text", "audio"], audio={"voice": "us_m1", "format": "mp3"})}, 400),
    ("post", CHAT, {"json": _chat(messages=[{"role": "user", "content": "x" * 2_000_000}])}, 413),
    ("get", "/v1/nope", {}, 404),
    ("get", CHAT, {}, 405),
    ("delete", "/v1/models", {}, 405),
    ("get", "/v1/models/gpt-9", {}, 404),
    ("post", "/v1/audio/speech", {"json": {"model": MODEL, "voice": "us_m1", "input": "  "}}, 400),
    (
        "post",
        "/v1/audio/speech",
        {"json": {"model": MODEL, "voice": "us_m1", "input": "x", "response_format": "mp3"}},
        400,
    ),
    ("post", "/v1/audio/speech", {"json": {"model": MODEL, "voice": "bob", "input": "hi"}}, 400),
    ("post", "/v1/audio/speech", {"json": {"model": MODEL, "voice": "us_m1", "input": "hi", "speed": 10}}, 400),
    ("post", "/v1/audio/speech", {"json": {"model": MODEL, "voice": "us_m1", "input": "hi", "pitch": "shrill"}}, 400),
    ("post", "/v1/audio/speech", {"json": {"model": MODEL, "input": "hi"}}, 400),  # no voice
    ("post", "/v1/audio/speech", {"json": {"model": MODEL, "voice": "us_m1", "input": "hi", "best_of": 0}}, 400),
    ("post", "/v1/audio/speech", {"json": {"model": MODEL, "voice": "us_m1", "input": "hi", "best_of": 17}}, 400),
    ("post", "/v1/audio/transcriptions", {"data": {"model": MODEL}, "files": {"other": ("a.txt", b"x")}}, 400),
    ("post", "/v1/audio/transcriptions", {"json": {"model": MODEL}}, 400),
    ("post", "/v1/audio/transcriptions", {"data": {"model": MODEL}, "files": {"file": ("a.mp3", b"ID3junk")}}, 400),
    ("post", "/v1/audio/transcriptions", {"data": {"model": MODEL}, "files": {"file": ("a.wav", b"")}}, 400),
    ("post", "/v1/audio/transcriptions", {"data": {"model": "x"}, "files": WAV_FILE}, 404),
    ("post", "/v1/audio/transcriptions", {"data": {"model": MODEL, "response_format": "srt"}, "files": WAV_FILE}, 400),
    ("post", "/v1/images/generations", {"json": {"prompt": "a star", "size": "1024x1024"}}, 400),
    ("post", "/v1/images/generations", {"json": {"prompt": "a star", "n": 2}}, 400),
    ("post", "/v1/images/generations", {"json": {"prompt": "a star", "response_format": "url"}}, 400),
    ("post", "/v1/images/generations", {"json": {"prompt": ""}}, 400),
    ("post", "/v1/images/generations", {"json": {"prompt": 3}}, 400),
    ("post", "/v1/images/generations", {"json": {"prompt": "a star", "best_of": 0}}, 400),
    ("post", "/v1/images/generations", {"json": {"prompt": "a star", "best_of": 17}}, 400),
    ("post", CHAT, {"json": _chat(modalities=["text", "audio"], audio={"voice": "us_m1", "pitch": "shrill"})}, 400),
    ("post", CHAT, {"json": _chat(best_of=2)}, 400),  # best_of describes one picture; this has none
    ("post", CHAT, {"json": _user(_image(_data_url(_png())), {"type": "text", "text": "hi"}) | {"best_of": 17}}, 400),
    ("post", CHAT, {"json": _user(_image(_data_url(_png()))) | {"best_of": 2, "stream": True}}, 400),
    ("post", CHAT, {"json": _user(_image(_data_url(_png()))) | {"best_of": 2, "modalities": ["image"]}}, 400),
    ("post", CHAT, {"json": _chat(best_of=2, modalities=["text", "audio"], stream=True)}, 400),
    ("post", CHAT, {"json": _chat(modalities=["text", "audio"], audio={"voice": "us_m1", "rate": 3})}, 400),
    ("post", CHAT, {"json": _chat(seed=10**30)}, 400),  # beyond torch's seeds
    ("post", "/v1/images/generations", {"json": {"prompt": "a star", "seed": -(2**64)}}, 400),
    # longer than the LM's context (1,024 positions): refused, not answered from positions it never saw
    ("post", CHAT, {"json": _chat(messages=[{"role": "user", "content": "red circle " * 1500}])}, 400),
]


def _assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_malformed_requests_are_4xx_in_openai_shape(url, client):
    with httpx.Client(base_url=url, timeout=60) as http:
        for method, path, kwargs, status in FUZZ:
            err = _assert_openai_error(http.request(method.upper(), path, **kwargs), status)
            assert err["type"] != "server_error"
        # a body over the limit without Content-Length (chunked) is cut off while it is read
        chunks = (b"x" * 65536 for _ in range(40))
        _assert_openai_error(http.post(CHAT, content=chunks, headers={"content-type": "application/json"}), 413)
        # errors name the field
        err = _assert_openai_error(http.post(CHAT, json=_user(_image(_data_url(b"text", "text/plain")))), 400)
        assert err["param"] == "messages[0].content[0].image_url" and "not an image" in err["message"]
        err = _assert_openai_error(http.post(CHAT, json=_user(_image("http://x/y.png"))), 400)
        assert "only data URLs" in err["message"]
        err = _assert_openai_error(http.post(CHAT, json=_user({"type": "video", "video": "x"})), 400)
        assert err["param"] == "messages[0].content[0].type"
        assert err["message"].endswith("expected one of 'text', 'image_url', 'input_audio', got 'video'")
        err = _assert_openai_error(http.post(CHAT, json=_chat(model="gpt-9")), 404)
        assert err["code"] == "model_not_found"
        err = _assert_openai_error(http.post(CHAT, json=_chat(max_tokens="many")), 400)
        assert err["param"] == "max_tokens"
        assert "us_m1" in _assert_openai_error(http.post("/v1/audio/speech", json=FUZZ[37][2]["json"]), 400)["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    # still serving
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok"}], max_tokens=2)
    assert httpx.get(url + "/v1/omnitok/info").json()["stats"]["failures"] == 0


def test_client_disconnect_mid_stream(url, client):
    body = _chat(stream=True, max_tokens=4, modalities=["text", "audio"], audio={"voice": "us_m1", "format": "pcm16"})
    with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", CHAT, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        first = next(r.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["object"] == "chat.completion.chunk"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "still?"}], max_tokens=2)
    assert r.choices[0].message.content is not None


def test_concurrent_requests_are_batched(url, client):
    before = httpx.get(url + "/v1/omnitok/info").json()["stats"]
    n = 12
    start = threading.Barrier(n)
    results: list = [None] * n

    def ask(i: int) -> None:
        start.wait()
        try:
            results[i] = (
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=24
                )
                .choices[0]
                .message.content
            )
        except Exception as e:  # collected and asserted below
            results[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(isinstance(r, str) for r in results), results
    after = httpx.get(url + "/v1/omnitok/info").json()["stats"]
    assert after["batched_requests"] - before["batched_requests"] == n
    assert after["largest_batch"] >= 2 and after["largest_batch"] <= 8


# ------------------------------------------------------------------------------------------------- auth, modalities


def test_api_key_and_missing_modalities(bundles):
    with live_server(bundles[1], api_key="s3cret", model_name="imgonly") as base:
        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        _assert_openai_error(httpx.get(base + "/v1/models"), 401)
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()] == ["imgonly"]
        info = httpx.get(base + "/v1/omnitok/info", headers={"Authorization": "Bearer s3cret"}).json()
        assert info["writes"] == ["text", "image"] and info["voices"] == []
        with pytest.raises(openai.BadRequestError, match="cannot produce audio"):
            good.chat.completions.create(
                model="imgonly", messages=[{"role": "user", "content": "hi"}], modalities=["text", "audio"],
                audio={"voice": "alloy", "format": "wav"},
            )  # fmt: skip
        with pytest.raises(openai.BadRequestError, match="cannot read audio"):
            good.audio.transcriptions.create(model="imgonly", file=("a.wav", _wav(), "audio/wav"))
        with pytest.raises(openai.BadRequestError, match="cannot produce audio"):
            good.audio.speech.create(model="imgonly", voice="alloy", input="hi", response_format="wav")


# ------------------------------------------------------------------------------------------------- units


def test_batcher_is_fifo_and_groups_by_key():
    async def scenario() -> tuple[list, list]:
        b = Batcher(max_batch=3, max_queue=6)
        gate = threading.Event()
        calls: list[list[int]] = []

        def fn(payloads):
            gate.wait(10)
            calls.append(list(payloads))
            return [p * 10 for p in payloads]

        first = asyncio.ensure_future(b.submit("a", 0, fn))
        await asyncio.sleep(0.1)  # the worker now holds job 0
        rest = [asyncio.ensure_future(b.submit("a" if i % 2 else "b", i, fn)) for i in range(1, 7)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await b.submit("a", 99, fn)
        gate.set()
        out = await asyncio.gather(first, *rest)
        b.stop()
        return calls, out

    calls, out = asyncio.run(scenario())
    assert calls == [[0], [1, 3, 5], [2, 4, 6]]
    assert out == [0, 10, 20, 30, 40, 50, 60]


def test_batcher_stops_a_cancelled_stream():
    produced: list[int] = []

    def endless(_):
        for i in range(10_000):
            produced.append(i)
            yield i

    async def scenario() -> None:
        b = Batcher()
        handle = b.stream(None, endless)
        async for ev in handle:
            if ev == 3:
                handle.cancel()
                break
        await asyncio.sleep(0.2)
        assert await b.submit(None, 1, lambda ps: ps) == 1  # the worker moved on
        b.stop()

    asyncio.run(scenario())
    assert len(produced) < 10_000


def test_media_decoding_policies():
    px = media.decode_image(_png(size=48), IMAGE_SIZE, "p")
    assert px.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and px.dtype == np.uint8 and tuple(px[5, 5]) == (200, 30, 30)
    x = media.decode_audio(_wav(seconds=0.5, rate=22050, channels=2), "wav", "a")
    assert x.dtype == np.float32 and abs(x.size - 8000) <= 2
    assert media.decode_audio(media.encode_wav(np.zeros(100, np.float32), 16000), "wav", "a").size == 100
    assert media.parse_data_url(_data_url(b"abc"), "u") == ("image/png", b"abc")
    with pytest.raises(media.InputError, match="field: invalid base64"):
        media.b64decode("a$b", "field")


def test_unexpected_failures_are_500_and_the_server_survives(url, client, monkeypatch):
    from omnitok.serve.engine import Engine

    def boom(self, tasks):
        raise RuntimeError("simulated bug")

    def boom_stream(self, task):
        yield "text", "partial"
        raise RuntimeError("simulated bug in a stream")

    monkeypatch.setattr(Engine, "run_batch", boom)
    monkeypatch.setattr(Engine, "run_stream", boom_stream)
    err = _assert_openai_error(httpx.post(url + CHAT, json=_chat(), timeout=60), 500)
    assert err["type"] == "server_error" and "simulated" not in err["message"]  # no internals leak out
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True))
    monkeypatch.undo()
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_cli_refuses_bad_arguments_clearly(tmp_path):
    import socket

    from typer.testing import CliRunner

    from omnitok.cli import app
    from omnitok.errors import OmnitokError

    runner = CliRunner()
    r = runner.invoke(app, ["serve", str(tmp_path / "missing"), "--port", "0"])
    assert isinstance(r.exception, OmnitokError) and "--port" in str(r.exception)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = runner.invoke(app, ["serve", str(tmp_path / "missing"), "--port", str(port)])
        assert isinstance(r.exception, OmnitokError) and "cannot listen" in str(r.exception)
    r = runner.invoke(app, ["serve", str(tmp_path / "missing"), "--port", "1"])
    assert isinstance(r.exception, OmnitokError)  # privileged port or missing bundle: a clear error either way
    for flags, message in [
        (["--threads", "0"], "--threads must be >= 1"),
        (["--log-level", "loud"], "--log-level"),
        (["--text-cfg-scale", "-1"], "--text-cfg-scale must be a finite number >= 0"),
    ]:
        r = runner.invoke(app, ["serve", str(tmp_path / "missing"), *flags])
        assert isinstance(r.exception, OmnitokError) and message in str(r.exception), flags
