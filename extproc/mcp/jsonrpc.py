"""JSON-RPC 2.0 as MCP uses it: parse a POSTed body, build error answers.

A body is one message or a batch (an array; MCP 2025-03-26 allowed them, later revisions
dropped them, the gateway still reads them so a batch cannot smuggle a call past policy).
Each element becomes a :class:`Request` (has an ``id``: expects an answer), a
:class:`Notification` (no ``id``), a :class:`Response` (a client's answer to a server's
request, e.g. sampling) or an :class:`Invalid` element. A body that is not JSON, not an
object or array, or an empty array raises :class:`JsonRpcError`, which carries the one
error answer to send.

Error codes (all in ``error.code``; ``error.data`` names the method and the item):

    -32700  parse error          body is not JSON (HTTP 400)
    -32600  invalid request      not a JSON-RPC 2.0 message, duplicate ids in a batch,
                                 a call-style method sent as a notification, a member
                                 some servers read as another ("Method") (HTTP 400)
    -32601  method not found     a method the gateway does not know, on a server whose
                                 policy rejects unknown methods (HTTP 200)
    -32602  invalid params       tools/call without a tool name, a resource URI with dot
                                 segments or encoded separators, etc. (HTTP 400)
    -32010  forbidden            the caller's policy forbids this tool, resource, prompt
                                 or server (HTTP 200)
    -32011  rate limited         a per-tool budget is exhausted (HTTP 200)
    -32012  blocked by guardrail a guardrail rule refused the call's arguments (HTTP 200)
    -32013  batch rejected       another element of the same batch was refused, so none
                                 of it was forwarded (HTTP 200)
    -32014  gateway error        the gateway could not pass the server's answer on (too
                                 large to check, unreadable: HTTP 502) or failed itself;
                                 ``data.type`` is the gateway's error code, e.g.
                                 ``upstream_answer_too_large`` (HTTP status as the error's)

The gateway's own codes sit in JSON-RPC's implementation-defined server range and avoid
-32000/-32001 (the official Python SDK uses them internally for "connection closed" and
"request timeout") and -32002 (retired by MCP, never to be reused). Policy refusals go out
with HTTP 200 because MCP carries a request's failure in the JSON-RPC body: SDKs before 2.x
turn any non-2xx status into a transport failure and lose the message. Malformed input
gets 400, which the transport spec requires and which SDK 2.x maps the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson

RequestId = int | str
"""MCP ids are strings or integers (never null, never fractional)."""

JSONRPC = "2.0"

MAX_BATCH = 100
"""Messages in one batch: each is judged and audited (later MCP revisions have none)."""


class ErrorCode(IntEnum):
    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    FORBIDDEN = -32010
    RATE_LIMITED = -32011
    GUARDRAIL_BLOCKED = -32012
    BATCH_REJECTED = -32013
    GATEWAY_ERROR = -32014
    SESSION_NOT_FOUND = -32001
    """What MCP's reference servers answer (with HTTP 404) for a session they do not know."""


_BAD_INPUT = frozenset({ErrorCode.PARSE_ERROR, ErrorCode.INVALID_REQUEST, ErrorCode.INVALID_PARAMS})


def http_status(codes: Iterable[int]) -> int:
    """The HTTP status of an answer carrying these error codes: 400 if any says the input
    was malformed, 200 otherwise (see the module docstring for why)."""
    return 400 if any(code in _BAD_INPUT for code in codes) else 200


@dataclass(frozen=True, slots=True)
class Request:
    id: RequestId
    method: str
    params: Mapping[str, Any]
    """The message's ``params`` (empty if absent). Read-only: it is part of :attr:`Body.raw`."""
    index: int | None = None
    """Position in the batch; ``None`` for a single message."""


@dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: Mapping[str, Any]
    index: int | None = None


@dataclass(frozen=True, slots=True)
class Response:
    """A client's result or error for a request the server sent it (sampling, roots...)."""

    id: RequestId | None
    index: int | None = None


@dataclass(frozen=True, slots=True)
class Invalid:
    """A batch element that is no JSON-RPC message; ``id`` is kept when it was readable."""

    id: RequestId | None
    reason: str
    index: int | None = None


Message = Request | Notification | Response | Invalid


@dataclass(frozen=True, slots=True)
class Body:
    """A parsed POST body: its messages in order, and the decoded JSON they came from."""

    messages: tuple[Message, ...]
    batch: bool
    raw: Any
    """The decoded document (a dict, or a list for a batch): what texts' JSON paths index.
    Mutate it only to apply rewrites, then serialise it with :func:`encode`."""

    @property
    def requests(self) -> tuple[Request, ...]:
        return tuple(m for m in self.messages if isinstance(m, Request))


