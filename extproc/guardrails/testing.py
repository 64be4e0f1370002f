"""Helpers for tests of guardrails and of code that uses them (no I/O, no network).

``rules_from_yaml`` / ``guardrails_from_yaml`` build compiled guardrails from a YAML
snippet shaped like the policy's ``guardrails:`` list; the SSE helpers build provider
stream events and read the text back out of what a :class:`StreamGuard` sends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import yaml

from extproc.dialects.base import JsonPath, TextPart
from extproc.guardrails.config import GuardrailRule, GuardrailSettings
from extproc.guardrails.engine import Guardrails, compile_guardrails


def rules_from_yaml(text: str) -> list[GuardrailRule]:
    return [GuardrailRule.model_validate(rule) for rule in yaml.safe_load(text)]


def guardrails_from_yaml(
    text: str,
    settings: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Guardrails:
    return compile_guardrails(
        rules_from_yaml(text),
        GuardrailSettings.model_validate(settings or {}),
        environ=environ or {},
    )


def user_text(
    text: str, path: JsonPath = ("messages", 0, "content"), role: str = "user"
) -> TextPart:
    return TextPart(path, role, "message", text)


def openai_chunk(
    content: str | None = None,
    *,
    index: int = 0,
    finish: str | None = None,
    arguments: str | None = None,
    tool: int = 0,
    custom_input: str | None = None,
) -> bytes:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if arguments is not None:
        delta["tool_calls"] = [{"index": tool, "function": {"arguments": arguments}}]
    if custom_input is not None:
        delta["tool_calls"] = [{"index": tool, "custom": {"input": custom_input}}]
    payload = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def completion_chunk(text: str, *, finish: str | None = None) -> bytes:
    payload = {
        "id": "cmpl-test",
        "object": "text_completion",
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


OPENAI_DONE = b"data: [DONE]\n\n"


def anthropic_event(kind: str, **fields: Any) -> bytes:
    payload = {"type": kind, **fields}
    return f"event: {kind}\ndata: ".encode() + orjson.dumps(payload) + b"\n\n"


def anthropic_text(text: str, index: int = 0) -> bytes:
    return anthropic_event(
        "content_block_delta", index=index, delta={"type": "text_delta", "text": text}
    )


def sse_payloads(stream: bytes) -> list[Any]:
    """Every ``data:`` payload in ``stream`` (``"[DONE]"`` kept as a string)."""
    found: list[Any] = []
    for event in stream.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                data = line[5:].strip()
                found.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return found


def streamed_text(stream: bytes) -> str:
    """The answer text a client reassembles from ``stream`` (OpenAI or Anthropic)."""
    parts: list[str] = []
    for payload in sse_payloads(stream):
        if not isinstance(payload, dict):
            continue
        if payload.get("type") == "content_block_delta":
            delta = payload["delta"]
            parts.append(delta.get("text") or delta.get("partial_json") or "")
        for choice in payload.get("choices") or []:
            parts.append(choice.get("text") or "")
            delta = choice.get("delta") or {}
            parts.append(delta.get("content") or "")
            for call in delta.get("tool_calls") or []:
                parts.append(call.get("function", {}).get("arguments") or "")
                parts.append(call.get("custom", {}).get("input") or "")
    return "".join(parts)
