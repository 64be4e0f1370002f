"""Agent and tool governance: MCP traffic through the same exchange as model calls.

A request to a path the policy's ``mcp.servers`` names is an MCP exchange. The caller is
identified as for model calls; each JSON-RPC call is judged against the caller's MCP
access (tools, resources, prompts by glob) and refused by the gateway with a JSON-RPC
error when not allowed, so it never reaches the server. Input guardrails read tool-call
arguments; the server's answers (JSON or SSE) have their list results narrowed to what
the caller may use, and output guardrails read tool results (indirect prompt injection).
The pure parts live in :mod:`extproc.mcp`; this module wires them into the exchange.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from extproc import routing
from extproc.budgets.meter import Meter
from extproc.decisions import CONTINUE, Decision, Forward, Headers, Reply
from extproc.dialects.base import JsonPath, TextPart
from extproc.dialects.json_body import encode_body
from extproc.errors import BadGateway, InvalidRequest, RateLimited, ServiceUnavailable
from extproc.exchange import Exchange
from extproc.guardrails.engine import GuardResult, describe
from extproc.identity import Principal
from extproc.mcp import sessions
from extproc.mcp.access import CompiledServer
from extproc.mcp.enforce import LISTS, Answer, decide, refuse
from extproc.mcp.jsonrpc import ErrorCode, JsonRpcError, encode, error_response, parse_body
from extproc.mcp.params import Unfaithful, agreeing, argument_changes, carried
from extproc.mcp.stream import (
    McpStreamError,
    Rewriter,
    SseRewriter,
    answer_kind,
    chain,
    foreign_charset,
    list_filter,
    rewrite_json,
)
from extproc.mcp.texts import (
    apply_rewrites,
    is_answer,
    listed_texts,
    message_texts,
    request_texts,
    rewritten,
    split_embedded,
    withheld,
)

_JSON = (("content-type", "application/json"),)
_UNREADABLE = "could not be checked by the gateway"
_LISTED = tuple(key for key, _, _ in LISTS.values())
"""The arrays of a list result (``tools``, ``resources``, ...)."""
_HTTP_METHODS = frozenset({"POST", "GET", "DELETE"})
"""Streamable HTTP's methods: POST calls, GET the server's stream, DELETE a session's end."""


def on_headers(
    exchange: Exchange,
    server: CompiledServer,
    principal: Principal,
    headers: Mapping[str, str],
    end_of_stream: bool,
) -> Decision:
    """Route the request to the server's cluster; refuse callers who may not use it."""
    exchange.mcp_server = server
    exchange.mcp_params = carried(headers)
    if not principal.mcp.may_use_server(server.name):
        why = f"Your team '{principal.team}' may not use the MCP server '{server.name}'."
        return _refused(exchange, server, 403, ErrorCode.FORBIDDEN, why, "mcp_forbidden")
    if exchange.method not in _HTTP_METHODS:
        # Streamable HTTP has no other; one would carry a body the gateway never reads.
        why = f"HTTP method {exchange.method} is not used by MCP; use POST."
        refused = _refused(exchange, server, 405, ErrorCode.INVALID_REQUEST, why, "mcp_invalid")
        allow = ("allow", ", ".join(sorted(_HTTP_METHODS)))
        return replace(refused, headers=(*refused.headers, allow))
    if exchange.method != "POST" and not end_of_stream:
        # Only a POST's body is judged: one on another method would go on unread.
        why = f"An MCP {exchange.method} request carries no body."
        return _refused(exchange, server, 400, ErrorCode.INVALID_REQUEST, why, "mcp_invalid")
    route = _route(server)
    presented = headers.get(sessions.HEADER)
    if presented is not None and exchange.mcp_sessions is not None:
        session = exchange.mcp_sessions.unbound(presented, principal)
        if session is None:
            # As a server answers a session it does not know: the client starts another.
            why = "Session not found (it is not this caller's, or has ended)."
            return _refused(exchange, server, 404, ErrorCode.SESSION_NOT_FOUND, why, "mcp_session")
        route = (*route, (sessions.HEADER, session))
    if exchange.method == "GET":
        # The server's own stream carries no calls, but what it sends is read like a POST's
        # answer: its requests and notifications, and answers it replays to a client that
        # resumes a stream (Last-Event-ID), narrowed by their shape and guarded.
        return Forward(
            set_headers=route,
            skip_request_body=True,
            process_response=True,
            clear_route_cache=True,
        )
    if exchange.method == "DELETE" or end_of_stream:
        # The end of a session carries no calls and gets no answer to read; it only needs
        # the caller to be allowed on this server.
        return Forward(set_headers=route, skip_request_body=True, clear_route_cache=True)
    return Forward(set_headers=route, process_response=True, clear_route_cache=True)


