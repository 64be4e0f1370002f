"""Anthropic Messages answer → OpenAI ``chat.completion``, plus the pieces the stream shares.

The caller asked OpenAI's API for a model by the name it knows, so the answer carries
that name, OpenAI's finish reasons and OpenAI's usage arithmetic: Anthropic counts cache
reads and writes apart from ``input_tokens``, OpenAI counts them inside
``prompt_tokens`` (as :mod:`extproc.dialects.usage` does for budgets).
Thinking and server-tool blocks have no place in a chat completion and are left out.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from extproc.dialects.usage import Usage, anthropic_usage, token_count

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def finish_reason(stop_reason: object) -> str:
    """OpenAI's finish reason for Anthropic's ``stop_reason`` (unknown ones read as stop)."""
    return _FINISH.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def openai_usage(usage: object) -> dict[str, Any]:
    """OpenAI's ``usage`` object from Anthropic's (missing counts read as 0), counted as
    budgets count it (:func:`extproc.dialects.usage.anthropic_usage`)."""
    counted = anthropic_usage(usage) or Usage(0, 0)
    prompt, completion = counted.input_tokens, counted.output_tokens
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": counted.cached_input_tokens,
            "cache_write_tokens": counted.cache_write_input_tokens,
        },
    }
    details = usage.get("output_tokens_details") if isinstance(usage, dict) else None
    if isinstance(details, dict) and "thinking_tokens" in details:
        out["completion_tokens_details"] = {
            "reasoning_tokens": token_count(details.get("thinking_tokens"))
        }
    return out


def tool_call(index: int | None, block: dict[str, Any], arguments: str) -> dict[str, Any]:
    """One OpenAI tool call for a ``tool_use`` block (``index`` only in stream deltas)."""
    name = block.get("name")
    call: dict[str, Any] = {} if index is None else {"index": index}
    call["id"] = block.get("id") if isinstance(block.get("id"), str) else ""
    call["type"] = "function"
    call["function"] = {"name": name if isinstance(name, str) else "", "arguments": arguments}
    return call


def response_from_anthropic(
    body: dict[str, Any], requested_model: str, *, created: int | None = None
) -> dict[str, Any]:
    """The ``chat.completion`` for an Anthropic message.

    ``created`` defaults to now; tests pass it. Text blocks are concatenated the way the
    stream delivers them; tool arguments become compact JSON strings. A malformed body
    yields an empty answer rather than an exception: the upstream already charged for it.
    """
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    content = body.get("content")
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append(tool_call(None, block, arguments))
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    message_id = body.get("id")
    return {
        "id": message_id if isinstance(message_id, str) else "chatcmpl-anthropic",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": requested_model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason(body.get("stop_reason")),
            }
        ],
        "usage": openai_usage(body.get("usage")),
        "system_fingerprint": None,
    }
