"""Error bodies in the caller's dialect: the one place a GatewayError becomes a Reply."""

from __future__ import annotations

import orjson

from extproc.decisions import Reply
from extproc.dialects.base import Envelope
from extproc.errors import GatewayError
from extproc.mcp.jsonrpc import ErrorCode, RequestId, error_response

_JSON = ("content-type", "application/json")


def render_error(
    error: GatewayError, envelope: Envelope, request_id: RequestId | None = None
) -> Reply:
    """Build the HTTP answer for ``error`` so the caller's SDK raises its native exception.

    OpenAI SDKs read ``{"error": {"message", "type", "code", "param"}}``; Anthropic SDKs
    read ``{"type": "error", "error": {"type", "message"}}``. Both pick the exception
    class from the status code, so the status is the same for both envelopes.

    MCP callers get a JSON-RPC error answering ``request_id`` (``null`` when the body held
    no single request): MCP SDKs surface the error of a non-2xx JSON answer as the call's
    own failure, message included, where any other body reads as "Server returned an
    error response".
    """
    if envelope == "jsonrpc":
        payload: dict[str, object] = error_response(
            request_id, ErrorCode.GATEWAY_ERROR, error.message, {"type": error.code}
        )
    elif envelope == "anthropic":
        payload = {
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