def _route(server: CompiledServer) -> Headers:
    """The server's cluster, for Envoy's route to read, and the mark that picks MCP's own
    route (:data:`~extproc.routing.HEADER_MCP`)."""
    return ((routing.HEADER_CLUSTER, server.cluster), (routing.HEADER_MCP, server.name))


def _refused(
    exchange: Exchange,
    server: CompiledServer,
    status: int,
    code: ErrorCode,
    message: str,
    error_code: str,
) -> Reply:
    """A request refused before its body: JSON-RPC's error, no id (none was read)."""
    exchange.status, exchange.error_code = status, error_code
    body = encode(error_response(None, code, message, {"server": server.name}))
    return Reply(status, body, _JSON, details=f"extproc_{error_code}")


def on_body(exchange: Exchange, raw: bytes) -> Decision:
    """Judge every JSON-RPC call in the body; guard the arguments of those let through
    (and a rewritten argument's copies in ``Mcp-Param-*`` headers with it:
    :mod:`extproc.mcp.params`)."""
    server, principal = exchange.mcp_server, exchange.principal
    assert server is not None and principal is not None
    try:
        body = parse_body(raw)
    except JsonRpcError as unusable:
        # Not JSON, not JSON-RPC 2.0, an empty batch: JSON-RPC's own error, never sent on.
        exchange.status = unusable.status
        exchange.error_code = "mcp_invalid"
        return Reply(unusable.status, unusable.answer, _JSON, details="extproc_mcp")
    verdict = decide(server, principal.mcp, body)
    if isinstance(verdict, Answer):
        return _answer(exchange, verdict)
    exchange.mcp_calls = verdict.calls
    exchange.mcp_methods = verdict.methods
    exchange.mcp_body = body
    exchange.mcp_tools = verdict.tools
    route = _route(server)
    guards = exchange.policy.guardrails
    subject = _subject(exchange, principal, server)
    if not guards.applies("input", **subject):
        return Forward(set_headers=route, clear_route_cache=True)
    texts = request_texts(body)
    result = guards.check("input", texts, **subject)
    exchange.verdicts.extend(describe(result))
    rewrites = result.rewrites
    if result.blocked:
        message = _why(result)
        if body.requests:
            # A call, or a 2026-07-28 retry carrying the client's answers (inputResponses):
            # its caller waits for this error, the server waits for nothing.
            return _answer(exchange, refuse(server, body, ErrorCode.GUARDRAIL_BLOCKED, message))
        # Only the client's answers to the server's requests: refused, they would leave
        # the server waiting for them (and clients ignore an error to a POSTed answer).
        rewrites = withheld(texts, message)
    if not rewrites:
        return Forward(set_headers=route, clear_route_cache=True)
    try:  # before the body is rewritten in place: the originals are what copies carry
        copies = agreeing(exchange.mcp_params, argument_changes(body, rewrites))
    except Unfaithful as unfaithful:
        message = (
            f"A guardrail rewrote an argument of this call, and {unfaithful.message}: "
            "refused rather than sent with the original text in a header."
        )
        return _answer(exchange, refuse(server, body, ErrorCode.GUARDRAIL_BLOCKED, message))
    apply_rewrites(body.raw, rewrites)
    try:
        sent = encode_body(body.raw)
    except InvalidRequest as too_deep:
        refused = refuse(server, body, ErrorCode.INVALID_REQUEST, too_deep.message)
        return _answer(exchange, refused)
    return Forward(set_headers=(*route, *copies), body=sent, clear_route_cache=True)


