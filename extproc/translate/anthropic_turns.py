"""OpenAI chat messages → Anthropic ``system`` blocks and alternating turns.

Anthropic wants strictly alternating user/assistant turns with every system text at the
top, so system and developer messages are hoisted into ``system`` (or, when there is
nothing else, become the user's turn; and those after the model's last answer, "now
translate it", become the user's next turn: hoisted, they left the conversation ending on
the model's answer, which Claude continues as a prefill), tool results become user
turns, and consecutive turns of one role merge (several tool results, or a tool result
then the user's next words, make one turn). Content parts map one to one; empty texts
are left out because Anthropic refuses them. Errors name the field the caller sent,
never Anthropic's, and never echo its content.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from extproc.dialects.base import JsonPath
from extproc.dialects.fields import (
    expect_list,
    expect_object,
    expect_str,
    format_param,
    invalid_type,
    invalid_value,
    optional_str,
)
from extproc.errors import InvalidRequest

Block = dict[str, Any]
"""One Anthropic content block, system block or turn, as plain JSON data."""

_IMAGE_TYPES = {
    "image/jpeg": "image/jpeg",
    "image/jpg": "image/jpeg",
    "image/png": "image/png",
    "image/gif": "image/gif",
    "image/webp": "image/webp",
}
_PART_TYPES = {
    "system": ("text",),
    "developer": ("text",),
    "user": ("text", "image_url", "file"),
    "assistant": ("text", "refusal"),
    "tool": ("text",),
}
_CONTENT = "a string or an array of content parts"
# Anthropic checks tool_use ids against this alphabet; OpenAI-compatible servers use ':'.
_TOOL_ID_ALIEN = re.compile(r"[^A-Za-z0-9_-]")


def conversation(messages: list[Any]) -> tuple[list[Block], list[Block]]:
    """System text blocks and alternating turns, in conversation order."""
    system: list[Block] = []
    turns: list[Block] = []
    after_last_turn = 0  # system blocks (the last ones) from messages after the last turn
    empty_last: JsonPath | None = None  # the last message, a user's with nothing to send
    for i, message in enumerate(messages):
        path: JsonPath = ("messages", i)
        message = expect_object(message, path)
        role = message.get("role")
        empty_last = None
        if role in ("system", "developer"):
            blocks = _blocks(message.get("content"), (*path, "content"), role)
            system.extend(blocks)
            after_last_turn += len(blocks)
            continue
        if role == "user":
            blocks = _blocks(message.get("content"), (*path, "content"), role)
        elif role == "assistant":
            role, blocks = "assistant", _assistant(message, path)
        elif role == "tool":
            role, blocks = "user", [_tool_result(message, path)]
        elif role == "function":
            raise InvalidRequest(
                f"'{format_param((*path, 'role'))}': legacy 'function' messages are not "
                "supported for Claude models; use tool calls and 'tool' messages.",
                param=format_param((*path, "role")),
                code="unsupported_value",
            )
        elif isinstance(role, str):
            raise invalid_value((*path, "role"), "one of system, developer, user, assistant, tool")
        else:
            raise invalid_type((*path, "role"), "a string", role)
        if not blocks:
            empty_last = (*path, "content") if role == "user" else None
            continue  # an empty turn says nothing, and Anthropic refuses empty content
        after_last_turn = 0
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if turns and turns[-1]["role"] == "assistant":
        if after_last_turn:  # instructions after the answer: the user's next turn
            turns.append({"role": "user", "content": system[-after_last_turn:]})
            del system[-after_last_turn:]
        elif empty_last is not None:
            raise InvalidRequest(
                f"'{format_param(empty_last)}': the last message has no text (only "
                "whitespace); Claude models would continue the previous assistant message "
                "instead of answering it.",
                param=format_param(empty_last),
                code="invalid_value",
            )
    _trim_prefill(turns)
    if not turns:
        if not system:
            raise InvalidRequest(
                "Invalid 'messages': Claude models need at least one non-empty message.",
                param="messages",
                code="invalid_value",
            )
        # OpenAI answers a conversation of only system/developer messages; Anthropic needs
        # a turn, so those texts become the user's turn: the model answers them either way.
        return [], [{"role": "user", "content": system}]
    return system, turns


def _trim_prefill(turns: list[dict[str, Any]]) -> None:
    """A conversation ending with an assistant message is a *prefill* to Anthropic: Claude
    goes on from that text rather than answering after it (and models that take no prefill
    refuse it, as they say). Anthropic refuses a prefill ending in whitespace, which an
    OpenAI client sends freely ("Here is one: "): that whitespace is left out."""
    if not turns or turns[-1]["role"] != "assistant":
        return
    blocks = turns[-1]["content"]
    while blocks and blocks[-1].get("type") == "text":
        text = str(blocks[-1]["text"]).rstrip()
        if text:
            blocks[-1] = {**blocks[-1], "text": text}
            return
        blocks.pop()
    if not blocks:
        turns.pop()


def _blocks(content: object, path: JsonPath, role: str) -> list[Block]:
    """Content (a string or parts) as Anthropic blocks; texts of whitespace alone, which
    Anthropic refuses, are left out."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content.strip() else []
    if content is None and role == "assistant":
        return []  # an assistant turn that only calls tools
    if not isinstance(content, list):
        raise invalid_type(path, _CONTENT, content)
    allowed = _PART_TYPES[role]
    blocks: list[Block] = []
    for j, part in enumerate(content):
        where = (*path, j)
        part = expect_object(part, where)
        ptype = part.get("type")
        if ptype is None and "text" in part:
            ptype = "text"  # vLLM and the dialect parser accept an untyped text part
        if ptype not in allowed:
            if not isinstance(ptype, str):
                raise invalid_type((*where, "type"), "a string", ptype)
            raise _unsupported_part(where, ptype, role, allowed)
        if ptype == "text" or ptype == "refusal":
            text = expect_str(part.get(ptype), (*where, ptype))
            if not text.strip():
                continue
            block: Block = {"type": "text", "text": text}
        elif ptype == "image_url":
            block = _image(part, where)
        else:
            block = _document(part, where)
        if isinstance(part.get("prompt_cache_breakpoint"), dict):
            block["cache_control"] = {"type": "ephemeral"}
        elif isinstance(part.get("cache_control"), dict):
            block["cache_control"] = part["cache_control"]  # Claude-aware clients send it
        blocks.append(block)
    return blocks


