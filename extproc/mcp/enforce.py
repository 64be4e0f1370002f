"""Policy decisions on MCP traffic: what may reach a server, and what a caller may see.

:func:`decide` judges a parsed POST body for one caller and returns either
:class:`Forward` (send it on unchanged) or :class:`Answer` (the gateway replies itself
with JSON-RPC errors, keeping each request's ``id``; nothing reaches the server).

Batches are all or nothing: if any element is refused, the whole batch is answered by the
gateway — refused elements with their own error, the others with -32013 "batch
rejected" so the client knows they did not run and may resend them alone. Forwarding the
allowed part instead would mean splicing the gateway's errors into the server's answer
(JSON or an SSE stream) and keeping the two in order; batches are rare (MCP dropped them
after 2025-03-26), so the simplest correct rule wins.

What is judged, per method:

- ``tools/call`` (tool ``name``), ``prompts/get`` (prompt ``name``), ``resources/read``,
  ``resources/subscribe``, ``resources/unsubscribe`` (resource ``uri``) and
  ``completion/complete`` (the prompt or resource its ``ref`` names): the name must be
  permitted, or the call is refused with -32010;
- ``subscriptions/listen`` (MCP 2026-07-28, which replaced ``resources/subscribe`` with
  it): each URI of its ``notifications.resourceSubscriptions`` is judged as
  ``resources/subscribe`` judges its ``uri``; one refused refuses the call;
- the list methods and MCP's housekeeping (``initialize``, ``ping``, ``server/discover``,
  ``logging/setLevel``, ``tasks/*``, ``notifications/*``) pass;
  their answers are filtered by :func:`filter_list_response`;
- any other method is refused with -32601 unless the server's policy forwards unknown
  methods;
- a call-style method sent without an ``id`` is refused as an invalid request: a server
  could otherwise run it as a notification no one sees answered;
- a caller the policy keeps off the server entirely is refused everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from extproc.mcp.access import CompiledServer, Kind, McpPermissions, unclear_uri
from extproc.mcp.jsonrpc import (
    Body,
    ErrorCode,
    Invalid,
    Message,
    Notification,
    Request,
    RequestId,
    Response,
    encode,
    error_response,
    http_status,
)

NAMED_CALLS: Mapping[str, tuple[Kind, str]] = {
    "tools/call": (Kind.TOOL, "name"),
    "prompts/get": (Kind.PROMPT, "name"),
    "resources/read": (Kind.RESOURCE, "uri"),
    "resources/subscribe": (Kind.RESOURCE, "uri"),
    "resources/unsubscribe": (Kind.RESOURCE, "uri"),
}
"""Methods that act on one named tool, prompt or resource, and the param naming it."""

LISTS: Mapping[str, tuple[str, str, Kind]] = {
    "tools/list": ("tools", "name", Kind.TOOL),
    "resources/list": ("resources", "uri", Kind.RESOURCE),
    "resources/templates/list": ("resourceTemplates", "uriTemplate", Kind.RESOURCE),
    "prompts/list": ("prompts", "name", Kind.PROMPT),
}
"""List methods: the result's array, each item's identifying field, and its kind."""

_PASSING = frozenset(
    {
        "initialize",
        "ping",
        "server/discover",
        "logging/setLevel",
        "tasks/get",
        "tasks/result",
        "tasks/list",
        "tasks/cancel",
        "tasks/update",  # the client's inputResponses to a waiting task, guarded as answers
        *LISTS,
    }
)
"""Requests that name nothing the policy governs; they pass as they are."""

_COMPLETION = "completion/complete"
_LISTEN = "subscriptions/listen"
_SHOWN_NAME = 256


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    """The caller's policy forbids the tool, resource, prompt or server."""
    INVALID = "invalid"
    """Malformed JSON-RPC or missing parameters."""
    UNKNOWN_METHOD = "unknown_method"
    BATCH_REJECTED = "batch_rejected"
    """Allowed on its own, but sent in a batch with a refused element."""
    RATE_LIMITED = "rate_limited"
    """Refused by a per-tool budget (:func:`refuse` with ``ErrorCode.RATE_LIMITED``)."""
    GUARDRAIL_BLOCKED = "guardrail_blocked"
    """Refused by an input guardrail (:func:`refuse` with ``ErrorCode.GUARDRAIL_BLOCKED``)."""


