"""The texts of MCP traffic that guardrails read, each with its JSON path.

Input rules read what a caller sends a tool: every string leaf of a tools/call's
``arguments`` (and of a prompts/get's ``arguments``), however deeply nested, and their
member names (locked: :attr:`~extproc.dialects.base.TextPart.locked`). Output rules read
what comes back from a server and will be put in front of a model: tool results
(``content[].text``, embedded resources' ``text``, resource links' name, title and
description, string leaves of ``structuredContent``; a finished task's, in
``tasks/get``), resource contents (``contents[].text``), prompt messages
(``messages[].content.text``) and a prompt's ``description``, the server's
``instructions`` (initialize, server/discover: clients put them in their model's system
prompt), and what list results say of each item (:func:`listed_texts`: a tool's titles,
description and schemas, where a tool is poisoned). So do a server's error answers
(``error.message`` and ``error.data``, which agents hand their model as the call's
outcome) and what a server asks of the client on its own (:func:`message_texts`): a
``sampling/createMessage``'s messages and system prompt, which the client sends to its
model, an ``elicitation/create``'s message and field texts, which it shows its user, and
log and progress notifications. MCP 2026-07-28 embeds such requests in a result instead
(``result.inputRequests.{key}``, an ``input_required`` result): they are read the same
way, with paths under their key. That is where a prompt injection hides, so all of it is
exposed; binary content (images, audio, blobs) is not text and is skipped.

Paths start at the JSON-RPC message (``("params", "arguments", "query")``,
``("result", "content", 0, "text")``) and, for a batch body, at the element's index, so
:func:`apply_rewrites` on the decoded document puts a rewritten text back in place.

Input rules also read a client's answers to a server's own requests: the message its
model sampled, the fields its user filled in for an elicitation; sent as JSON-RPC answers,
or embedded in a retried 2026-07-28 request (``params.inputResponses.{key}``).

Roles follow the LLM dialects' convention (:class:`extproc.dialects.base.TextPart`):
arguments are ``assistant`` text of kind ``tool_arguments`` (a model wrote them), and so is
a sampled message, except prompts/get arguments and elicitation fields, ``user`` text of
kind ``input``; everything a server returns is
``tool`` text of kind ``tool_result``, so a rule scoped to the ``tool`` role covers every
MCP answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from extproc.dialects.base import JsonPath, TextPart
from extproc.dialects.fields import names_text
from extproc.mcp.jsonrpc import Body, Request, Response

_COMPLETION = "completion/complete"
_INPUT_REQUESTS = "inputRequests"
"""A 2026-07-28 ``input_required`` result's requests to the client, by key."""
_INPUT_RESPONSES = "inputResponses"
"""A retried 2026-07-28 request's answers to those, by the same keys."""
_ARGUMENT_ROLES: Mapping[str, tuple[str, str]] = {
    "tools/call": ("assistant", "tool_arguments"),
    "prompts/get": ("user", "input"),
}


def request_texts(body: Body) -> tuple[TextPart, ...]:
    """The argument strings of every tools/call and prompts/get in ``body``, and the texts
    of the client's answers to the server's own requests: sent alone (a JSON-RPC answer)
    or, since MCP 2026-07-28, embedded in the retried request
    (``params.inputResponses.{key}``, :func:`embedded_answer_texts`)."""
    texts: list[TextPart] = []
    for message in body.messages:
        if isinstance(message, Request):
            texts.extend(call_texts(message))
            texts.extend(_embedded_answer_texts(message))
        elif isinstance(message, Response):
            texts.extend(_client_answer_texts(body, message))
    return tuple(texts)


def _client_answer_texts(body: Body, answer: Response) -> Iterator[TextPart]:
    """A client's answer sent as a JSON-RPC answer (:func:`_answer_texts`)."""
    document = body.raw if answer.index is None else body.raw[answer.index]
    result = document.get("result") if isinstance(document, dict) else None
    yield from _answer_texts(result, (*_at(answer.index), "result"))