def _unsupported_part(
    where: JsonPath, ptype: str, role: str, allowed: tuple[str, ...]
) -> InvalidRequest:
    param = format_param((*where, "type"))
    if ptype == "input_audio":
        why = "Claude does not take audio input"
    else:
        why = f"a {role} message may hold only " + ", ".join(allowed) + " parts"
    return InvalidRequest(
        f"Invalid value for '{param}': {why}.", param=param, code="unsupported_value"
    )


def _image(part: dict[str, Any], where: JsonPath) -> Block:
    spec = expect_object(part.get("image_url"), (*where, "image_url"))
    at = (*where, "image_url", "url")
    url = expect_str(spec.get("url"), at)
    if url.startswith("data:"):
        media_type, data = _data_url(url, at)
        if media_type not in _IMAGE_TYPES:
            raise invalid_value(at, "a JPEG, PNG, GIF or WebP image")
        source = {"type": "base64", "media_type": _IMAGE_TYPES[media_type], "data": data}
        return {"type": "image", "source": source}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise invalid_value(at, "an http(s) URL or a base64 data: URL")


def _document(part: dict[str, Any], where: JsonPath) -> Block:
    """A file part sent inline; Claude reads PDFs. OpenAI file ids mean nothing to it."""
    spec = expect_object(part.get("file"), (*where, "file"))
    at = (*where, "file", "file_data")
    data_url = spec.get("file_data")
    if data_url is None:
        raise InvalidRequest(
            f"Invalid '{format_param(at)}': Claude models need the file inline as a base64 "
            "data: URL; OpenAI file ids are not available to them.",
            param=format_param(at),
            code="unsupported_value",
        )
    media_type, data = _data_url(expect_str(data_url, at), at)
    if media_type != "application/pdf":
        raise invalid_value(at, "a PDF (data:application/pdf;base64,...)")
    block: Block = {
        "type": "document",
        "source": {"type": "base64", "media_type": media_type, "data": data},
    }
    filename = optional_str(spec, "filename", (*where, "file"))
    if filename:
        block["title"] = filename
    return block


