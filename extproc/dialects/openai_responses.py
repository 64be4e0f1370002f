"""OpenAI Responses (``/v1/responses``), where a conversation is a list of typed items.

Texts from ``input`` have kind ``input`` whatever their role, as the base module defines
it; tool calls and their outputs replayed in ``input`` are exposed like chat's, because
the model reads them again, built-in tools' calls and results too (a program and its
logs, file-search queries and the passages found, a patch, shell commands, a search
query, text typed on a computer: :data:`BUILT_IN_TEXTS`). Item types that carry no text
(reasoning, item references, a generated image) are skipped and left for the upstream
to validate.
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

_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")
_CONTENT = "a string or an array of content parts"
# item type -> (field holding the text, author, kind)
_TOOL_ITEMS: dict[str, tuple[str, str, str]] = {
    "function_call": ("arguments", "assistant", "tool_arguments"),
    "custom_tool_call": ("input", "assistant", "tool_arguments"),
    "function_call_output": ("output", "tool", "tool_result"),
    "custom_tool_call_output": ("output", "tool", "tool_result"),
    "local_shell_call_output": ("output", "tool", "tool_result"),
}
# item type -> its optional text fields: (field, author, kind, JSON source); the MCP
# items' are read the same way in answers (extproc/guardrails/answer.py)
ITEM_TEXTS: dict[str, tuple[tuple[str, str, str, bool], ...]] = {
    # A remote MCP tool's call replayed: its arguments and output, if any.
    "mcp_call": (
        ("arguments", "assistant", "tool_arguments", True),
        ("output", "tool", "tool_result", False),
    ),
    "mcp_approval_request": (("arguments", "assistant", "tool_arguments", True),),
    "apply_patch_call_output": (("output", "tool", "tool_result", False),),
    "program": (("code", "assistant", "tool_arguments", False),),
    "program_output": (("result", "tool", "tool_result", False),),
}


_Where = tuple[str, ...]
"""Where a text sits in an item: member names, ``*`` for every element of a list."""
BUILT_IN_TEXTS: dict[str, tuple[tuple[_Where, str, str], ...]] = {
    "code_interpreter_call": (
        (("code",), "assistant", "tool_arguments"),
        (("outputs", "*", "logs"), "tool", "tool_result"),
    ),
    "file_search_call": (
        (("queries", "*"), "assistant", "tool_arguments"),
        (("results", "*", "text"), "tool", "tool_result"),
    ),
    "apply_patch_call": ((("operation", "diff"), "assistant", "tool_arguments"),),
    "shell_call": ((("action", "commands", "*"), "assistant", "tool_arguments"),),
    "local_shell_call": ((("action", "command", "*"), "assistant", "tool_arguments"),),
    "web_search_call": (
        (("action", "query"), "assistant", "tool_arguments"),
        (("action", "queries", "*"), "assistant", "tool_arguments"),
    ),
    "computer_call": ((("action", "text"), "assistant", "tool_arguments"),),
}
"""Built-in tools' items (replayed in a request, or in an answer): where their texts are,
with their author and kind. Read leniently (a text where one is expected, anything else
passed over): their shapes are the upstream's to check."""


def built_in_texts(item: dict[str, Any], path: JsonPath) -> list[tuple[JsonPath, str, str, str]]:
    """``(path, text, author, kind)`` of each text of a built-in tool's item."""
    found: list[tuple[JsonPath, str, str, str]] = []
    itype = item.get("type")
    for where, author, kind in BUILT_IN_TEXTS.get(itype if isinstance(itype, str) else "", ()):
        for at, text in _strings_at(item, where, path):
            found.append((at, text, author, kind))
    return found


def _strings_at(value: Any, where: _Where, path: JsonPath) -> list[tuple[JsonPath, str]]:
    if not where:
        return [(path, value)] if isinstance(value, str) else []
    step, rest = where[0], where[1:]
    if step == "*":
        items = value if isinstance(value, list) else []
        return [hit for n, v in enumerate(items) for hit in _strings_at(v, rest, (*path, n))]
    if not isinstance(value, dict) or step not in value:
        return []
    return _strings_at(value[step], rest, (*path, step))


class OpenAIResponses:
    """The Responses API; ``input`` may be omitted when ``previous_response_id`` is set."""

    name: str = "openai.responses"
    envelope: DialectEnvelope = "openai"
    output_cap_field: str | None = "max_output_tokens"
    min_output_cap: int = 16
    """The API refuses a max_output_tokens below 16 (integer_below_min_value)."""
    asks_stream_usage = False

    def parse(self, body: dict[str, Any]) -> LLMRequest:
        model = require_model(body)
        max_tokens = optional_positive_int(body, "max_output_tokens")
        stream = optional_bool(body, "stream")
        tools = _tool_names(body)
        texts: list[TextPart] = []
        instructions = optional_str(body, "instructions", ())
        if instructions is not None:
            texts.append(TextPart(("instructions",), "system", "instructions", instructions))
        items = body.get("input")
        if isinstance(items, str):
            texts.append(TextPart(("input",), "user", "input", items))
        elif isinstance(items, list):
            for i, item in enumerate(items):
                _item(expect_object(item, ("input", i)), ("input", i), texts)
        elif items is not None:
            raise invalid_type(("input",), "a string or an array of input items", items)
        _prompt_variables(body, texts)
        return LLMRequest(
            dialect=self.name,
            model=model,
            texts=tuple(texts),
            max_output_tokens=max_tokens,
            stream=stream,
            tools=tools,
            body=body,
        )


