"""Reading and rewriting a server's answers: one JSON document or an SSE stream.

An MCP server answers a POST either with ``application/json`` (one JSON-RPC message, or an
array for a batch) or with ``text/event-stream``, whose ``data:`` events each carry one
JSON-RPC message: server notifications and requests first, the answer last. Answers only
say which request they answer by ``id``, so the request's id → method map (from
:class:`extproc.mcp.enforce.Forward`) travels with the exchange and tells a tools/list
result from a tools/call result.

Changes are made by a :class:`Rewriter`: a function from (method, message) to a
replacement message or ``None``. :func:`list_filter` hides what a caller may not use;
guardrails on tool results are another rewriter, and :func:`chain` runs several. Whatever
no rewriter touches goes out byte for byte: an unchanged JSON body is reported as
``None``; an unchanged SSE event is re-emitted from its raw bytes (separators, ``id:``
lines and comments included).

Every event whose data is JSON is read, whatever its name: clients dispatch an event as a
message by a rule servers can bend (the last ``event`` field wins, an empty one means
``message``; :func:`extproc.sse.name`), so only an event they cannot take for one, named
otherwise and with plain data (a server's own ``ping``), passes unread.

Streams are processed incrementally: :meth:`SseRewriter.feed` returns the complete events
of what has arrived so far and holds back the unfinished last one. An answer that cannot be
read (not JSON, an event larger than ``max_event_bytes``) cannot be judged, so
:class:`McpStreamError` is raised and the caller must end the exchange (fail closed):
passing it on unread could leak a hidden tool or an unchecked tool result (a JavaScript
server's string cut mid-emoji is a lone surrogate, which is not JSON here but is to the
client).
"""

from __future__ import annotations

import codecs
import email.message
import email.utils
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import orjson

from extproc import sse
from extproc.mcp.access import McpPermissions
from extproc.mcp.enforce import filter_list_response
from extproc.mcp.jsonrpc import RequestId

MAX_EVENT_BYTES = 8 * 1024 * 1024
"""Envoy's per-request buffer limit: no legitimate single message is larger."""


class McpStreamError(Exception):
    """An answer could not be read (not JSON, an oversized event); end the exchange, fail
    closed."""


class Rewriter(Protocol):
    def __call__(self, method: str | None, message: dict[str, Any], /) -> dict[str, Any] | None:
        """A replacement for ``message``, or ``None`` to keep it as it is.

        ``method`` is the method of the request ``message`` answers, ``None`` for server
        notifications and requests and for answers whose request is unknown here.
        """
        ...


def chain(*rewriters: Rewriter) -> Rewriter:
    """Run ``rewriters`` in order, each on the previous one's output."""

    def run(method: str | None, message: dict[str, Any]) -> dict[str, Any] | None:
        changed: dict[str, Any] | None = None
        for rewriter in rewriters:
            result = rewriter(method, changed if changed is not None else message)
            if result is not None:
                changed = result
        return changed

    return run


class ListFilter:
    """The rewriter that narrows tools/list, resources/list, resources/templates/list and
    prompts/list answers to what the caller may use; counts what it hid, for audit."""

    __slots__ = ("_access", "hidden")

    def __init__(self, access: McpPermissions) -> None:
        self._access = access
        self.hidden = 0

    def __call__(self, method: str | None, message: dict[str, Any]) -> dict[str, Any] | None:
        filtered = filter_list_response(message, self._access)
        if filtered is message:
            return None
        self.hidden += _count(message) - _count(filtered)
        return filtered


def list_filter(access: McpPermissions) -> ListFilter:
    return ListFilter(access)


def _count(message: dict[str, Any]) -> int:
    result = message.get("result")
    if not isinstance(result, dict):
        return 0
    return sum(len(v) for v in result.values() if isinstance(v, list))


AnswerKind = Literal["json", "sse"]
_JSON = "application/json"
_SSE = "text/event-stream"


def answer_kind(content_type: str) -> AnswerKind | None:
    """How MCP clients read an answer with ``content_type``: as one JSON document
    (``json``), as an SSE stream (``sse``), or not as messages at all (``None``).

    As loosely as the loosest client reads it: the Python SDK takes a content-type that
    starts with ``application/json`` (else ``text/event-stream``) in any case, the
    TypeScript SDK one that contains ``text/event-stream`` (else ``application/json``)
    anywhere, in the case it is written. One the two would read as different kinds
    (``TEXT/EVENT-STREAM; x=application/json``) raises :class:`McpStreamError`: read here
    as either, the other client could find messages in it that were never read (a body
    with no SSE data line may be one JSON message).
    """
    lowered = content_type.lower()
    python: AnswerKind | None = (
        "json" if lowered.startswith(_JSON) else "sse" if lowered.startswith(_SSE) else None
    )
    typescript: AnswerKind | None = (
        "sse" if _SSE in content_type else "json" if _JSON in content_type else None
    )
    if python is not None and typescript is not None and python != typescript:
        raise McpStreamError(
            f"its content-type {content_type!r} is read as JSON by some clients, "
            "as an SSE stream by others"
        )
    return python or typescript