@dataclass(frozen=True, slots=True)
class McpCall:
    """One message's decision: what audit records, and what per-tool budgets count."""

    server: str
    method: str | None
    """``None`` for a client's response to a server request, or an unreadable element."""
    kind: Kind | None
    name: str | None
    """The tool or prompt name, or the resource URI, when the method names one."""
    id: RequestId | None
    verdict: Verdict

    @property
    def tool(self) -> tuple[str, str] | None:
        """``(server, tool)`` for an allowed tools/call: the pair a per-tool limit counts."""
        if self.method == "tools/call" and self.verdict is Verdict.ALLOW and self.name:
            return (self.server, self.name)
        return None


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the body on unchanged."""

    calls: tuple[McpCall, ...]
    methods: Mapping[RequestId, str]
    """Request id → method, to read the server's answer (:mod:`extproc.mcp.stream`)."""

    @property
    def tools(self) -> tuple[tuple[str, str], ...]:
        """``(server, tool)`` of every tools/call about to run."""
        return tuple(pair for call in self.calls if (pair := call.tool) is not None)


@dataclass(frozen=True, slots=True)
class Answer:
    """Reply from the gateway: ``body`` is ``application/json`` with ``status``."""

    status: int
    body: bytes
    calls: tuple[McpCall, ...]


_VERDICT_OF = {
    ErrorCode.RATE_LIMITED: Verdict.RATE_LIMITED,
    ErrorCode.GUARDRAIL_BLOCKED: Verdict.GUARDRAIL_BLOCKED,
    ErrorCode.INVALID_REQUEST: Verdict.INVALID,
    ErrorCode.INVALID_PARAMS: Verdict.INVALID,
}

_NO_ID_STATUS = {ErrorCode.METHOD_NOT_FOUND: 404}
"""Status of a refusal that has no request to answer (403 unless listed here)."""


@dataclass(frozen=True, slots=True)
class _Refusal:
    code: ErrorCode
    message: str
    data: dict[str, Any] | None = None


def decide(server: CompiledServer, access: McpPermissions, body: Body) -> Forward | Answer:
    """Judge ``body`` (a POST to ``server``'s endpoint) for a caller with ``access``."""
    calls: list[McpCall] = []
    refusals: dict[int, _Refusal] = {}
    may_use = access.may_use_server(server.name)
    for position, message in enumerate(body.messages):
        call, refusal = _judge(server, access, message)
        if refusal is None and not may_use:
            refusal = _server_refusal(server)
            call = replace(call, verdict=Verdict.DENY)
        calls.append(call)
        if refusal is not None:
            refusals[position] = refusal
    if not refusals:
        return Forward(tuple(calls), {r.id: r.method for r in body.requests})
    return _answer(body, calls, refusals)


def refuse(
    server: CompiledServer,
    body: Body,
    code: ErrorCode,
    message: str,
    data: Mapping[str, Any] | None = None,
) -> Answer:
    """Answer every request in ``body`` with the same error, e.g. when a per-tool budget
    (``ErrorCode.RATE_LIMITED``) or an input guardrail (``ErrorCode.GUARDRAIL_BLOCKED``)
    refuses a body that :func:`decide` let through. ``message`` is shown to the caller;
    ``data`` (e.g. ``{"retryAfter": 12}``) goes in ``error.data`` with the server name.
    A batch is refused whole, as :func:`decide` does."""
    verdict = _VERDICT_OF.get(code, Verdict.DENY)
    calls = [replace(_describe(server, m), verdict=verdict) for m in body.messages]
    refusal = _Refusal(code, message, {**(data or {}), "server": server.name})
    return _answer(body, calls, dict.fromkeys(range(len(body.messages)), refusal))


