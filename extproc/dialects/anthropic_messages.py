"""Anthropic Messages (``/v1/messages``), answered with Anthropic's error envelope.

The top-level ``system`` prompt is exposed as role ``system``, kind ``message``, the same
as a chat system message, so one policy covers both APIs. ``tool_use`` inputs arrive as
parsed JSON rather than a string, so each string leaf is its own text and can be
rewritten without re-serialising the arguments.
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
    names_text,
    optional_bool,
    optional_str,
    require_model,
    required_positive_int,
    string_leaves,
)

_ROLES = ("user", "assistant")
_TOOL_USES = ("tool_use", "server_tool_use", "mcp_tool_use")
_CONTENT = "a string or an array of content blocks"


class AnthropicMessages:
    """Messages API; image, document and thinking blocks carry no caller text and are skipped."""

    name: str = "anthropic.messages"
    envelope: DialectEnvelope = "anthropic"
    output_cap_field: str | None = "max_tokens"
    min_output_cap: int = 1
    asks_stream_usage = False

    def parse(self, body: dict[str, Any]) -> LLMRequest:
        model = require_model(body)
        max_tokens = required_positive_int(body, "max_tokens")
        stream = optional_bool(body, "stream")
        tools = _tool_names(body)
        texts: list[TextPart] = []
        system = body.get("system")
        if isinstance(system, str):
            texts.append(TextPart(("system",), "system", "message", system))
        elif isinstance(system, list):
            _text_blocks(system, ("system",), "system", "message", texts)
        elif system is not None:
            raise invalid_type(("system",), "a string or an array of text blocks", system)
        messages = expect_list(body.get("messages"), ("messages",), non_empty=True)
        for i, message in enumerate(messages):
            _message(expect_object(message, ("messages", i)), ("messages", i), texts)
        return LLMRequest(
            dialect=self.name,
            model=model,
            texts=tuple(texts),
            max_output_tokens=max_tokens,
            stream=stream,
            tools=tools,
            body=body,
            chat_messages=len(body["messages"]),
        )


def _message(message: dict[str, Any], path: JsonPath, texts: list[TextPart]) -> None:
    role = message_role(message, path, _ROLES)
    content = message.get("content")
    if isinstance(content, str):
        texts.append(TextPart((*path, "content"), role, "message", content))
        return
    if not isinstance(content, list):
        raise invalid_type((*path, "content"), _CONTENT, content)
    for j, block in enumerate(content):
        where = (*path, "content", j)
        block = expect_object(block, where)
        btype = block.get("type")
        if btype == "text":
            text = expect_str(block.get("text"), (*where, "text"))
            texts.append(TextPart((*where, "text"), role, "message", text))
        elif btype in _TOOL_USES:
            arguments = expect_object(block.get("input"), (*where, "input"))
            for leaf, text in string_leaves(arguments, (*where, "input")):
                texts.append(TextPart(leaf, "assistant", "tool_arguments", text))
            names = names_text(arguments, (*where, "input"), "assistant", "tool_arguments")
            if names is not None:
                texts.append(names)
        elif btype in ("tool_result", "mcp_tool_result"):
            _tool_result(block.get("content"), (*where, "content"), texts)
        elif btype in SERVER_TOOL_RESULTS:
            for leaf, text in server_tool_result_texts(block, where):
                texts.append(TextPart(leaf, "tool", "tool_result", text))
        else:
            _quoted(block, where, role, "message", texts)


SERVER_TOOL_RESULTS = (
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
)
"""Results of Anthropic's server tools that hold text the model reads: a fetched page, a
program's output, a file viewed. (Web search results are encrypted; tool search results
are references.) A tuple: a block's type may be any JSON value, unhashable ones too."""
_RESULT_TEXT_FIELDS = ("stdout", "stderr")


RESULT_BLOCKS = ("mcp_tool_result", *SERVER_TOOL_RESULTS)
"""Blocks of an answer that hold a tool's result, whole (streamed too: in their
``content_block_start``)."""


def result_block_texts(block: dict[str, Any], where: JsonPath) -> list[tuple[JsonPath, str]]:
    """The texts of an answer's result block (:data:`RESULT_BLOCKS`), leniently: an MCP
    tool's result (a string or text blocks), or a server tool's."""
    if block.get("type") != "mcp_tool_result":
        return server_tool_result_texts(block, where)
    content = block.get("content")
    if isinstance(content, str):
        return [((*where, "content"), content)]
    return _lenient_text_blocks(content, (*where, "content")) if isinstance(content, list) else []


