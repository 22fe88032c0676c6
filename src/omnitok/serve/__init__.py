"""Serving: an OpenAI-compatible HTTP API (and a web chat page) over one bundle; ``omnitok serve BUNDLE``.

``create_app`` is imported on first use, so the ``omnitok`` command line (which registers ``serve``) runs its other
commands where the serving extras (FastAPI, uvicorn) are not installed, such as a GPU training machine.
"""

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from omnitok.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'omnitok.serve' has no attribute {name!r}")