class JsonRpcError(Exception):
    """The whole body is unusable; :attr:`answer` is what to send back (with :attr:`status`)."""

    def __init__(self, code: ErrorCode, message: str, id: RequestId | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id

    @property
    def status(self) -> int:
        return http_status((self.code,))

    @property
    def answer(self) -> bytes:
        return encode(error_response(self.id, self.code, self.message))


def parse_body(body: bytes) -> Body:
    """Parse a POSTed MCP body (one message or a batch).

    Raises :class:`JsonRpcError` (-32700, -32600) when the body as a whole is unusable; a
    single message that is not valid JSON-RPC raises too, a bad batch element becomes
    :class:`Invalid` so the others keep their ids.
    """
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise JsonRpcError(ErrorCode.PARSE_ERROR, "Parse error: the body is not JSON") from None
    if isinstance(raw, list):
        if not raw:
            raise JsonRpcError(ErrorCode.INVALID_REQUEST, "Invalid request: empty batch")
        if len(raw) > MAX_BATCH:
            raise JsonRpcError(
                ErrorCode.INVALID_REQUEST,
                f"Invalid request: a batch holds at most {MAX_BATCH} messages",
            )
        messages = tuple(_message(item, i) for i, item in enumerate(raw))
        _distinct_ids(messages)
        return Body(messages, True, raw)
    if not isinstance(raw, dict):
        raise JsonRpcError(
            ErrorCode.INVALID_REQUEST, "Invalid request: expected a JSON object or array"
        )
    message = _message(raw, None)
    if isinstance(message, Invalid):
        raise JsonRpcError(ErrorCode.INVALID_REQUEST, message.reason, message.id)
    return Body((message,), False, raw)


# The members the gateway judges a message by, at each level it reads.
_MEMBERS = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})
_PARAMS = frozenset({"name", "uri", "arguments", "ref", "notifications", "inputResponses"})
_NESTED: Mapping[str, frozenset[str]] = {
    "ref": frozenset({"type", "name", "uri"}),
    "notifications": frozenset({"resourceSubscriptions"}),
}
"""Params members holding an object whose members the gateway reads too."""


def _lookalike(members: Mapping[str, Any], read: frozenset[str]) -> str | None:
    """A member the gateway does not read that some servers would read as one it does.

    Go's ``encoding/json`` matches member names without regard to case (the long s as
    ``s``, the Kelvin sign as ``k``) and keeps the last match, and some decoders drop NUL
    characters: ``{"method": "ping", "Method": "tools/call"}`` would be judged a ping here
    and run as a tool call there. Such a message is refused instead."""
    folded = _folded(read)
    for name in members:
        if name not in read and name.replace("\x00", "").casefold() in folded:
            return name
    return None


@functools.cache
def _folded(read: frozenset[str]) -> frozenset[str]:
    """``read`` as those servers match it (``resourceSubscriptions`` in any case)."""
    return frozenset(name.casefold() for name in read)


def _message(item: Any, index: int | None) -> Message:
    if not isinstance(item, dict):
        return Invalid(None, "Invalid request: a message must be a JSON object", index)
    has_id = "id" in item
    raw_id = item.get("id")
    id_ = raw_id if _valid_id(raw_id) else None
    if item.get("jsonrpc") != JSONRPC:
        return Invalid(id_, 'Invalid request: "jsonrpc" must be "2.0"', index)
    ambiguous = _lookalike(item, _MEMBERS)
    if ambiguous is None and isinstance(item.get("params"), dict):
        params = item["params"]
        ambiguous = _lookalike(params, _PARAMS)
        for member, read in _NESTED.items():
            if ambiguous is None and isinstance(params.get(member), dict):
                ambiguous = _lookalike(params[member], read)
    if ambiguous is not None:
        return Invalid(id_, f"Invalid request: member {ambiguous!r} reads as another", index)
    method = item.get("method")
    if method is None and ("result" in item or "error" in item):
        if "result" in item and "error" in item:
            return Invalid(id_, "Invalid response: both result and error", index)
        return Response(id_, index)  # an error answer may carry "id": null
    if has_id and id_ is None:
        return Invalid(None, "Invalid request: id must be a string or an integer", index)
    if not isinstance(method, str) or not method:
        return Invalid(id_, 'Invalid request: "method" must be a non-empty string', index)
    params = item.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return Invalid(id_, 'Invalid request: "params" must be an object', index)
    if id_ is None:
        return Notification(method, params, index)
    return Request(id_, method, params, index)


def _distinct_ids(messages: tuple[Message, ...]) -> None:
    """Answers are matched to requests by id: two requests sharing one would let an answer
    be read as the wrong method's (MCP forbids reusing an id anyway)."""
    seen: set[RequestId] = set()
    for message in messages:
        if isinstance(message, Request):
            if message.id in seen:
                raise JsonRpcError(
                    ErrorCode.INVALID_REQUEST, f"Invalid request: id {message.id!r} used twice"
                )
            seen.add(message.id)


def _valid_id(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def error_object(code: ErrorCode, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": int(code), "message": message}
    if data is not None:
        error["data"] = data
    return error


def error_response(
    id: RequestId | None, code: ErrorCode, message: str, data: Any = None
) -> dict[str, Any]:
    """A JSON-RPC error answer for request ``id`` (``None`` when it could not be read)."""
    return {"jsonrpc": JSONRPC, "id": id, "error": error_object(code, message, data)}


def encode(document: Any) -> bytes:
    return orjson.dumps(document)