def _embedded_answer_texts(request: Request) -> tuple[TextPart, ...]:
    """The client's answers a 2026-07-28 request carries back to the server that asked
    for them in an ``input_required`` result (``params.inputResponses``, keyed as the
    server's ``inputRequests``). They take the place of JSON-RPC answers, so they are read
    as those are (:func:`_answer_texts`), whatever the request's method (tools/call,
    prompts/get, resources/read, the tasks extension's tasks/update)."""
    answers = request.params.get(_INPUT_RESPONSES)
    if not isinstance(answers, dict):
        return ()
    at: JsonPath = (*_at(request.index), "params", _INPUT_RESPONSES)
    return tuple(
        part for key, result in answers.items() for part in _answer_texts(result, (*at, key))
    )


def _answer_texts(result: Any, where: JsonPath) -> Iterator[TextPart]:
    """What a client answers a server's request with, by the result's shape (``where`` is
    its path): its model's sampled message (``assistant`` text, as a model writes tool
    arguments), or the fields its user filled in for an elicitation (``user`` input)."""
    if not isinstance(result, dict):
        return
    content = result.get("content")
    where = (*where, "content")
    if "action" in result and isinstance(content, dict):  # elicitation: the form's fields
        for path, text in _strings(content, where):
            yield TextPart(path, "user", "input", text)
        return
    for path, text in _content_texts(content, where):
        yield TextPart(path, "assistant", "tool_arguments", text)


def call_texts(request: Request) -> tuple[TextPart, ...]:
    """The argument strings of one request (none for methods without arguments)."""
    if request.method == _COMPLETION:
        return _completion_texts(request)
    roles = _ARGUMENT_ROLES.get(request.method)
    arguments = request.params.get("arguments")
    if roles is None or not isinstance(arguments, dict):
        return ()
    role, kind = roles
    prefix: JsonPath = (*_at(request.index), "params", "arguments")
    values = tuple(TextPart(path, role, kind, text) for path, text in _strings(arguments, prefix))
    names = names_text(arguments, prefix, role, kind)  # read too, locked (dialects.fields)
    return values if names is None else (*values, names)


def _completion_texts(request: Request) -> tuple[TextPart, ...]:
    """What a user is typing into a prompt's or resource's argument, sent for the server
    to complete, and the arguments already filled in: ``user`` input."""
    at = (*_at(request.index), "params")
    found: list[tuple[JsonPath, str]] = []
    argument = request.params.get("argument")
    if isinstance(argument, dict) and isinstance(argument.get("value"), str):
        found.append(((*at, "argument", "value"), argument["value"]))
    context = request.params.get("context")
    filled = context.get("arguments") if isinstance(context, dict) else None
    if isinstance(filled, dict):
        found.extend(_strings(filled, (*at, "context", "arguments")))
    return tuple(TextPart(path, "user", "input", text) for path, text in found if text)


def result_texts(message: Mapping[str, Any], prefix: JsonPath = ()) -> tuple[TextPart, ...]:
    """The texts of one answer from a server, by the result's shape.

    Shape rather than method, so an answer whose request is unknown (a resumed stream,
    ``tasks/result``) is still read. ``prefix`` locates ``message`` in a batch answer.
    """
    result = message.get("result")
    if not isinstance(result, dict):
        return ()
    base: JsonPath = (*prefix, "result")
    found = _result_fields(result, base)
    task_result = result.get("result")  # a finished task's (tasks/get): the tool's result
    if isinstance(task_result, dict):
        found.extend(_result_fields(task_result, (*base, "result")))
    return (*_from_server(found), *_embedded_request_texts(result, base))


