"""Shared helpers for the serving tests: a tiny random bundle and a live uvicorn server on loopback.

The bundle has every modality (text BPE, image tokenizer, speech tokenizer with two voices) but random weights,
so answers are noise; what the tests check is the HTTP contract, never the content. Everything is small enough
that one generate call takes well under a second on a shared CPU core.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

VOICES = ["us_m1", "us_f1"]
PITCHES = ["low", "mid", "high"]
RATES = ["slow", "normal", "fast"]
IMAGE_SIZE = 32


def build_tiny_bundle(
    root: Path, speech: bool = True, image: bool = True, read_aloud_words: int = 0, caption_image_drop: float = 0.0
) -> Path:
    """Write ``root/bundle`` (text + image + speech tokenizers and a 2-layer Llama) and return its path;
    ``read_aloud_words``: the bundle says its TTS was trained in the read-aloud layout (omnitok.sequence);
    ``caption_image_drop``: it says its captions were trained with the picture sometimes dropped."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from omnitok.bundle import save_bundle
    from omnitok.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
    from omnitok.tokenizers.speech import SpeechTokenizer, SpeechTokenizerConfig
    from omnitok.tokenizers.speech_train import tiny_arch
    from omnitok.tokenizers.text import TextTokenizer
    from omnitok.vocab import Vocabulary

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    corpus = ["a large red circle in the top left", "draw a small star", "say this: hello there", "transcribe"]
    text = TextTokenizer.train(corpus * 20, vocab_size=300)
    text.save(root / "text")
    codebooks: dict[str, Any] = {}
    styles: dict[str, list[str]] = {}
    image_dir = speech_dir = None
    if image:
        img = ImageTokenizer(
            ImageTokenizerConfig(image_size=IMAGE_SIZE, widths=(8, 8, 8, 8), depths=(1, 1, 1, 1), levels=(4, 4, 4))
        )
        img.save(root / "image")
        image_dir = root / "image"
        codebooks["image"] = int(img.codebook_size)
    if speech:
        arch = tiny_arch() | {
            "phones": ["a", "b"],
            "voices": list(VOICES),
            "f0_centroids": {
                "us_m1": {"low": 70.0, "mid": 93.0, "high": 135.0},
                "us_f1": {"low": 136.0, "mid": 180.0, "high": 262.0},
            },
        }
        sp = SpeechTokenizer(SpeechTokenizerConfig(**arch)).eval()
        sp.save(root / "speech")
        speech_dir = root / "speech"
        codebooks["speech"] = [int(s) for s in sp.codebook_sizes]
        styles = {"voice": list(VOICES), "pitch": list(PITCHES), "rate": list(RATES)}
    vocab = Vocabulary.build(text.vocab_size, codebooks, styles)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab.size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
    )
    name = (
        "bundle"
        if speech and image
        else "bundle-" + "-".join(m for m, on in (("text", True), ("image", image), ("speech", speech)) if on)
    )
    if read_aloud_words:
        name += f"-read{read_aloud_words}"
    if caption_image_drop:
        name += "-drop"
    return save_bundle(
        root / name,
        lm,
        vocab,
        root / "text",
        image_dir,
        speech_dir,
        read_aloud_words=read_aloud_words,
        caption_image_drop=caption_image_drop,
    )


def steer_to_end(model: Any, after_words: bool) -> None:
    """Steer a random LM to end its reply (``<|end|>``): after each word it writes, or at once (how a trained one
    ends its words about a typed question, without opening speech)."""
    import functools

    from omnitok.vocab import END

    end, text_size = model.vocab.special(END), model.vocab.text_size
    forward = model.lm.forward

    @functools.wraps(forward)  # decoding reads the forward's signature (its cache argument's name)
    def steered(*args: Any, **kw: Any) -> Any:
        out = forward(*args, **kw)
        rows = kw["input_ids"][:, -1] < text_size if after_words else slice(None)
        out.logits[rows, -1, end] += 100.0
        return out

    model.lm.forward = steered


def _free_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


@contextlib.contextmanager
def live_server(bundle_path: Path, host: str = "127.0.0.1", **app_kwargs: Any) -> Iterator[str]:
    """Serve ``bundle_path`` with uvicorn in a background thread; yields the base URL ("http://127.0.0.1:PORT").

    ``app_kwargs`` go to :func:`omnitok.serve.app.create_app` (``api_key``, ``max_batch``, ...). The port is
    bound before the server starts, so there is no race for a free port.
    """
    import uvicorn

    import omnitok
    from omnitok.serve.app import create_app

    model = omnitok.load(str(bundle_path))
    app = create_app(model, **app_kwargs)
    sock = _free_socket(host)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-test")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
