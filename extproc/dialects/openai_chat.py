"""OpenAI chat completions (``/v1/chat/completions``), the dialect most clients speak.

Scalar fields are checked before the messages so a body with several faults gets the
same first complaint the OpenAI API gives. Every string the model will read as
conversation is exposed, including the assistant's earlier tool-call arguments, since a
prompt injection can be planted there as easily as in user text.
"""

from __future__ import annotations

from typing import Any

from extproc.dialects.base import DialectEnvelope, JsonPath, LLMRequest, TextPart
from extproc.dialects.fields import (
    expect_list,
    expect_object,
    expect_str,
    invalid_type,
    message_role,
    optional_bool,
    optional_positive_int,
    optional_str,
    require_model,
)

# Tuples, not sets: a role or type may be any JSON value, and a list is unhashable.
_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_CONTENT = "a string or an array of content parts"
# An assistant turn that only calls tools, and a legacy function result, may have no content.
_NULLABLE = ("assistant", "function")


class OpenAIChat:
    """Chat completions, including the legacy ``functions`` / ``function_call`` fields."""

    name: str = "openai.chat"
    envelope: DialectEnvelope = "openai"
    output_cap_field: str | None = "max_completion_tokens"
    min_output_cap: int = 1
    asks_stream_usage = True

    def parse(self, body: dict[str, Any]) -> LLMRequest:
        model = require_model(body)
        completion_cap = optional_positive_int(body, "max_completion_tokens")
        legacy_cap = optional_positive_int(body, "max_tokens")
        stream = optional_bool(body, "stream")
        tools = _tool_names(body)
        texts: list[TextPart] = []
        messages = expect_list(body.get("messages"), ("messages",), non_empty=True)
        for i, message in enumerate(messages):
            _message(expect_object(message, ("messages", i)), ("messages", i), texts)
        _prediction(body, texts)
        return LLMRequest(
            dialect=self.name,
            model=model,
            texts=tuple(texts),
            max_output_tokens=completion_cap if completion_cap is not None else legacy_cap,
            stream=stream,
            tools=tools,
            body=body,
            chat_messages=len(body["messages"]),
            answers=optional_positive_int(body, "n") or 1,
        )


def _message(message: dict[str, Any], path: JsonPath, texts: list[TextPart]) -> None:
    role = message_role(message, path, _ROLES)
    # Legacy "function" results are tool results; policy sees one closed set of roles.
    author, kind = ("tool", "tool_result") if role in ("tool", "function") else (role, "message")
    content = message.get("content")
    where = (*path, "content")
    if isinstance(content, str):
        texts.append(TextPart(where, author, kind, content))
    elif isinstance(content, list):
        _parts(content, where, author, kind, texts)
    elif content is not None or role not in _NULLABLE:
        raise invalid_type(where, _CONTENT, content)
    if role == "assistant":
        _assistant_extras(message, path, texts)


_PART_TEXTS = (
    ("text", "text"),
    ("refusal", "refusal"),
    # OpenAI refuses these; vLLM's chat parser reads them as text (and thinking as the
    # model's earlier reasoning): what it shows the model must be read here too.
    ("input_text", "text"),
    ("output_text", "text"),
    ("thinking", "thinking"),
)
"""Part types that carry text, with the member that holds it. A tuple: a part's type may
be any JSON value, unhashable ones too."""


def _parts(parts: list[Any], path: JsonPath, author: str, kind: str, texts: list[TextPart]) -> None:
    """Text parts become texts; image, audio and file parts carry no text and are skipped."""
    for j, part in enumerate(parts):
        where = (*path, j)
        part = expect_object(part, where)
        ptype = part.get("type")
        # A part without a type but with "text" is read as text: vLLM infers the type.
        field = "text" if ptype is None and "text" in part else None
        for known, member in _PART_TEXTS:
            if ptype == known:
                field = member
                break
        if field is not None:
            text = expect_str(part.get(field), (*where, field))
            texts.append(TextPart((*where, field), author, kind, text))


def _prediction(body: dict[str, Any], texts: list[TextPart]) -> None:
    """Predicted output (``prediction.content``): text the caller sends for the model to
    reuse, such as a file to be edited, so it reaches the provider as a prompt does."""
    prediction = body.get("prediction")
    if prediction is None:
        return
    content = expect_object(prediction, ("prediction",)).get("content")
    where = ("prediction", "content")
    if isinstance(content, str):
        texts.append(TextPart(where, "user", "message", content))
    elif isinstance(content, list):
        _parts(content, where, "user", "message", texts)
    elif content is not None:
        raise invalid_type(where, "a string or an array of content parts", content)


def _assistant_extras(message: dict[str, Any], path: JsonPath, texts: list[TextPart]) -> None:
    """Earlier model output the model will read again: refusals and tool-call arguments."""
    refusal = optional_str(message, "refusal", path)
    if refusal is not None:
        texts.append(TextPart((*path, "refusal"), "assistant", "message", refusal))
    calls = message.get("tool_calls")
    if calls is not None:
        for k, call in enumerate(expect_list(calls, (*path, "tool_calls"))):
            where = (*path, "tool_calls", k)
            call = expect_object(call, where)
            # Custom tools take free text as "input"; function tools take JSON "arguments".
            field, key = (
                ("custom", "input") if call.get("type") == "custom" else ("function", "arguments")
            )
            spec = expect_object(call.get(field), (*where, field))
            text = expect_str(spec.get(key), (*where, field, key))
            json = field == "function"
            texts.append(TextPart((*where, field, key), "assistant", "tool_arguments", text, json))
    legacy = message.get("function_call")
    if legacy is not None:
        where = (*path, "function_call")
        text = expect_str(expect_object(legacy, where).get("arguments"), (*where, "arguments"))
        texts.append(TextPart((*where, "arguments"), "assistant", "tool_arguments", text, True))


def _tool_names(body: dict[str, Any]) -> tuple[str, ...]:
    names: list[str] = []
    tools = body.get("tools")
    if tools is not None:
        for i, tool in enumerate(expect_list(tools, ("tools",))):
            tool = expect_object(tool, ("tools", i))
            ttype = tool.get("type", "function")
            if ttype in ("function", "custom"):
                spec = expect_object(tool.get(ttype), ("tools", i, ttype))
                names.append(expect_str(spec.get("name"), ("tools", i, ttype, "name")))
            else:
                names.append(expect_str(ttype, ("tools", i, "type")))
    functions = body.get("functions")
    if functions is not None:
        for i, function in enumerate(expect_list(functions, ("functions",))):
            function = expect_object(function, ("functions", i))
            names.append(expect_str(function.get("name"), ("functions", i, "name")))
    return tuple(names)


DIALECT = OpenAIChat()
