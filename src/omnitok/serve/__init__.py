"""Serving: an OpenAI-compatible HTTP API (and a web chat page) over one bundle; ``omnitok serve BUNDLE``."""

from omnitok.serve.app import create_app

__all__ = ["create_app"]
