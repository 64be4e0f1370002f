"""Anthropic Messages: echo the last user message as one ``text`` block.

Counts follow :mod:`.tokens`: ``input_tokens`` is the plain piece count over the system prompt
and every message's text blocks; ``output_tokens`` counts the echo actually returned, which
``max_tokens`` truncates (``stop_reason: "max_tokens"``). ``max_tokens`` is optional here,
unlike on the real API, so a hand-written curl needs less ceremony.

Streaming follows Anthropic's real event sequence - ``message_start`` (with
``usage.input_tokens``, and the prompt-cache fields ``x-mock-cache-tokens`` asks for),
``content_block_start``, ``ping``, one ``content_block_delta``
(``text_delta``) per token, ``content_block_stop``, ``message_delta`` (``stop_reason`` and the
final ``usage.output_tokens``), ``message_stop`` - each as ``event: X`` + ``data: {json}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiohttp import web

from . import body as fields
from . import controls, tokens
from .ids import next_id
from .replies import json_response, named_event, send, text_events

# Everything of a ``content_block_delta`` event up to its text: encoded once, not per token.
_DELTA_HEAD = (
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
)


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: echo the last user message."""
    body = await fields.read_object(request)
    items = fields.messages(body)
    limit = fields.token_limit(body, "max_tokens")
    stream = fields.flag(body, "stream")
    pieces, truncated = tokens.truncate(fields.last_user_text(items), limit)
    input_tokens = tokens.count_all(fields.content_texts(body.get("system")))
    input_tokens += tokens.count_all(fields.all_texts(items))
    stop_reason = "max_tokens" if truncated else "end_turn"
    message: dict[str, object] = {
        "id": next_id(request, "msg"),
        "type": "message",
        "role": "assistant",
        "model": fields.model(body, "mock-echo"),
        "content": [{"type": "text", "text": "".join(pieces)}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            **controls.cache_tokens(request),
            "output_tokens": len(pieces),
        },
    }
    if stream:
        return await send(request, _events(message, pieces))
    return json_response(message)


def _events(message: dict[str, Any], pieces: list[str]) -> Iterator[bytes]:
    # message_start carries the prompt's usage (cache fields included), none of the output.
    start = {**message, "content": [], "stop_reason": None}
    start["usage"] = {**message["usage"], "output_tokens": 0}
    yield named_event("message_start", {"type": "message_start", "message": start})
    yield named_event(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    yield named_event("ping", {"type": "ping"})
    yield from text_events(_DELTA_HEAD, pieces, b"}}\n\n")
    yield named_event("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield named_event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": len(pieces)},
        },
    )
    yield named_event("message_stop", {"type": "message_stop"})