async def count_tool_calls(exchange: Exchange, meter: Meter, now: datetime) -> Reply | None:
    """Count the body's tool calls against the caller's tool limits (requests per window);
    a call over a limit refuses the body with a JSON-RPC error naming the limit."""
    server, principal, body = exchange.mcp_server, exchange.principal, exchange.mcp_body
    assert server is not None and principal is not None and body is not None
    tools = [tool for _, tool in exchange.mcp_tools]
    try:
        await meter.reserve_tools(principal.limits, server.name, tools, now)
    except RateLimited as limited:
        retry = dict(limited.headers).get("retry-after")
        data = {"retryAfter": int(retry)} if retry else None
        refused = refuse(server, body, ErrorCode.RATE_LIMITED, limited.message, data)
        return _answer(exchange, refused)
    except ServiceUnavailable as down:
        refused = refuse(server, body, ErrorCode.RATE_LIMITED, down.message)
        return _answer(exchange, refused)
    return None


def on_response_headers(exchange: Exchange, headers: Mapping[str, str]) -> Decision:
    """Have Envoy send the answer to be narrowed and guarded: SSE streamed, JSON whole.

    Whatever its status: the Python SDK hands a 4xx or 5xx answer's JSON-RPC error to its
    caller as the call's outcome (the TypeScript SDK puts the body in its error), so an
    error answer is read as a 2xx one is. What is read is what clients read as messages,
    judged by the content-type as loosely as they judge it (:func:`answer_kind`).
    """
    status = int(headers.get(":status", "0") or 0)
    exchange.response_status = exchange.status = status
    session = _bound_session(exchange, headers)
    content_type = headers.get("content-type", "")
    try:
        kind = answer_kind(content_type)
    except McpStreamError as unreadable:
        return exchange.reject(BadGateway(f"The MCP server's answer {_UNREADABLE}: {unreadable}."))
    if kind is None:
        return Forward(set_headers=session)  # nothing a client reads as messages
    sse = kind == "sse"
    if headers.get("content-encoding", "identity").lower() != "identity":
        # Envoy asks servers for plain answers; one compressed anyway cannot be checked.
        return exchange.reject(BadGateway(f"The MCP server's answer {_UNREADABLE}: compressed."))
    if sse and (charset := foreign_charset(content_type)) is not None:
        # Read here as UTF-8, by the Python SDK in its own charset: judged unread.
        why = f"a stream in charset {charset}, not UTF-8"
        return exchange.reject(BadGateway(f"The MCP server's answer {_UNREADABLE}: {why}."))
    if sse:
        exchange.mcp_stream = SseRewriter(exchange.mcp_methods, _rewriter(exchange))
        return Forward(
            set_headers=session, remove_headers=("content-length",), response_body="streamed"
        )
    exchange.answer_whole = True
    return Forward(
        set_headers=session, remove_headers=("content-length",), response_body="buffered"
    )


def _bound_session(exchange: Exchange, headers: Mapping[str, str]) -> Headers:
    """The answer's ``Mcp-Session-Id`` as the client gets it: tagged for this caller
    (:mod:`extproc.mcp.sessions`)."""
    session = headers.get(sessions.HEADER)
    if session is None or exchange.mcp_sessions is None or exchange.principal is None:
        return ()
    return ((sessions.HEADER, exchange.mcp_sessions.bound(session, exchange.principal)),)


