"""The texts of a non-streamed answer, with their JSON paths, for output guardrails.

Like a dialect's request view, but for the provider's answer: every string the model
produced that the caller will read, so a rule can rewrite it in place
(:func:`extproc.dialects.json_body.apply_rewrites` works on answers too).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from extproc.dialects.anthropic_messages import RESULT_BLOCKS, result_block_texts
from extproc.dialects.base import JsonPath, TextPart
from extproc.dialects.fields import names_text, string_leaves
from extproc.dialects.openai_responses import BUILT_IN_TEXTS, ITEM_TEXTS, built_in_texts

_ROLE = "assistant"


def answer_texts(dialect: str, body: Any) -> tuple[TextPart, ...]:
    """Texts of ``body`` (a parsed JSON answer of ``dialect``); unknown shapes give none."""
    if not isinstance(body, dict):
        return ()
    texts: list[TextPart] = []
    if dialect == "anthropic.messages":
        _anthropic(body, texts)
    elif dialect == "openai.responses":
        _responses(body, texts)
    else:
        _openai(body, texts)
    return tuple(texts)


def drop_stale_logprobs(answer: Any, rewritten: Iterable[JsonPath]) -> None:
    """Empty the log probabilities beside every rewritten text (a choice's ``logprobs``,
    a Responses part's): their tokens spell the text as the provider wrote it, so a masked
    e-mail address stayed readable in them."""
    for path in rewritten:
        node = answer
        for step in path[:-1]:
            try:
                node = node[step]
            except (KeyError, IndexError, TypeError):
                break
            if isinstance(node, dict) and node.get("logprobs"):
                node["logprobs"] = [] if isinstance(node["logprobs"], list) else None


def _add(
    texts: list[TextPart],
    path: JsonPath,
    value: object,
    kind: str = "message",
    json_source: bool = False,
) -> None:
    if isinstance(value, str) and value:
        texts.append(TextPart(path, _ROLE, kind, value, json_source))


def _openai(body: dict[str, Any], texts: list[TextPart]) -> None:
    """Chat completions (message content, refusal, tool calls) and completions (text)."""
    choices = body.get("choices")
    if not isinstance(choices, list):
        return
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        _add(texts, ("choices", i, "text"), choice.get("text"))
        message = choice.get("message")
        if not isinstance(message, dict):
            continue
        where: JsonPath = ("choices", i, "message")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict):
                    _add(texts, (*where, "content", j, "text"), part.get("text"))
        else:
            _add(texts, (*where, "content"), content)
        _add(texts, (*where, "refusal"), message.get("refusal"))
        calls = message.get("tool_calls")
        for k, call in enumerate(calls if isinstance(calls, list) else []):
            if not isinstance(call, dict):
                continue
            function, custom = call.get("function"), call.get("custom")
            if isinstance(function, dict):
                path = (*where, "tool_calls", k, "function", "arguments")
                _add(texts, path, function.get("arguments"), "tool_arguments", True)
            if isinstance(custom, dict):  # a custom tool's input is free text, not JSON
                path = (*where, "tool_calls", k, "custom", "input")
                _add(texts, path, custom.get("input"), "tool_arguments")
        legacy = message.get("function_call")
        if isinstance(legacy, dict):
            _add(
                texts,
                (*where, "function_call", "arguments"),
                legacy.get("arguments"),
                "tool_arguments",
                True,
            )


def _anthropic(body: dict[str, Any], texts: list[TextPart]) -> None:
    content = body.get("content")
    for j, block in enumerate(content if isinstance(content, list) else []):
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            _add(texts, ("content", j, "text"), block.get("text"))
            citations = block.get("citations")
            for n, citation in enumerate(citations if isinstance(citations, list) else []):
                if isinstance(citation, dict):  # the quoted passage, shown beside the text
                    _add(
                        texts,
                        ("content", j, "citations", n, "cited_text"),
                        citation.get("cited_text"),
                    )
        elif block.get("type") in ("tool_use", "server_tool_use", "mcp_tool_use"):
            for path, value in string_leaves(block.get("input"), ("content", j, "input")):
                _add(texts, path, value, "tool_arguments")
            names = names_text(block.get("input"), ("content", j, "input"), _ROLE, "tool_arguments")
            if names is not None:
                texts.append(names)
        elif block.get("type") in RESULT_BLOCKS:
            for path, value in result_block_texts(block, ("content", j)):
                _add(texts, path, value)


def _responses(body: dict[str, Any], texts: list[TextPart]) -> None:
    output = body.get("output")
    for k, item in enumerate(output if isinstance(output, list) else []):
        if not isinstance(item, dict):
            continue
        itype = item.get("type")
        if itype == "message":
            content = item.get("content")
            for m, part in enumerate(content if isinstance(content, list) else []):
                if isinstance(part, dict):
                    _add(texts, ("output", k, "content", m, "text"), part.get("text"))
                    _add(texts, ("output", k, "content", m, "refusal"), part.get("refusal"))
        elif itype == "reasoning":  # its summary is shown; its encrypted content is not
            summary = item.get("summary")
            for n, part in enumerate(summary if isinstance(summary, list) else []):
                if isinstance(part, dict):
                    _add(texts, ("output", k, "summary", n, "text"), part.get("text"))
        elif itype in ("mcp_call", "mcp_approval_request"):
            for field, _, kind, json_source in ITEM_TEXTS[itype]:
                _add(texts, ("output", k, field), item.get(field), kind, json_source)
        elif isinstance(itype, str) and itype in BUILT_IN_TEXTS:  # a program, its logs, ...
            for path, text, _, kind in built_in_texts(item, ("output", k)):
                _add(texts, path, text, kind)
        elif itype in ("function_call", "custom_tool_call"):
            key = "arguments" if item.get("type") == "function_call" else "input"
            json_source = item.get("type") == "function_call"  # a custom tool's input is not
            _add(texts, ("output", k, key), item.get(key), "tool_arguments", json_source)
