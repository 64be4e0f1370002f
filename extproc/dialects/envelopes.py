"""Error bodies in the caller's dialect: the one place a GatewayError becomes a Reply."""

from __future__ import annotations

import orjson

from extproc.decisions import Reply
from extproc.dialects.base import Envelope
from extproc.errors import GatewayError

_JSON = ("content-type", "application/json")


def render_error(error: GatewayError, envelope: Envelope) -> Reply:
    """Build the HTTP answer for ``error`` so the caller's SDK raises its native exception.

    OpenAI SDKs read ``{"error": {"message", "type", "code", "param"}}``; Anthropic SDKs
    read ``{"type": "error", "error": {"type", "message"}}``. Both pick the exception
    class from the status code, so the status is the same for both envelopes.
    """
    if envelope == "anthropic":
        payload: dict[str, object] = {
            "type": "error",
            "error": {"type": error.anthropic_type, "message": error.message},
        }
    else:
        payload = {
            "error": {
                "message": error.message,
                "type": error.openai_type,
                "code": error.code,
                "param": error.param,
            }
        }
    return Reply(
        status=error.status,
        body=orjson.dumps(payload),
        headers=(_JSON, *error.headers),
        details=f"extproc_{error.code}",
    )
