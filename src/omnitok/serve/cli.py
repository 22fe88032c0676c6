"""``omnitok serve BUNDLE --port P``: the OpenAI-compatible API and the web chat page over one bundle."""

from __future__ import annotations

import socket
from pathlib import Path

import typer
from rich.console import Console

from omnitok.errors import OmnitokError, is_number

console = Console(stderr=True)


def serve_command(
    bundle: Path = typer.Argument(..., help="A bundle directory (omnitok train writes one)."),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes the server."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="OMNITOK_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 requests."
    ),
    model_name: str | None = typer.Option(None, "--model-name", help="Model id to serve (default: bundle dir name)."),
    max_request_mb: float = typer.Option(20.0, "--max-request-mb", help="Largest request body accepted (MB)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Most queued requests decoded together (1: no batching)."),
    max_queue: int = typer.Option(256, "--max-queue", help="Requests that may wait; beyond it the server says 503."),
    speech_max_tokens: int | None = typer.Option(
        None, "--speech-max-tokens", help="Cap on speech tokens per spoken answer (default: the model's, 12 s)."
    ),
    text_cfg_scale: float = typer.Option(
        1.0,
        "--text-cfg-scale",
        help="Guidance for text replies about a picture, against the request without it (1 = off; 3 helped a bundle "
        "that reads well, trained with captions without their picture: docs/BENCHMARKS.md 'Guidance for reading').",
    ),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    device: str = typer.Option("cpu", "--device", help="torch device for the model, e.g. cpu or cuda."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve a bundle through an OpenAI-compatible API (chat, speech, transcription, images) and a web page."""
    if not 0 < port < 65536:
        raise OmnitokError(f"--port must be 1..65535, got {port}")
    if max_request_mb <= 0:
        raise OmnitokError(f"--max-request-mb must be > 0, got {max_request_mb}")
    if speech_max_tokens is not None and speech_max_tokens < 1:
        raise OmnitokError(f"--speech-max-tokens must be >= 1, got {speech_max_tokens}")
    if max_batch < 1 or max_queue < 1:
        raise OmnitokError(f"--max-batch and --max-queue must be >= 1, got {max_batch} and {max_queue}")
    if not is_number(text_cfg_scale) or text_cfg_scale < 0:
        raise OmnitokError(f"--text-cfg-scale must be a finite number >= 0 (1: off), got {text_cfg_scale}")
    if threads is not None and threads < 1:
        raise OmnitokError(f"--threads must be >= 1, got {threads}")
    if log_level.lower() not in LOG_LEVELS:
        raise OmnitokError(f"--log-level must be one of {list(LOG_LEVELS)}, got {log_level!r}")
    sock = _bind(host, port)  # before the slow model load: a busy port fails at once, with one clear line
    import torch
    import uvicorn

    import omnitok
    from omnitok.serve.app import create_app

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = omnitok.load(str(bundle), device=device)
        app = create_app(
            model, model_name, api_key, max_request_mb, max_batch, max_queue, speech_max_tokens, text_cfg_scale
        )
        console.print(f"serving {bundle} at http://{host}:{port}/v1 (web page: http://{host}:{port}/)")
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level.lower())).run(sockets=[sock])
    finally:
        sock.close()


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # port in use, permission denied, unknown interface
        sock.close()
        raise OmnitokError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock
