"""Anthropic Messages SSE → OpenAI ``chat.completion.chunk`` SSE, chunk by chunk.

Bytes arrive split anywhere, so only an incomplete trailing event is carried over (and
refused past :data:`MAX_EVENT_BYTES`); everything else is translated and released at
once, keeping time-to-first-token what the provider gives. Per stream the translator
holds a few scalars and one small record per open ``tool_use`` block, never the text.

Event by event::

    message_start                 → {"delta": {"role": "assistant", "content": ""}}
    content_block_start text      → delta.content (if it already holds text)
    content_block_start tool_use  → delta.tool_calls[{index, id, type, function.name}]
    text_delta                    → delta.content
    input_json_delta              → delta.tool_calls[{index, function.arguments}]
    message_delta                 → remembers stop_reason and the cumulative usage
    message_stop                  → {"delta": {}, "finish_reason"}, the usage chunk
                                    (``choices: []``, if asked for), then [DONE]
    error                         → data: {"error": {...}} then [DONE]
    ping, thinking, citations, server tools, unknown events → nothing

A stream that ends without ``message_stop`` ends with an error event, so the SDK raises
instead of handing over a truncated answer as if it were whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from extproc import sse
from extproc.dialects.usage import merged_anthropic_usage
from extproc.translate.anthropic_errors import openai_error
from extproc.translate.anthropic_response import finish_reason, openai_usage, tool_call

MAX_EVENT_BYTES = 8 * 1024 * 1024
"""An unfinished event larger than this ends the stream with an error (Envoy's body cap)."""

_DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class _ToolBlock:
    """An open ``tool_use`` block: its OpenAI index, and what to send if no deltas come."""

    index: int
    initial_input: str
    sent_arguments: bool = False


class StreamTranslator:
    """Translates one Anthropic stream; ``feed`` each upstream chunk, then ``finish``.

    ``include_usage`` is the caller's ``stream_options.include_usage``: Anthropic always
    reports usage, OpenAI sends the usage chunk only when asked.
    """

    __slots__ = (
        "_created",
        "_done",
        "_events",
        "_finish",
        "_id",
        "_include_usage",
        "_model",
        "_start_usage",
        "_started",
        "_tool_blocks",
        "_tools",
        "_usage",
    )

    def __init__(
        self, requested_model: str, *, include_usage: bool = False, created: int | None = None
    ) -> None:
        self._model = requested_model
        self._include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._events = sse.Events()
        self._done = False
        self._started = False
        self._id = "chatcmpl-anthropic"
        self._finish = "stop"
        self._tools = 0
        self._tool_blocks: dict[int, _ToolBlock] = {}
        self._start_usage: dict[str, Any] = {}
        self._usage: dict[str, Any] = {}

    @property
    def done(self) -> bool:
        """``[DONE]`` has been emitted; later input is ignored."""
        return self._done

    def feed(self, chunk: bytes) -> bytes:
        """OpenAI SSE bytes for every Anthropic event completed by ``chunk``."""
        if self._done:
            return b""
        out = [self._event(event) for event in self._events.feed(chunk) if not self._done]
        if self._done:
            self._events.clear()
        elif self._events.held > MAX_EVENT_BYTES:
            self._events.clear()
            out.append(self._fail("An upstream stream event exceeded the gateway's size limit."))
        return b"".join(out)

    def finish(self) -> bytes:
        """The upstream ended: translate an unterminated last event, close a cut stream."""
        out = b""
        rest = self._events.rest()
        if rest.strip() and not self._done:
            out = self._event(rest)
        if self._done:
            return out
        return out + self._fail("The upstream stream ended before the answer was complete.")

    # ---- events -----------------------------------------------------------------------

    def _event(self, event: bytes) -> bytes:
        text = sse.data(event)
        if text is None or not text.strip():
            return b""  # no data (a bare "data" line is empty data): nothing to translate
        try:
            payload = orjson.loads(text)
        except orjson.JSONDecodeError:
            return self._fail("The upstream stream sent an event that is not JSON.")
        if not isinstance(payload, dict):
            return b""
        kind = payload.get("type")
        if kind == "content_block_delta":  # the hot path: one per token or so
            return self._delta(payload)
        if kind == "message_start":
            message = payload.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("id"), str):
                    self._id = message["id"]
                self._started_usage(message.get("usage"))
            return self._start()
        if kind == "content_block_start":
            return self._block_start(payload)
        if kind == "content_block_stop":
            return self._block_stop(payload)
        if kind == "message_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason") is not None:
                self._finish = finish_reason(delta["stop_reason"])
            self._delta_usage(payload.get("usage"))
            return b""
        if kind == "message_stop":
            return self._stop()
        if kind == "error":
            self._done = True
            return _data(openai_error(500, payload.get("error"))) + _DONE
        return b""  # ping, and event types added after this was written

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return self._chunk({"role": "assistant", "content": ""})

    def _block_start(self, payload: dict[str, Any]) -> bytes:
        block = payload.get("content_block")
        index = _index(payload)
        if not isinstance(block, dict):
            return b""
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            return self._text(text) if isinstance(text, str) and text else b""
        if kind != "tool_use":
            return b""  # thinking, server tools and their results have no OpenAI form
        tool = _ToolBlock(self._tools, _initial_input(block.get("input")))
        self._tools += 1
        self._tool_blocks[index] = tool
        return self._start() + self._chunk({"tool_calls": [tool_call(tool.index, block, "")]})

    def _delta(self, payload: dict[str, Any]) -> bytes:
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            return b""
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            return self._text(text) if isinstance(text, str) and text else b""
        if kind == "input_json_delta":
            tool = self._tool_blocks.get(_index(payload))
            fragment = delta.get("partial_json")
            if tool is None or not isinstance(fragment, str) or not fragment:
                return b""
            return self._arguments(tool, fragment)
        return b""  # thinking, signature and citation deltas

    def _block_stop(self, payload: dict[str, Any]) -> bytes:
        tool = self._tool_blocks.pop(_index(payload), None)
        if tool is None or tool.sent_arguments:
            return b""
        # A call without argument deltas: OpenAI clients parse "{}", never "".
        return self._arguments(tool, tool.initial_input or "{}")

    def _stop(self) -> bytes:
        # Tool blocks the upstream never closed get their arguments all the same.
        out = b"".join(self._block_stop({"index": i}) for i in list(self._tool_blocks))
        out += self._start() + self._chunk({}, self._finish)
        if self._include_usage:
            payload = self._envelope([])
            payload["usage"] = openai_usage(self._usage)
            out += _data(payload)
        self._done = True
        return out + _DONE

    def _fail(self, message: str) -> bytes:
        self._done = True
        error = {"type": "api_error", "message": message}
        return _data(openai_error(502, error)) + _DONE

    # ---- output -----------------------------------------------------------------------

    def _text(self, text: str) -> bytes:
        return self._start() + self._chunk({"content": text})

    def _arguments(self, tool: _ToolBlock, fragment: str) -> bytes:
        tool.sent_arguments = True
        call = {"index": tool.index, "function": {"arguments": fragment}}
        return self._chunk({"tool_calls": [call]})

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _data(self._envelope([choice]))

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self._include_usage:
            payload["usage"] = None  # as OpenAI does on every chunk but the last
        return payload

    def _started_usage(self, usage: object) -> None:
        """``message_start``'s usage: the prompt, and all there is if the stream is cut."""
        if isinstance(usage, dict):
            self._start_usage = usage
            self._usage = dict(usage)

    def _delta_usage(self, usage: object) -> None:
        """``message_delta`` counts are cumulative; input may come only in message_start."""
        if isinstance(usage, dict):
            self._usage = merged_anthropic_usage(self._start_usage, usage)


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _index(payload: dict[str, Any]) -> int:
    """The content block an event is about (-1, matching no block, when malformed)."""
    index = payload.get("index")
    return index if isinstance(index, int) else -1


def _initial_input(initial: Any) -> str:
    """A tool block's input as its start gives it (``{}`` in practice: the input follows
    as deltas), as JSON; empty when there is none or it nests deeper than can be written."""
    if not initial:
        return ""
    try:
        return orjson.dumps(initial).decode()
    except orjson.JSONEncodeError:
        return ""
