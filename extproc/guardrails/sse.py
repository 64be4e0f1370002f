"""Server-sent events of each streaming dialect: where their text is, how to rewrite it.

An :class:`Event` keeps its raw bytes so an event the guard does not change is passed on
byte for byte. A :class:`StreamDialect` knows, for one API, which parts of an event are
answer text (*channels*: a choice's content, a tool call's arguments, a content block),
which events end a channel, and what an error event looks like.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from extproc import sse
from extproc.dialects.anthropic_messages import RESULT_BLOCKS, result_block_texts

ChannelKey = tuple[Any, ...]
ALL = ("*",)
"""Returned by :meth:`StreamDialect.ends` to end every channel."""


@dataclass(slots=True)
class Event:
    raw: bytes
    """The event as received, separator included."""
    name: str
    """The type a client dispatches the event as (:func:`extproc.sse.name`: the last
    ``event`` field's value, ``message`` when that is empty or there is none)."""
    data: bytes | None
    payload: Any = None
    """The parsed JSON of ``data`` (``None`` if absent or not JSON)."""

    def render(self) -> bytes:
        """The event with its (possibly changed) payload (:func:`extproc.sse.with_data`)."""
        return sse.with_data(self.raw, orjson.dumps(self.payload))


def parse_event(raw: bytes) -> Event:
    """``raw`` read as a client reads it: its type (:func:`extproc.sse.name`) and data
    (:func:`extproc.sse.data`), and the data's JSON if it looks like JSON."""
    data = sse.data(raw)
    payload = None
    if data is not None and data.lstrip()[:1] in (b"{", b"["):
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = None
    return Event(raw, sse.name(raw).decode("utf-8", "replace"), data, payload)


@dataclass(slots=True)
class Delta:
    channel: ChannelKey
    text: str
    set_text: Callable[[str], None]
    json_source: bool = False
    """The channel carries JSON source (tool arguments): see :mod:`.json_text`."""


class StreamDialect:
    name = ""

    def deltas(self, event: Event) -> list[Delta]:
        raise NotImplementedError

    def ends(self, event: Event) -> tuple[ChannelKey, ...]:
        """Channels that must be flushed before ``event`` is sent (:data:`ALL` for all)."""
        raise NotImplementedError

    def error_event(self, message: str) -> bytes:
        raise NotImplementedError


def _add_text(
    found: list[Delta],
    channel: ChannelKey,
    container: object,
    key: str,
    choice: dict[str, Any],
    json_source: bool = False,
) -> None:
    """A delta for ``container[key]`` when it is a text (a chunk may carry none)."""
    if isinstance(container, dict) and isinstance(container.get(key), str):
        setter = _setter(container, key, choice)
        found.append(Delta(channel, container[key], setter, json_source=json_source))


def _setter(
    container: dict[str, Any], key: str, choice: dict[str, Any] | None = None
) -> Callable[[str], None]:
    """Writes a rewritten text; in an OpenAI ``choice``, also empties the log
    probabilities, whose tokens spell the text as the provider wrote it."""

    def set_text(text: str) -> None:
        container[key] = text
        if choice is not None and choice.get("logprobs"):
            choice["logprobs"] = None

    return set_text


class OpenAIStream(StreamDialect):
    """Chat completions (``delta.content``, ``delta.refusal``, tool-call arguments) and
    legacy completions (``text``). ``finish_reason`` ends a choice, ``[DONE]`` the stream."""

    def __init__(self, name: str) -> None:
        self.name = name

    def deltas(self, event: Event) -> list[Delta]:
        payload = event.payload
        if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
            return []
        found: list[Delta] = []
        for choice in payload["choices"]:
            if not isinstance(choice, dict):
                continue
            index = _index(choice.get("index", 0))
            _add_text(found, ("text", index), choice, "text", choice)  # legacy completions
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            for key in ("content", "refusal"):
                _add_text(found, (key, index), delta, key, choice)
            # The legacy form of a tool call, then tool calls: a function's arguments
            # (JSON source) or a custom tool's input (free text), streamed in pieces.
            _add_text(
                found, ("function", index), delta.get("function_call"), "arguments", choice, True
            )
            calls = delta.get("tool_calls")
            for position, call in enumerate(calls if isinstance(calls, list) else ()):
                if isinstance(call, dict):
                    channel = ("tool", index, _index(call.get("index", position)))
                    _add_text(found, channel, call.get("function"), "arguments", choice, True)
                    _add_text(found, channel, call.get("custom"), "input", choice)
        return found

    def ends(self, event: Event) -> tuple[ChannelKey, ...]:
        if event.data is not None and event.data.strip() == b"[DONE]":
            return (ALL,)
        payload = event.payload
        if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
            return ()
        return tuple(
            ("choice", _index(c.get("index", 0)))
            for c in payload["choices"]
            if isinstance(c, dict) and c.get("finish_reason") is not None
        )

    def error_event(self, message: str) -> bytes:
        error = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "code": "guardrail_blocked",
                "param": None,
            }
        }
        return b"data: " + orjson.dumps(error) + b"\n\ndata: [DONE]\n\n"