def foreign_charset(content_type: str) -> str | None:
    """A charset other than UTF-8 that a stream's ``content_type`` declares, if any.

    The gateway reads a stream as UTF-8, as the TypeScript SDK does whatever it says; the
    Python SDK decodes it in the declared charset (httpx reads the header with
    :mod:`email`, as this does). In UTF-16 no ``data:`` line is found here, yet that
    client reads every message: such a stream cannot be judged. Every ``charset``
    parameter counts (another reader may take the last), and a name Python does not know
    is foreign.
    """
    header = email.message.Message()
    header["content-type"] = content_type
    for name, value in header.get_params(failobj=[]):
        if name.lower() != "charset":
            continue
        declared = email.utils.collapse_rfc2231_value(value).strip()
        try:
            if codecs.lookup(declared).name == "utf-8":
                continue
        except LookupError:
            pass
        return declared or "(empty)"
    return None


def rewrite_json(body: bytes, methods: Mapping[RequestId, str], rewrite: Rewriter) -> bytes | None:
    """Rewrite a JSON answer (one message or a batch); ``None`` when nothing changed.

    JSON that is not JSON-RPC is left alone (``None``): it carries nothing a rewriter could
    judge, and the client will reject it anyway; so is an empty body (the official SDK
    answers a notification 202 with one). A body that is not JSON raises
    :class:`McpStreamError`.
    """
    if not body.strip():
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise McpStreamError("the answer is not JSON") from error
    changed = _rewrite_document(document, methods, rewrite)
    return None if changed is None else _encode(changed)


def _encode(changed: Any) -> bytes:
    """A rewritten answer's bytes; one nested too deep to write back cannot go on
    rewritten, nor unrewritten (fail closed)."""
    try:
        return orjson.dumps(changed)
    except orjson.JSONEncodeError as error:
        raise McpStreamError("a message nests too deep to write back") from error


def _rewrite_document(
    document: Any, methods: Mapping[RequestId, str], rewrite: Rewriter
) -> Any | None:
    """A message, or an array of them (a batch answer), rewritten; ``None`` if unchanged."""
    if isinstance(document, dict):
        return _rewrite_message(document, methods, rewrite)
    if not isinstance(document, list):
        return None
    out: list[Any] = []
    touched = False
    for item in document:
        changed = _rewrite_message(item, methods, rewrite) if isinstance(item, dict) else None
        touched = touched or changed is not None
        out.append(item if changed is None else changed)
    return out if touched else None


def _rewrite_message(
    message: dict[str, Any], methods: Mapping[RequestId, str], rewrite: Rewriter
) -> dict[str, Any] | None:
    method: str | None = None
    if "method" not in message:
        id_ = message.get("id")
        if isinstance(id_, str | int) and not isinstance(id_, bool):
            method = methods.get(id_)
    return rewrite(method, message)


class SseRewriter:
    """Rewrites the JSON-RPC messages of one SSE answer as its chunks arrive."""

    __slots__ = ("_events", "_max", "_methods", "_rewrite", "changed")

    def __init__(
        self,
        methods: Mapping[RequestId, str],
        rewrite: Rewriter,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self._methods = methods
        self._rewrite = rewrite
        self._max = max_event_bytes
        self._events = sse.Events()
        self.changed = 0
        """Events rewritten so far."""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send on for ``chunk``: every event it completes (possibly none)."""
        out = bytearray()
        for raw in self._events.feed(chunk):
            out += self._event(raw)
        if self._events.held > self._max:
            raise McpStreamError(f"an SSE event exceeds {self._max} bytes")
        return bytes(out)

    def finish(self) -> bytes:
        """The end of the stream: an unterminated last event is judged and sent as is."""
        rest = self._events.rest()
        return self._event(rest) if rest else b""

    def _event(self, raw: bytes) -> bytes:
        text = sse.data(raw)
        if text is None or not text.strip():
            return raw  # no message: a priming event (its id), a comment, a keep-alive
        try:
            document = orjson.loads(text)
        except orjson.JSONDecodeError as error:
            if sse.name(raw) != sse.MESSAGE:
                return raw  # a named event's plain data: MCP clients dispatch only messages
            raise McpStreamError("an SSE event's data is not JSON") from error
        # One message per event in practice; MCP 2025-03-26 also allowed a batch.
        changed = _rewrite_document(document, self._methods, self._rewrite)
        if changed is None:
            return raw
        self.changed += 1
        return sse.with_data(raw, _encode(changed))