def server_tool_result_texts(block: dict[str, Any], where: JsonPath) -> list[tuple[JsonPath, str]]:
    """The texts of a server tool's result block, in requests and answers alike: a fetched
    page's document, a program's ``stdout`` and ``stderr``, a viewed file's ``content``.
    Lenient (anything else is the API's to refuse), as an answer must be read."""
    content = block.get("content")
    if not isinstance(content, dict):
        return []
    inner = (*where, "content")
    ctype = content.get("type")
    found: list[tuple[JsonPath, str]] = []
    if ctype == "web_fetch_result":
        document = content.get("content")
        if isinstance(document, dict):
            found.extend(_document_texts(document, (*inner, "content")))
    elif ctype == "text_editor_code_execution_view_result":
        if isinstance(content.get("content"), str):
            found.append(((*inner, "content"), content["content"]))
    else:
        for field in _RESULT_TEXT_FIELDS:
            if isinstance(content.get(field), str):
                found.append(((*inner, field), content[field]))
    return found


def _document_texts(document: dict[str, Any], where: JsonPath) -> list[tuple[JsonPath, str]]:
    """A document block's readable texts, leniently (an answer's must be read whatever
    it holds): what :func:`_quoted` reads of a caller's document, its title, context and
    a plain-text or content source, without refusing what it cannot read."""
    found = [
        ((*where, field), document[field])
        for field in ("title", "context")
        if isinstance(document.get(field), str)
    ]
    source = document.get("source")
    if not isinstance(source, dict):
        return found
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        found.append(((*where, "source", "data"), source["data"]))
    elif source.get("type") == "content":
        inner = (*where, "source", "content")
        content = source.get("content")
        if isinstance(content, str):
            found.append((inner, content))
        elif isinstance(content, list):
            found.extend(_lenient_text_blocks(content, inner))
    return found


def _lenient_text_blocks(blocks: list[Any], where: JsonPath) -> list[tuple[JsonPath, str]]:
    """The texts of the text blocks among ``blocks``, anything else passed over."""
    return [
        ((*where, n, "text"), block["text"])
        for n, block in enumerate(blocks)
        if isinstance(block, dict)
        and block.get("type") == "text"
        and isinstance(block.get("text"), str)
    ]


def _quoted(
    block: dict[str, Any], where: JsonPath, author: str, kind: str, texts: list[TextPart]
) -> None:
    """Text a caller hands the model to read: a plain-text ``document`` (its text, title and
    context) or a ``search_result`` (title and text blocks). PDFs, images and files by
    reference carry no text the gateway can read."""
    btype = block.get("type")
    if btype == "document":
        for field in ("title", "context"):
            value = optional_str(block, field, where)
            if value is not None:
                texts.append(TextPart((*where, field), author, kind, value))
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "text":
            data = expect_str(source.get("data"), (*where, "source", "data"))
            texts.append(TextPart((*where, "source", "data"), author, kind, data))
        elif isinstance(source, dict) and source.get("type") == "content":
            inner = (*where, "source", "content")
            content = source.get("content")
            if isinstance(content, str):
                texts.append(TextPart(inner, author, kind, content))
            else:
                _text_blocks(expect_list(content, inner), inner, author, kind, texts, quoting=False)
    elif btype == "search_result":
        title = optional_str(block, "title", where)
        if title is not None:
            texts.append(TextPart((*where, "title"), author, kind, title))
        if block.get("content") is not None:
            inner = (*where, "content")
            _text_blocks(expect_list(block["content"], inner), inner, author, kind, texts, False)


def _tool_result(content: object, path: JsonPath, texts: list[TextPart]) -> None:
    """A tool result's content is optional: a string, or blocks of which only text counts."""
    if isinstance(content, str):
        texts.append(TextPart(path, "tool", "tool_result", content))
    elif isinstance(content, list):
        _text_blocks(content, path, "tool", "tool_result", texts)
    elif content is not None:
        raise invalid_type(path, _CONTENT, content)


def _text_blocks(
    blocks: list[Any],
    path: JsonPath,
    author: str,
    kind: str,
    texts: list[TextPart],
    quoting: bool = True,
) -> None:
    """Text blocks, and with ``quoting`` (a tool result's) the documents and search results
    among them. A document's or search result's own blocks are text alone, as the API
    allows, so nothing nests: a caller's 1,000 levels of search results would overflow
    the stack."""
    for j, block in enumerate(blocks):
        where = (*path, j)
        block = expect_object(block, where)
        if block.get("type") == "text":
            text = expect_str(block.get("text"), (*where, "text"))
            texts.append(TextPart((*where, "text"), author, kind, text))
        elif quoting:
            _quoted(block, where, author, kind, texts)


def _tool_names(body: dict[str, Any]) -> tuple[str, ...]:
    """Client and server tools alike carry a ``name`` (server tools' ``type`` is
    versioned); the MCP connector's toolset names its server instead."""
    tools = body.get("tools")
    if tools is None:
        return ()
    names: list[str] = []
    for i, tool in enumerate(expect_list(tools, ("tools",))):
        tool = expect_object(tool, ("tools", i))
        field = "mcp_server_name" if tool.get("type") == "mcp_toolset" else "name"
        names.append(expect_str(tool.get(field), ("tools", i, field)))
    return tuple(names)


DIALECT = AnthropicMessages()
