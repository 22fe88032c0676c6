"""Errors in OpenAI's shape, so the official client raises the matching exception class.

Every failure the server reports is ``{"error": {"message", "type", "code", "param"}}`` with a status code
the ``openai`` client maps to its exception types (400 BadRequestError, 401 AuthenticationError,
404 NotFoundError, 413/422 APIStatusError, 429 RateLimitError, 5xx InternalServerError).
"""

from __future__ import annotations

from typing import Any

from omnitok.errors import OmnitokError


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI error fields to send back."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


class InputError(OmnitokError):
    """Bad user input found while decoding media; ``param`` names the request field (``messages[0].content[1]``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)