def _result_fields(result: Mapping[str, Any], base: JsonPath) -> list[tuple[JsonPath, str]]:
    """The texts of a result's fields (:func:`result_texts`)."""
    # What a client puts in front of its model as it is: the server's instructions
    # (initialize, server/discover: into its system prompt), a prompt's description.
    found: list[tuple[JsonPath, str]] = [
        ((*base, field), result[field])
        for field in ("instructions", "description")
        if isinstance(result.get(field), str)
    ]
    content = result.get("content")
    if isinstance(content, list):
        for i, block in enumerate(content):
            found.extend(_block_texts(block, (*base, "content", i)))
    structured = result.get("structuredContent")
    if isinstance(structured, dict | list):
        found.extend(_strings(structured, (*base, "structuredContent")))
    contents = result.get("contents")
    if isinstance(contents, list):
        for i, item in enumerate(contents):
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                found.append(((*base, "contents", i, "text"), item["text"]))
    messages = result.get("messages")
    if isinstance(messages, list):
        for i, prompt_message in enumerate(messages):
            if isinstance(prompt_message, dict):
                where = (*base, "messages", i, "content")
                found.extend(_block_texts(prompt_message.get("content"), where))
    return found


def _embedded_request_texts(result: Mapping[str, Any], base: JsonPath) -> tuple[TextPart, ...]:
    """The requests a 2026-07-28 ``input_required`` result embeds for the client to
    fulfil (``inputRequests.{key}``: ``method`` and ``params``). They take the place of a
    server's own JSON-RPC requests, so they are read as those are (:func:`_server_texts`),
    in any result (the tasks extension carries them too)."""
    requests = result.get(_INPUT_REQUESTS)
    if not isinstance(requests, dict):
        return ()
    return tuple(
        part
        for key, request in requests.items()
        if isinstance(request, dict)
        for part in _server_texts(request, (*base, _INPUT_REQUESTS, key))
    )


def split_embedded(
    texts: tuple[TextPart, ...],
) -> tuple[tuple[TextPart, ...], list[tuple[TextPart, ...]]]:
    """A server message's texts (:func:`message_texts`) split into its own and those of
    each request embedded in its result (one group per key, in order): an embedded request
    a rule blocks goes on with its texts withheld, as one sent on its own does, while the
    answer's own texts blocked replace the answer with an error."""
    own: list[TextPart] = []
    groups: dict[Any, list[TextPart]] = {}
    for part in texts:
        if part.path[:2] == ("result", _INPUT_REQUESTS) and len(part.path) > 2:
            groups.setdefault(part.path[2], []).append(part)
        else:
            own.append(part)
    return tuple(own), [tuple(group) for group in groups.values()]


def message_texts(message: Mapping[str, Any]) -> tuple[TextPart, ...]:
    """The texts of one message from a server, whatever it is: a result
    (:func:`result_texts`), an error answer, or a request or notification of its own.

    A message with a ``result`` or ``error`` is read as an answer whatever other members
    it has: clients take it for one even with a ``method`` beside them."""
    if is_answer(message):
        error = message.get("error")
        found: list[tuple[JsonPath, str]] = []
        if isinstance(error, dict):
            if isinstance(error.get("message"), str):
                found.append((("error", "message"), error["message"]))
            if "data" in error:
                found.extend(_strings(error["data"], ("error", "data")))
        return (*result_texts(message), *_from_server(found))
    return _server_texts(message)


def is_answer(message: Mapping[str, Any]) -> bool:
    """Whether a client reads ``message`` as an answer (a result or an error)."""
    return "result" in message or "error" in message


def _server_texts(message: Mapping[str, Any], at: JsonPath = ()) -> tuple[TextPart, ...]:
    """What a server's own request or notification puts in front of the client's model,
    its user or its logs; ``at`` locates ``message`` (one embedded in a result)."""
    params = message.get("params")
    if not isinstance(params, dict):
        return ()
    method = message.get("method")
    where: JsonPath = (*at, "params")
    found: list[tuple[JsonPath, str]] = []
    locked: list[TextPart] = []
    if method == "sampling/createMessage":
        if isinstance(params.get("systemPrompt"), str):
            found.append(((*where, "systemPrompt"), params["systemPrompt"]))
        messages = params.get("messages")
        for i, sampled in enumerate(messages if isinstance(messages, list) else ()):
            content = sampled.get("content") if isinstance(sampled, dict) else None
            found.extend(_content_texts(content, (*where, "messages", i, "content")))
        tools = params.get("tools")  # offered to the client's model: poisoned like a list's
        for i, tool in enumerate(tools if isinstance(tools, list) else ()):
            for part in listed_texts(tool):
                path = (*where, "tools", i, *part.path)
                if part.locked:
                    locked.append(dataclasses.replace(part, path=path))
                else:
                    found.append((path, part.text))
    elif method == "elicitation/create":
        for field in ("message", "url"):  # url mode: a link shown to the user
            if isinstance(params.get(field), str):
                found.append(((*where, field), params[field]))
        schema = params.get("requestedSchema")
        if isinstance(schema, dict):  # titles, descriptions, choices, defaults
            found.extend(
                (path, text)
                for path, text in _strings(schema, (*where, "requestedSchema"))
                if not _schema_word(path)
            )
    elif method == "notifications/message":
        if isinstance(params.get("logger"), str):
            found.append(((*where, "logger"), params["logger"]))
        if "data" in params:
            found.extend(_strings(params["data"], (*where, "data")))
    elif method == "notifications/progress" and isinstance(params.get("message"), str):
        found.append(((*where, "message"), params["message"]))
    return (*_from_server(found), *locked)


