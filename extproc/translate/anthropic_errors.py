"""Anthropic error bodies → OpenAI's error envelope, so the OpenAI SDK raises natively.

The status code is kept as it is: both SDKs pick their exception class from it, and the
OpenAI SDK retries 408, 429 and 5xx (Anthropic's 529 "overloaded" included) by itself.
The message is Anthropic's own, which describes the request and never echoes prompt
text; a body that is not Anthropic's JSON (a proxy's HTML page, say) is not echoed.
"""

from __future__ import annotations

from typing import Any

import orjson

# Anthropic error type → (OpenAI error type, OpenAI error code).
_TYPES = {
    "invalid_request_error": ("invalid_request_error", "invalid_request"),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "permission_error": ("invalid_request_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "timeout_error": ("server_error", "timeout"),
    "api_error": ("server_error", "upstream_error"),
    "overloaded_error": ("server_error", "overloaded"),
}


def _by_status(status: int) -> tuple[str, str]:
    if status == 429:
        return _TYPES["rate_limit_error"]
    if status >= 500:
        return _TYPES["api_error"]
    return _TYPES["invalid_request_error"]


def openai_error(status: int, error: object) -> dict[str, Any]:
    """OpenAI's ``{"error": {...}}`` for Anthropic's inner ``error`` object (any shape)."""
    fields = error if isinstance(error, dict) else {}
    kind = fields.get("type")
    openai_type, code = (
        _TYPES.get(kind, _by_status(status)) if isinstance(kind, str) else (_by_status(status))
    )
    message = fields.get("message")
    if not isinstance(message, str) or not message:
        message = f"The upstream provider answered with HTTP {status}."
    param = None
    if kind == "invalid_request_error" and message.startswith(_PROMPT_TOO_LONG):
        # OpenAI's code for it, which clients test for to trim their history.
        code, param = "context_length_exceeded", "messages"
    return {"error": {"message": message, "type": openai_type, "code": code, "param": param}}


_PROMPT_TOO_LONG = "prompt is too long"
"""How Anthropic's 400 for a prompt past the context window begins."""


def error_from_anthropic(status: int, body: bytes) -> bytes:
    """The OpenAI error body for an Anthropic error answer with ``status``.

    A body already in OpenAI's envelope (an Envoy local reply, the gateway's own error)
    is returned unchanged.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if payload.get("type") != "error" and isinstance(error, dict) and "message" in error:
            return body
        return orjson.dumps(openai_error(status, error))
    return orjson.dumps(openai_error(status, None))
