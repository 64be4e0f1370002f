"""OpenAI Responses API: echo the last user input as one ``message`` output item.

Non-streaming only: ``"stream": true`` gets a 400 in OpenAI's error format saying so, rather
than a half-faithful event stream that a test might mistake for the real protocol.

``input`` is a string (the user's text) or a list of items; the echo is the text of the last
``role: "user"`` message item (string content, or its ``input_text`` parts concatenated).
``usage.input_tokens`` counts ``instructions`` plus the text of every message item (see
:mod:`.tokens`); ``max_output_tokens`` truncates the echo and marks the response
``incomplete`` with reason ``max_output_tokens``, as the real API does.
"""

from __future__ import annotations

import time

from aiohttp import web

from . import body as fields
from . import tokens
from .errors import MockError
from .ids import next_id
from .replies import json_response


def _input_items(body: fields.JsonObject) -> list[fields.JsonObject]:
    value = body.get("input")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return [
            item
            for item in value
            if isinstance(item, dict) and item.get("type", "message") == "message"
        ]
    raise MockError(400, "'input' must be a string or an array of items", param="input")


async def responses(request: web.Request) -> web.Response:
    """``POST /v1/responses``: echo the last user input text."""
    body = await fields.read_object(request)
    if fields.flag(body, "stream"):
        raise MockError(
            400, "streaming is not supported by the mock upstream for /v1/responses", param="stream"
        )
    items = _input_items(body)
    limit = fields.token_limit(body, "max_output_tokens")
    pieces, truncated = tokens.truncate(fields.last_user_text(items), limit)
    text = "".join(pieces)
    input_tokens = tokens.count_all(fields.content_texts(body.get("instructions")))
    input_tokens += tokens.count_all(fields.all_texts(items))
    status = "incomplete" if truncated else "completed"
    output_item = {
        "type": "message",
        "id": next_id(request, "msg"),
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }
    return json_response(
        {
            "id": next_id(request, "resp"),
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": limit,
            "model": fields.model(body, "mock-echo"),
            "output": [output_item],
            "output_text": text,
            "parallel_tool_calls": True,
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": len(pieces),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + len(pieces),
            },
        }
    )