_SCHEMAS = ("inputSchema", "outputSchema", "requestedSchema")
"""Where a listed tool or an elicitation carries a JSON Schema (MCP: an object's)."""
_SCHEMA_WORDS = frozenset({"type", "format", "$schema", "pattern", "$ref", "$id"})
"""Schema members whose strings are JSON Schema's own words, not text for a person."""
_SCHEMA_DATA = frozenset({"default", "examples", "example", "const", "enum"})
"""Schema members whose values are data (shown to the model), whatever keys they hold."""


def _schema_word(path: JsonPath) -> bool:
    """Whether the string at ``path`` in a schema is JSON Schema's own word: a keyword's
    value (``type: string``) or a name in a ``required`` list, outside any data value (a
    ``default`` holding ``{"type": ...}``)."""
    if any(step in _SCHEMA_DATA for step in path):
        return False
    if path[-1] in _SCHEMA_WORDS:
        return path[-2:-1] != ("properties",)
    return isinstance(path[-1], int) and path[-2:-1] == ("required",)


def _content_texts(content: Any, where: JsonPath) -> Iterator[tuple[JsonPath, str]]:
    """A sampling message's content: one block or, since MCP 2025-11-25, a list of them."""
    if isinstance(content, list):
        for j, block in enumerate(content):
            yield from _block_texts(block, (*where, j))
    else:
        yield from _block_texts(content, where)


def _from_server(found: list[tuple[JsonPath, str]]) -> tuple[TextPart, ...]:
    """What a server sent, as ``tool`` text of kind ``tool_result`` (module docstring)."""
    return tuple(TextPart(path, "tool", "tool_result", text) for path, text in found)


def listed_texts(item: Any) -> tuple[TextPart, ...]:
    """The texts of one listed tool, resource or prompt (an item of a list result), which a
    client puts in front of its model: its ``title`` and ``description``, its annotations'
    title, a prompt's arguments' titles and descriptions, and its schemas (a tool's
    parameters) whole, as an elicitation's is read: every string but JSON Schema's own
    words (titles, descriptions, defaults, enums, examples), and the member names, which
    the model reads too (locked: a rule that would rewrite one drops the item). Paths
    are from the item."""
    if not isinstance(item, dict):
        return ()
    found: list[tuple[JsonPath, str]] = [
        ((field,), item[field])
        for field in ("title", "description")
        if isinstance(item.get(field), str)
    ]
    annotations = item.get("annotations")
    if isinstance(annotations, dict) and isinstance(annotations.get("title"), str):
        found.append((("annotations", "title"), annotations["title"]))
    arguments = item.get("arguments")
    for i, argument in enumerate(arguments if isinstance(arguments, list) else ()):
        for field in ("title", "description"):
            if isinstance(argument, dict) and isinstance(argument.get(field), str):
                found.append((("arguments", i, field), argument[field]))
    names: list[TextPart] = []
    for schema in ("inputSchema", "outputSchema"):
        value = item.get(schema)
        if isinstance(value, dict):
            found.extend(
                (path, text) for path, text in _strings(value, (schema,)) if not _schema_word(path)
            )
            listed_names = names_text(value, (schema,), "tool", "tool_result")
            if listed_names is not None:
                names.append(listed_names)
    return (*_from_server(found), *names)