def _answer(body: Body, calls: list[McpCall], refusals: dict[int, _Refusal]) -> Answer:
    errors: list[dict[str, Any]] = []
    codes: list[ErrorCode] = []
    first = refusals[min(refusals)]
    for position, message in enumerate(body.messages):
        refusal = refusals.get(position)
        if refusal is None:
            if not isinstance(message, Request):
                continue
            calls[position] = replace(calls[position], verdict=Verdict.BATCH_REJECTED)
            # The first refusal's reason too: a refused notification gets no answer of
            # its own, and the client would see only that something else was refused.
            refusal = _Refusal(
                ErrorCode.BATCH_REJECTED,
                "Not run: another message in the same batch was refused by the gateway "
                f"({first.message}); send this one on its own.",
                {"method": message.method},
            )
        codes.append(refusal.code)
        if isinstance(message, Request | Invalid):
            errors.append(error_response(message.id, refusal.code, refusal.message, refusal.data))
    if not errors:
        # Only notifications or responses were refused: JSON-RPC answers them with nothing,
        # so the HTTP status carries the refusal and the body explains it without an id.
        status = _NO_ID_STATUS.get(first.code, 403) if http_status(codes) != 400 else 400
        answer = error_response(None, first.code, first.message, first.data)
        return Answer(status, encode(answer), tuple(calls))
    document: Any = errors if body.batch else errors[0]
    return Answer(http_status(codes), encode(document), tuple(calls))


def _judge(
    server: CompiledServer, access: McpPermissions, message: Message
) -> tuple[McpCall, _Refusal | None]:
    call = _describe(server, message)
    if isinstance(message, Invalid):
        return replace(call, verdict=Verdict.INVALID), _Refusal(
            ErrorCode.INVALID_REQUEST, message.reason
        )
    if isinstance(message, Response):
        return call, None
    method = message.method
    if isinstance(message, Notification):
        if method in NAMED_CALLS or method in _PASSING or method in (_COMPLETION, _LISTEN):
            return replace(call, verdict=Verdict.INVALID), _Refusal(
                ErrorCode.INVALID_REQUEST,
                f"Invalid request: {method} must be sent as a request with an id",
                {"method": method},
            )
        if method.startswith("notifications/"):
            return call, None
        return _unknown(server, call)
    if method in NAMED_CALLS or method == _COMPLETION:
        if call.kind is None or call.name is None:
            return replace(call, verdict=Verdict.INVALID), _Refusal(
                ErrorCode.INVALID_PARAMS, _missing_name(method), {"method": method}
            )
        return _judge_name(server, access, call, call.kind, call.name)
    if method == _LISTEN:
        return _judge_listen(server, access, call, message.params)
    if method in _PASSING:
        return call, None
    return _unknown(server, call)


def _judge_name(
    server: CompiledServer, access: McpPermissions, call: McpCall, kind: Kind, name: str
) -> tuple[McpCall, _Refusal | None]:
    """The verdict on ``call`` acting on the ``kind`` named ``name``."""
    method = call.method
    if kind is Kind.RESOURCE and unclear_uri(name):
        return replace(call, verdict=Verdict.INVALID), _Refusal(
            ErrorCode.INVALID_PARAMS,
            f"Invalid params: {method} of a URI with dot segments or encoded separators",
            {"method": method, "name": _shown(name)},
        )
    if access.permits(kind, name):
        return call, None
    shown = _shown(name)
    return replace(call, verdict=Verdict.DENY), _Refusal(
        ErrorCode.FORBIDDEN,
        f"{method} of {kind.value} {shown!r} is forbidden by gateway policy",
        {"method": method, "kind": kind.value, "name": shown, "server": server.name},
    )


def _judge_listen(
    server: CompiledServer, access: McpPermissions, call: McpCall, params: Mapping[str, Any]
) -> tuple[McpCall, _Refusal | None]:
    """``subscriptions/listen``: every resource URI it subscribes to, judged as
    ``resources/subscribe`` judges its one (it replaced that method in MCP 2026-07-28);
    the first refused names the call in audit. Unjudged, a caller would learn that a
    forbidden resource exists and when it changes."""
    uris = _subscribed_uris(params)
    if uris is None:
        return replace(call, verdict=Verdict.INVALID), _Refusal(
            ErrorCode.INVALID_PARAMS,
            f"Invalid params: {_LISTEN} needs params.notifications to be an object and its "
            "resourceSubscriptions a list of URIs (non-empty strings)",
            {"method": _LISTEN},
        )
    for uri in uris:
        judged, refusal = _judge_name(
            server, access, replace(call, kind=Kind.RESOURCE, name=uri), Kind.RESOURCE, uri
        )
        if refusal is not None:
            return judged, refusal
    return call, None


