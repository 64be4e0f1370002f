"""Reading request bodies: JSON once, then small typed accessors over the loose JSON.

Providers accept a lot of shapes (string content or a list of parts, a prompt string or a list);
these helpers pull out just what the mock needs - texts, a token limit, a flag - and turn a
wrong type into a 400 :class:`MockError` instead of a crash, so a test that sends a malformed
body through the gateway gets the answer a provider would give.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web

from .errors import MockError

JsonObject = dict[str, Any]

# Content-part / block types whose ``text`` is prompt text, across the three dialects.
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})


async def read_object(request: web.Request) -> JsonObject:
    """The request body parsed as a JSON object, or a 400 in the API's style."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MockError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MockError(400, "request body must be a JSON object")
    return body


def content_texts(content: object) -> Iterator[str]:
    """The text pieces of a message's content: a string, or the ``text`` of its text parts.

    Non-text parts (images, audio, tool calls, tool results) carry no prompt text for the mock.
    """
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") in _TEXT_PART_TYPES:
                text = part.get("text")
                if isinstance(text, str):
                    yield text


def messages(body: JsonObject, field: str = "messages") -> list[JsonObject]:
    """The message list of ``body[field]`` (its non-object entries ignored); 400 if absent."""
    value = body.get(field)
    if not isinstance(value, list):
        raise MockError(400, f"'{field}' must be an array of messages", param=field)
    return [item for item in value if isinstance(item, dict)]


def last_user_text(items: list[JsonObject]) -> str:
    """The text of the last ``role: user`` message: what the mock echoes back."""
    for item in reversed(items):
        if item.get("role") == "user":
            return "".join(content_texts(item.get("content")))
    return ""


def all_texts(items: list[JsonObject]) -> Iterator[str]:
    """Every prompt text of every message: what the mock counts as prompt tokens."""
    for item in items:
        yield from content_texts(item.get("content"))


def token_limit(body: JsonObject, *fields: str) -> int | None:
    """The smallest of the given token-limit fields present, or ``None`` for no limit.

    Each must be an integer >= 1 (booleans are not integers here), as providers require.
    """
    limit: int | None = None
    for field in fields:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MockError(400, f"'{field}' must be an integer >= 1", param=field)
        limit = value if limit is None else min(limit, value)
    return limit


def flag(body: JsonObject, field: str) -> bool:
    """A boolean field (absent or null means false); 400 for any other type."""
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise MockError(400, f"'{field}' must be a boolean", param=field)
    return value


def include_usage(body: JsonObject) -> bool:
    """Whether ``stream_options.include_usage`` asks for a final usage chunk."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def model(body: JsonObject, default: str) -> str:
    """The requested model name, echoed back like a provider does."""
    value = body.get("model")
    return value if isinstance(value, str) else default