def _data_url(url: str, at: JsonPath) -> tuple[str, str]:
    """``data:<type>;base64,<data>`` → (type, data); the data itself is the upstream's to check."""
    header, comma, data = url[5:].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    if not comma or "base64" not in params[1:] or not data:
        raise invalid_value(at, "a base64 data: URL (data:<media type>;base64,<data>)")
    return params[0], data


def _assistant(message: dict[str, Any], path: JsonPath) -> list[Block]:
    blocks = _blocks(message.get("content"), (*path, "content"), "assistant")
    refusal = optional_str(message, "refusal", path)
    if refusal:
        blocks.append({"type": "text", "text": refusal})
    calls = message.get("tool_calls")
    if calls is not None:
        for k, call in enumerate(expect_list(calls, (*path, "tool_calls"))):
            blocks.append(
                _tool_use(expect_object(call, (*path, "tool_calls", k)), (*path, "tool_calls", k))
            )
    if message.get("function_call") is not None:
        raise InvalidRequest(
            f"'{format_param((*path, 'function_call'))}' is not supported for Claude models: "
            "use 'tool_calls'.",
            param=format_param((*path, "function_call")),
            code="unsupported_parameter",
        )
    return blocks


def _tool_use(call: dict[str, Any], where: JsonPath) -> Block:
    ctype = call.get("type", "function")
    if ctype != "function":
        raise invalid_value(
            (*where, "type"), "'function' (custom tools are not supported for Claude)"
        )
    spec = expect_object(call.get("function"), (*where, "function"))
    name = expect_str(spec.get("name"), (*where, "function", "name"))
    call_id = _tool_id(call.get("id"), (*where, "id"))
    at = (*where, "function", "arguments")
    arguments = expect_str(spec.get("arguments"), at)
    return {"type": "tool_use", "id": call_id, "name": name, "input": _arguments(arguments, at)}


def _arguments(arguments: str, at: JsonPath) -> dict[str, Any]:
    """Tool-call arguments are a JSON string on OpenAI, a JSON object on Anthropic."""
    if not arguments.strip():
        return {}  # some clients send "" for a call without arguments
    param = format_param(at)
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            f"Invalid '{param}': not valid JSON; Claude needs the arguments as a JSON object.",
            param=param,
            code="invalid_value",
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"Invalid '{param}': Claude needs tool-call arguments as a JSON object.",
            param=param,
            code="invalid_value",
        )
    return value


def _tool_result(message: dict[str, Any], path: JsonPath) -> Block:
    result: Block = {
        "type": "tool_result",
        "tool_use_id": _tool_id(message.get("tool_call_id"), (*path, "tool_call_id")),
    }
    content = message.get("content")
    if isinstance(content, str):
        if content.strip():  # whitespace alone is no text to Anthropic, as in a part
            result["content"] = content
    else:
        blocks = _blocks(content, (*path, "content"), "tool")
        if blocks:
            result["content"] = blocks
    return result


def _tool_id(value: object, at: JsonPath) -> str:
    """The same rewrite on both sides of a call keeps ``tool_use`` and its result paired."""
    call_id = expect_str(value, at)
    if not call_id:
        raise invalid_value(at, "a non-empty tool call id")
    return _TOOL_ID_ALIEN.sub("_", call_id)