def _subscribed_uris(params: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The resource URIs a ``subscriptions/listen`` subscribes to; ``None`` when they
    cannot be read (what a server might still read as URIs is refused, not guessed)."""
    notifications = params.get("notifications")
    if notifications is None:
        return ()
    if not isinstance(notifications, dict):
        return None
    uris = notifications.get("resourceSubscriptions")
    if uris is None:
        return ()
    if not isinstance(uris, list) or not all(isinstance(uri, str) and uri for uri in uris):
        return None
    return tuple(uris)


def _describe(server: CompiledServer, message: Message) -> McpCall:
    """The audit view of ``message`` before any verdict (``ALLOW`` until judged)."""
    if isinstance(message, Invalid | Response):
        return McpCall(server.name, None, None, None, message.id, Verdict.ALLOW)
    kind, name = _target(message.method, message.params)
    id_ = message.id if isinstance(message, Request) else None
    return McpCall(server.name, message.method, kind, name, id_, Verdict.ALLOW)


def _target(method: str, params: Mapping[str, Any]) -> tuple[Kind | None, str | None]:
    """The kind and name a method acts on, ``(kind, None)`` when the name is missing."""
    if method in NAMED_CALLS:
        kind, field = NAMED_CALLS[method]
        value = params.get(field)
        return kind, value if isinstance(value, str) and value else None
    if method == _COMPLETION:
        ref = params.get("ref")
        if isinstance(ref, dict):
            if ref.get("type") == "ref/prompt":
                value = ref.get("name")
                return Kind.PROMPT, value if isinstance(value, str) and value else None
            if ref.get("type") == "ref/resource":
                value = ref.get("uri")
                return Kind.RESOURCE, value if isinstance(value, str) and value else None
        return None, None
    return None, None


def _shown(name: str) -> str:
    """A caller-sent name as echoed in an error: bounded, since a URI can be any length."""
    return name if len(name) <= _SHOWN_NAME else name[: _SHOWN_NAME - 1] + "…"


def _missing_name(method: str) -> str:
    if method == _COMPLETION:
        return "Invalid params: completion/complete needs a ref to a prompt or resource"
    field = NAMED_CALLS[method][1]
    return f"Invalid params: {method} needs params.{field} (a non-empty string)"


def _unknown(server: CompiledServer, call: McpCall) -> tuple[McpCall, _Refusal | None]:
    if server.unknown_methods == "forward":
        return call, None
    return replace(call, verdict=Verdict.UNKNOWN_METHOD), _Refusal(
        ErrorCode.METHOD_NOT_FOUND,
        f"Method not found: the gateway does not forward {call.method!r} to MCP servers",
        {"method": call.method},
    )


def _server_refusal(server: CompiledServer) -> _Refusal:
    return _Refusal(
        ErrorCode.FORBIDDEN,
        f"MCP server {server.name!r} is forbidden by gateway policy for this caller",
        {"server": server.name},
    )


def filter_list_response(body: dict[str, Any], access: McpPermissions) -> dict[str, Any]:
    """Hide from an answer's lists what the caller may not use.

    ``body`` is one JSON-RPC response. Every list its result holds is narrowed, whatever
    the request's method (a ``tools`` array is only ever a tools/list result): an answer
    replayed on a resumed stream has no request here, and a server that answers the wrong
    id, or turns ids into strings (``1`` and ``"1"`` in one batch), must not carry a list
    past the narrowing as a ping's answer. Returns ``body`` itself when nothing is hidden,
    so callers can keep the original bytes, else a copy. A filtered answer that carries a
    ``cacheScope`` is marked ``private``: it is this caller's view and must not be shared
    from a client-side cache.
    """
    result = body.get("result")
    if not isinstance(result, dict):
        return body
    filtered: dict[str, Any] | None = None
    for key, field, kind in LISTS.values():
        items = result.get(key)
        if not isinstance(items, list):
            continue
        kept = [item for item in items if _visible(item, field, kind, access)]
        if len(kept) < len(items):
            filtered = {**(filtered or result), key: kept}
    if filtered is None:
        return body
    if "cacheScope" in filtered:
        filtered["cacheScope"] = "private"
    return {**body, "result": filtered}


def _visible(item: Any, field: str, kind: Kind, access: McpPermissions) -> bool:
    """An item without a readable name cannot be judged, so it is hidden (fail closed)."""
    if not isinstance(item, dict):
        return False
    name = item.get(field)
    return isinstance(name, str) and access.permits(kind, name)