class AnthropicStream(StreamDialect):
    """Messages: ``content_block_delta`` text and tool-input JSON; ``content_block_stop``
    ends a block, ``message_delta`` / ``message_stop`` end the message."""

    name = "anthropic.messages"

    def deltas(self, event: Event) -> list[Delta]:
        payload = event.payload
        if not isinstance(payload, dict):
            return []
        kind = payload.get("type")
        index = _index(payload.get("index", 0))
        if kind == "content_block_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict):
                for key in ("text", "partial_json"):
                    if isinstance(delta.get(key), str):
                        setter = _setter(delta, key)
                        json_source = key == "partial_json"
                        return [Delta(("block", index), delta[key], setter, json_source)]
        elif kind == "content_block_start":
            block = payload.get("content_block")
            if not isinstance(block, dict):
                return []
            if block.get("type") == "text" and block.get("text"):
                return [Delta(("block", index), block["text"], _setter(block, "text"))]
            if block.get("type") in RESULT_BLOCKS:  # a tool's result arrives whole
                # Each text its own channel (stdout and stderr are not one text), all of
                # them under the block's, which its content_block_stop ends.
                return [
                    Delta(("block", index, *path), text, _setter(*_slot(block, path)))
                    for path, text in result_block_texts(block, ())
                    if text
                ]
        return []

    def ends(self, event: Event) -> tuple[ChannelKey, ...]:
        payload = event.payload
        kind = payload.get("type") if isinstance(payload, dict) else event.name
        if kind == "content_block_stop" and isinstance(payload, dict):
            return (("block", _index(payload.get("index", 0))),)
        if kind in ("message_delta", "message_stop"):
            return (ALL,)
        return ()

    def error_event(self, message: str) -> bytes:
        error = {"type": "error", "error": {"type": "permission_error", "message": message}}
        return b"event: error\ndata: " + orjson.dumps(error) + b"\n\n"


def _slot(root: dict[str, Any], path: tuple[Any, ...]) -> tuple[dict[str, Any], str]:
    """The object holding the text at ``path`` and its key there (a reader found the text
    there: every step exists, and a text's key is a member name)."""
    node: Any = root
    for step in path[:-1]:
        node = node[step]
    key = path[-1]
    assert isinstance(node, dict) and isinstance(key, str)
    return node, key


def _index(value: Any) -> int | str:
    """A choice's, tool call's or block's index as a channel key: the provider's own when
    it is a number or a string, one shared key otherwise (a list is no key at all)."""
    return value if isinstance(value, int | str) else "?"


STREAM_DIALECTS: dict[str, Callable[[], StreamDialect]] = {
    "openai.chat": lambda: OpenAIStream("openai.chat"),
    "openai.completions": lambda: OpenAIStream("openai.completions"),
    "anthropic.messages": AnthropicStream,
}
"""Dialects whose streamed answers the output guard understands."""