def on_response_body(exchange: Exchange, chunk: bytes, end: bool) -> Decision:
    """Narrow and guard the messages of the answer (Envoy sends a JSON one whole); an
    answer that cannot be read ends the exchange with a 502 (fail closed)."""
    try:
        if exchange.mcp_stream is not None:
            out = exchange.mcp_stream.feed(chunk)
            if end:
                out += exchange.mcp_stream.finish()
            return Forward(body=out)
        rewritten = rewrite_json(chunk, exchange.mcp_methods, _rewriter(exchange))
    except McpStreamError as unreadable:
        return exchange.reject(BadGateway(f"The MCP server's answer {_UNREADABLE}: {unreadable}."))
    return CONTINUE if rewritten is None else Forward(body=rewritten)


def _rewriter(exchange: Exchange) -> Rewriter:
    """List narrowing, then the output guardrails on what the server returned."""
    principal, server = exchange.principal, exchange.mcp_server
    assert principal is not None and server is not None
    guards = exchange.policy.guardrails
    subject = _subject(exchange, principal, server)
    narrow = list_filter(principal.mcp)
    if not guards.applies("output", **subject):
        return narrow

    def check(texts: tuple[TextPart, ...]) -> GuardResult:
        result = guards.check("output", texts, **subject)
        exchange.verdicts.extend(describe(result))
        return result

    def guard_listing(result: dict[str, Any]) -> dict[str, Any] | None:
        """A list result with each item a rule blocks hidden (a poisoned tool's
        description would reach the model), each one it rewrites rewritten."""
        changed: dict[str, Any] | None = None
        for key in _LISTED:
            items = result.get(key)
            if not isinstance(items, list):
                continue
            kept: list[Any] = []
            touched = False
            for item in items:
                texts = listed_texts(item)
                verdict = check(texts) if texts else None
                if verdict is not None and (verdict.blocked or verdict.rewrites):
                    touched = True
                    if verdict.blocked:
                        continue
                    item = rewritten(item, verdict.rewrites)
                kept.append(item)
            if touched:
                changed = {**(changed or result), key: kept}
        return changed

    def guard(method: str | None, message: dict[str, Any]) -> dict[str, Any] | None:
        answered = message.get("result")
        listed: dict[str, Any] | None = None
        if isinstance(answered, dict) and any(isinstance(answered.get(k), list) for k in _LISTED):
            listing = guard_listing(answered)
            listed = None if listing is None else {**message, "result": listing}
        current = message if listed is None else listed
        # The rest of the message too: a list beside a tool's content must not shield it.
        own, embedded = split_embedded(message_texts(current))
        rewrites: dict[JsonPath, Any] = {}  # texts, or an emptied object (withheld)
        if own:
            result = check(own)
            if result.blocked and is_answer(current):
                why = _why(result)
                return error_response(current.get("id"), ErrorCode.GUARDRAIL_BLOCKED, why)
            # A server's own request is no answer to replace with an error, and dropping
            # it would leave the server waiting: it goes on with its texts withheld.
            rewrites.update(withheld(own, _why(result)) if result.blocked else result.rewrites)
        for texts in embedded:  # each request a result embeds, judged as one sent alone
            result = check(texts)
            rewrites.update(withheld(texts, _why(result)) if result.blocked else result.rewrites)
        if not rewrites:
            return listed
        copy: dict[str, Any] = rewritten(current, rewrites)
        return copy

    return chain(narrow, guard)


def _why(result: GuardResult) -> str:
    """What a blocked text is replaced with, or an error answer says."""
    return result.message or f"Blocked by guardrail '{result.blocked_by}'."


def _answer(exchange: Exchange, answer: Answer) -> Reply:
    exchange.mcp_calls = answer.calls
    exchange.status = answer.status
    exchange.error_code = "mcp_refused"
    return Reply(status=answer.status, body=answer.body, headers=_JSON, details="extproc_mcp")


def _subject(exchange: Exchange, principal: Principal, server: CompiledServer) -> dict[str, Any]:
    """Guardrail scopes see MCP traffic as the model ``mcp:<server>``."""
    return {
        "team": principal.team,
        "key_id": principal.key_id,
        "model": f"mcp:{server.name}",
        "path": exchange.path,
    }