def _block_texts(block: Any, path: JsonPath) -> Iterator[tuple[JsonPath, str]]:
    """A content block's text: ``text`` blocks, ``resource`` blocks' embedded text,
    ``resource_link`` blocks' name, title and description (shown to the model as a listed
    resource's are), and in sampling (MCP 2025-11-25) a ``tool_use`` block's input and a
    ``tool_result`` block's content blocks."""
    if not isinstance(block, dict):
        return
    kind = block.get("type")
    if kind == "resource_link":
        for field in ("name", "title", "description"):
            if isinstance(block.get(field), str):
                yield (*path, field), block[field]
    if kind == "tool_use" and isinstance(block.get("input"), dict | list):
        yield from _strings(block["input"], (*path, "input"))
    if kind == "tool_result" and isinstance(block.get("content"), list):
        for i, inner in enumerate(block["content"]):
            if not (isinstance(inner, dict) and inner.get("type") == "tool_result"):
                yield from _block_texts(inner, (*path, "content", i))
    if kind == "text" and isinstance(block.get("text"), str):
        yield (*path, "text"), block["text"]
    resource = block.get("resource")
    if (
        block.get("type") == "resource"
        and isinstance(resource, dict)
        and isinstance(resource.get("text"), str)
    ):
        yield (*path, "resource", "text"), resource["text"]


def _strings(value: Any, prefix: JsonPath) -> Iterator[tuple[JsonPath, str]]:
    """Every string leaf under ``value``, depth first, in document order.

    Iterative: arguments are caller-controlled and may nest deeper than Python's stack.
    """
    stack: list[tuple[JsonPath, Any]] = [(prefix, value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            yield path, node
        elif isinstance(node, dict):
            stack.extend(((*path, k), v) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(node))))


def _at(index: int | None) -> JsonPath:
    return () if index is None else (index,)


def withheld(texts: tuple[TextPart, ...], why: str) -> dict[JsonPath, Any]:
    """Rewrites that replace each of ``texts`` with ``[why]``: how a message that must go
    on (a server's request, a client's answer to one: its peer waits for it) is blocked.
    A locked text (member names) has no place of its own: the object it names is emptied
    (a schema to ``{"type": "object"}``, which says nothing and is still the object MCP
    requires; anything else to ``{}``), the texts inside it with it."""
    emptied = [part.path for part in texts if part.locked]
    rewrites: dict[JsonPath, Any] = {
        path: {"type": "object"} if path[-1] in _SCHEMAS else {} for path in emptied
    }
    for part in texts:
        if not part.locked and not any(part.path[: len(at)] == at for at in emptied):
            rewrites[part.path] = f"[{why}]"
    return rewrites


def apply_rewrites(document: Any, rewrites: Mapping[JsonPath, Any]) -> None:
    """Put rewritten texts back at their paths in ``document`` (in place).

    ``document`` is a decoded body (:attr:`Body.raw`) or answer message, owned by one
    exchange; serialise it afterwards with :func:`extproc.mcp.jsonrpc.encode`.
    """
    for path, text in rewrites.items():
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = text


def rewritten(document: Any, rewrites: Mapping[JsonPath, Any]) -> Any:
    """A copy of ``document`` with rewritten texts at their paths, ``document`` unchanged.

    Only the objects and arrays on the rewrites' paths are copied; the rest is shared (and
    never changed). A deep copy would recurse through whatever a server nests, and a
    server's answer may nest as deep as its JSON decodes (1,024 levels): the stack would
    overflow before the encoder could refuse the answer as too deep to write back.
    """
    copy = _shallow(document)
    copied = {id(copy)}
    for path, text in rewrites.items():
        parent = copy
        for step in path[:-1]:
            child = parent[step]
            if id(child) not in copied:
                child = parent[step] = _shallow(child)
                copied.add(id(child))
            parent = child
        parent[path[-1]] = text
    return copy


def _shallow(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return value
