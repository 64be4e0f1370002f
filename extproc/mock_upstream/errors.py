"""Error answers in the dialect a real provider would use.

Handlers raise :class:`MockError` anywhere; the control middleware renders it once, choosing
the body shape from the path, so a test driving the mock through the gateway sees exactly what
it would see from OpenAI or Anthropic (and the SDKs raise their usual exception classes).
"""

from __future__ import annotations

import orjson
from aiohttp import web

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class MockError(Exception):
    """Stop handling a request and answer ``status`` with ``message`` in the caller's dialect."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def is_anthropic(path: str) -> bool:
    """Whether ``path`` belongs to the Anthropic Messages API (its errors look different)."""
    return path.startswith("/v1/messages")


def error_body(path: str, status: int, message: str, param: str | None = None) -> bytes:
    """The JSON error body a provider would send for ``status`` on ``path``."""
    if is_anthropic(path):
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"error": {"message": message, "type": kind, "code": kind, "param": param}})


def error_response(path: str, error: MockError) -> web.Response:
    """Render ``error`` for ``path``; 429 carries ``retry-after`` as providers' do."""
    headers = {"retry-after": "1"} if error.status == 429 else None
    return web.Response(
        status=error.status,
        body=error_body(path, error.status, error.message, error.param),
        content_type="application/json",
        headers=headers,
    )