def _item(item: dict[str, Any], path: JsonPath, texts: list[TextPart]) -> None:
    itype = item.get("type")
    if itype is None or itype == "message":  # the "easy" message form has no type
        _message(item, path, texts)
        return
    if not isinstance(itype, str):
        raise invalid_type((*path, "type"), "a string", itype)
    optional = ITEM_TEXTS.get(itype)
    if optional is not None:
        for field, author, kind, json in optional:
            value = optional_str(item, field, path)
            if value is not None:
                texts.append(TextPart((*path, field), author, kind, value, json))
        return
    if itype == "shell_call_output":
        _shell_output(item, path, texts)
        return
    if itype in BUILT_IN_TEXTS:
        for at, text, author, kind in built_in_texts(item, path):
            texts.append(TextPart(at, author, kind, text))
        return
    tool_item = _TOOL_ITEMS.get(itype)
    if tool_item is None:
        return
    field, author, kind = tool_item
    value = item.get(field)
    if isinstance(value, list) and kind == "tool_result":  # outputs may be content parts
        _parts(value, (*path, field), author, kind, texts)
    else:
        text = expect_str(value, (*path, field))
        json = itype == "function_call"  # its arguments; a custom tool's input is free text
        texts.append(TextPart((*path, field), author, kind, text, json))


def _shell_output(item: dict[str, Any], path: JsonPath, texts: list[TextPart]) -> None:
    """The shell tool's output replayed: each command's captured stdout and stderr."""
    outputs = item.get("output")
    if outputs is None:
        return
    where = (*path, "output")
    for i, output in enumerate(expect_list(outputs, where)):
        output = expect_object(output, (*where, i))
        for field in ("stdout", "stderr"):
            value = optional_str(output, field, (*where, i))
            if value is not None:
                texts.append(TextPart((*where, i, field), "tool", "tool_result", value))


def _prompt_variables(body: dict[str, Any], texts: list[TextPart]) -> None:
    """A stored prompt's ``variables``: the caller's values, filled into the prompt upstream
    (strings, or ``input_text`` parts; images and files carry no text)."""
    prompt = body.get("prompt")
    if prompt is None:
        return
    variables = expect_object(prompt, ("prompt",)).get("variables")
    if variables is None:
        return
    where = ("prompt", "variables")
    for name, value in expect_object(variables, where).items():
        if isinstance(value, str):
            texts.append(TextPart((*where, name), "user", "input", value))
        elif isinstance(value, dict) and value.get("type") in _TEXT_PARTS:
            text = expect_str(value.get("text"), (*where, name, "text"))
            texts.append(TextPart((*where, name, "text"), "user", "input", text))


def _message(item: dict[str, Any], path: JsonPath, texts: list[TextPart]) -> None:
    role = message_role(item, path, _ROLES)
    content = item.get("content")
    if isinstance(content, str):
        texts.append(TextPart((*path, "content"), role, "input", content))
    elif isinstance(content, list):
        _parts(content, (*path, "content"), role, "input", texts)
    else:
        raise invalid_type((*path, "content"), _CONTENT, content)


def _parts(parts: list[Any], path: JsonPath, author: str, kind: str, texts: list[TextPart]) -> None:
    """Text parts become texts; image, file and audio parts are skipped."""
    for j, part in enumerate(parts):
        where = (*path, j)
        part = expect_object(part, where)
        ptype = part.get("type")
        if ptype in _TEXT_PARTS:
            text = expect_str(part.get("text"), (*where, "text"))
            texts.append(TextPart((*where, "text"), author, kind, text))
        elif ptype == "refusal":
            text = expect_str(part.get("refusal"), (*where, "refusal"))
            texts.append(TextPart((*where, "refusal"), author, kind, text))


def _tool_names(body: dict[str, Any]) -> tuple[str, ...]:
    """Function and custom tools by their name; built-in tools by their type."""
    tools = body.get("tools")
    if tools is None:
        return ()
    names: list[str] = []
    for i, tool in enumerate(expect_list(tools, ("tools",))):
        tool = expect_object(tool, ("tools", i))
        ttype = expect_str(tool.get("type"), ("tools", i, "type"))
        if ttype in ("function", "custom"):
            names.append(expect_str(tool.get("name"), ("tools", i, "name")))
        else:
            names.append(ttype)
    return tuple(names)


DIALECT = OpenAIResponses()
