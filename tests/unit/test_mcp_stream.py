"""Answers read incrementally: JSON and SSE, filtered lists, byte-identical passthrough."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from extproc.mcp.access import compile_access
from extproc.mcp.config import McpAccess
from extproc.mcp.jsonrpc import RequestId
from extproc.mcp.stream import (
    ListFilter,
    McpStreamError,
    SseRewriter,
    answer_kind,
    chain,
    foreign_charset,
    list_filter,
    rewrite_json,
)

RESTRICTED = compile_access(McpAccess.model_validate({"tools": {"allow": ["weather.*"]}}))
ADMIN = compile_access(McpAccess.model_validate({"tools": {"allow": ["*"]}}))

TOOLS = {"tools": [{"name": "github.create_issue"}, {"name": "weather.get"}], "ttlMs": 0}
LIST_ANSWER = {"jsonrpc": "2.0", "id": 2, "result": TOOLS}
CALL_ANSWER = {
    "jsonrpc": "2.0",
    "id": 3,
    "result": {"content": [{"type": "text", "text": "sunny"}]},
}


def sse(*messages: dict[str, Any], newline: bytes = b"\r\n", extra: bytes = b"") -> bytes:
    """Events the way the official SDK frames them: ``event: message`` then ``data:``."""
    return b"".join(
        extra + b"event: message" + newline + b"data: " + orjson.dumps(m) + newline + newline
        for m in messages
    )


def feed_in_pieces(rewriter: SseRewriter, stream: bytes, seed: int) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    at = 0
    while at < len(stream):
        step = rng.randint(1, 40)
        out += rewriter.feed(stream[at : at + step])
        at += step
    return bytes(out + rewriter.finish())


def data_of(stream: bytes) -> list[Any]:
    return [
        orjson.loads(line[6:])
        for line in stream.replace(b"\r\n", b"\n").split(b"\n")
        if line.startswith(b"data: ")
    ]


@pytest.mark.parametrize("newline", [b"\r\n", b"\n", b"\r"], ids=["crlf", "lf", "cr"])
@pytest.mark.parametrize("seed", range(5))
def test_unchanged_stream_is_byte_identical(newline: bytes, seed: int) -> None:
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
    stream = (
        b": keep-alive"
        + newline
        + newline
        + sse(progress, CALL_ANSWER, newline=newline, extra=b"id: ev-1" + newline)
        + b"retry: 1000"
        + newline
        + newline
    )
    rewriter = SseRewriter({3: "tools/call"}, list_filter(RESTRICTED))
    assert feed_in_pieces(rewriter, stream, seed) == stream
    assert rewriter.changed == 0


def test_unchanged_stream_byte_by_byte_for_an_admin_list() -> None:
    stream = sse(LIST_ANSWER)
    rewriter = SseRewriter({2: "tools/list"}, list_filter(ADMIN))
    out = b"".join(rewriter.feed(stream[i : i + 1]) for i in range(len(stream)))
    assert out + rewriter.finish() == stream


@pytest.mark.parametrize("seed", range(5))
def test_tools_list_in_a_stream_is_filtered(seed: int) -> None:
    note = {
        "jsonrpc": "2.0",
        "method": "notifications/message",
        "params": {"level": "info", "data": "x"},
    }
    stream = sse(note, extra=b"id: 1\r\n") + sse(LIST_ANSWER, extra=b"id: 2\r\n")
    filter_ = list_filter(RESTRICTED)
    rewriter = SseRewriter({2: "tools/list"}, filter_)
    out = feed_in_pieces(rewriter, stream, seed)
    assert out.startswith(sse(note, extra=b"id: 1\r\n"))  # the untouched event, as it was
    last = out[len(sse(note, extra=b"id: 1\r\n")) :]
    assert last.startswith(b"id: 2\r\nevent: message\r\ndata: ")  # fields and line endings kept
    assert last.endswith(b"\r\n\r\n")
    assert data_of(last) == [
        {"jsonrpc": "2.0", "id": 2, "result": {"tools": [{"name": "weather.get"}], "ttlMs": 0}}
    ]
    assert (rewriter.changed, filter_.hidden) == (1, 1)


def test_answer_on_a_resumed_stream_is_filtered_by_shape() -> None:
    rewriter = SseRewriter({}, list_filter(RESTRICTED))  # e.g. a GET stream after Last-Event-ID
    out = rewriter.feed(sse(LIST_ANSWER)) + rewriter.finish()
    assert data_of(out)[0]["result"]["tools"] == [{"name": "weather.get"}]


def test_unterminated_last_event_is_judged_at_the_end() -> None:
    rewriter = SseRewriter({2: "tools/list"}, list_filter(RESTRICTED))
    assert rewriter.feed(b"data: " + orjson.dumps(LIST_ANSWER)) == b""
    out = rewriter.finish()
    assert data_of(out)[0]["result"]["tools"] == [{"name": "weather.get"}]


def test_oversized_event_fails_closed() -> None:
    rewriter = SseRewriter({}, list_filter(RESTRICTED), max_event_bytes=64)
    with pytest.raises(McpStreamError):
        rewriter.feed(b"data: " + b"x" * 100)


def test_batch_answer_in_one_event_is_filtered() -> None:
    rewriter = SseRewriter({2: "tools/list", 3: "tools/call"}, list_filter(RESTRICTED))
    out = rewriter.feed(b"data: " + orjson.dumps([CALL_ANSWER, LIST_ANSWER]) + b"\n\n")
    (batch,) = data_of(out)
    assert batch[0] == CALL_ANSWER
    assert batch[1]["result"]["tools"] == [{"name": "weather.get"}]


def test_multi_line_data_is_joined() -> None:
    text = orjson.dumps(LIST_ANSWER, option=orjson.OPT_INDENT_2).split(b"\n")
    stream = b"".join(b"data: " + line + b"\n" for line in text) + b"\n"
    rewriter = SseRewriter({2: "tools/list"}, list_filter(RESTRICTED))
    out = rewriter.feed(stream)
    assert data_of(out)[0]["result"]["tools"] == [{"name": "weather.get"}]


@pytest.mark.parametrize(
    ("body", "methods", "expected"),
    [
        pytest.param(
            orjson.dumps(LIST_ANSWER),
            {2: "tools/list"},
            {"jsonrpc": "2.0", "id": 2, "result": {"tools": [{"name": "weather.get"}], "ttlMs": 0}},
            id="single",
        ),
        pytest.param(
            orjson.dumps([CALL_ANSWER, LIST_ANSWER]),
            {2: "tools/list", 3: "tools/call"},
            [
                CALL_ANSWER,
                {
                    "jsonrpc": "2.0",
                    "id": 2,
                    "result": {"tools": [{"name": "weather.get"}], "ttlMs": 0},
                },
            ],
            id="batch",
        ),
    ],
)
def test_json_answer_is_filtered(body: bytes, methods: dict[RequestId, str], expected: Any) -> None:
    out = rewrite_json(body, methods, list_filter(RESTRICTED))
    assert out is not None
    assert orjson.loads(out) == expected


@pytest.mark.parametrize(
    ("body", "methods"),
    [
        pytest.param(orjson.dumps(CALL_ANSWER), {3: "tools/call"}, id="no-list"),
        pytest.param(
            orjson.dumps(
                {"jsonrpc": "2.0", "id": 2, "result": {"tools": [{"name": "weather.get"}]}}
            ),
            {2: "tools/list"},
            id="nothing-hidden",
        ),
        pytest.param(orjson.dumps([CALL_ANSWER, 5]), {3: "tools/call"}, id="batch-nothing-hidden"),
        pytest.param(b'"x"', {}, id="not-a-message"),
    ],
)
def test_unchanged_json_answer_is_none(body: bytes, methods: dict[RequestId, str]) -> None:
    assert rewrite_json(body, methods, list_filter(RESTRICTED)) is None


def test_chain_runs_guardrail_after_list_filter() -> None:
    seen: list[str | None] = []

    def redact(method: str | None, message: dict[str, Any]) -> dict[str, Any] | None:
        seen.append(method)
        if method != "tools/call":
            return None
        return {**message, "result": {"content": [{"type": "text", "text": "[redacted]"}]}}

    rewrite = chain(ListFilter(RESTRICTED), redact)
    out = rewrite_json(
        orjson.dumps([LIST_ANSWER, CALL_ANSWER]), {2: "tools/list", 3: "tools/call"}, rewrite
    )
    assert out is not None
    listed, called = orjson.loads(out)
    assert listed["result"]["tools"] == [{"name": "weather.get"}]
    assert called["result"]["content"][0]["text"] == "[redacted]"
    assert seen == ["tools/list", "tools/call"]


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("text/event-stream", "sse"),
        ("Text/Event-Stream; charset=utf-8", "sse"),
        ("application/json", "json"),
        ("application/json; charset=utf-8", "json"),
        ("", None),
        ("text/plain", None),
        # The TypeScript SDK looks for either anywhere, the Python SDK at the start.
        ("text/event-stream2", "sse"),
        ("text/plain; x=text/event-stream", "sse"),
        ("text/plain; x=application/json", "json"),
        ("application/json-seq", "json"),
        ("text/event-stream; x=application/json", "sse"),  # both SDKs: a stream
    ],
)
def test_answer_kind(content_type: str, expected: str | None) -> None:
    """Read as the loosest client reads it: any content-type a client finds messages in
    is read here, as that kind."""
    assert answer_kind(content_type) == expected


@pytest.mark.parametrize(
    "content_type",
    [
        "application/jsonl; x=text/event-stream",  # Python: JSON, TypeScript: a stream
        "TEXT/EVENT-STREAM; x=application/json",  # Python: a stream, TypeScript: JSON
    ],
)
def test_a_content_type_clients_read_as_different_kinds_is_unreadable(content_type: str) -> None:
    """Read here as either kind, the other client could find messages never read."""
    with pytest.raises(McpStreamError, match="read as JSON by some clients"):
        answer_kind(content_type)


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("text/event-stream", None),
        ("text/event-stream; charset=utf-8", None),
        ('Text/Event-Stream; Charset="UTF8"', None),
        ("text/event-stream; charset=utf-16-le", "utf-16-le"),
        ("text/event-stream; charset=utf-8; charset=utf-16", "utf-16"),
        ("text/event-stream; charset*=utf-8''utf-16", "utf-16"),
        ("text/event-stream; charset=latin-1", "latin-1"),
        ("text/event-stream; charset=no-such-codec", "no-such-codec"),
        ("text/event-stream; charset=", "(empty)"),
    ],
)
def test_foreign_charset(content_type: str, expected: str | None) -> None:
    """A stream the Python SDK would decode other than as UTF-8 cannot be read here."""
    assert foreign_charset(content_type) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"<html>bad gateway</html>",
        b'{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"\\ud83d"}]}}',
    ],
    ids=["html", "lone-surrogate"],
)
def test_an_answer_that_is_not_json_fails_closed(body: bytes) -> None:
    """Unread, it would pass unnarrowed and unguarded (a JavaScript server's string cut
    mid-emoji is a lone surrogate: not JSON here, JSON to the client)."""
    with pytest.raises(McpStreamError):
        rewrite_json(body, {2: "tools/list"}, list_filter(RESTRICTED))
    rewriter = SseRewriter({2: "tools/list"}, list_filter(RESTRICTED))
    with pytest.raises(McpStreamError):
        rewriter.feed(b"data: " + body + b"\n\n")


def test_an_event_without_a_message_passes_and_one_with_spaces_is_read() -> None:
    rewriter = SseRewriter({2: "tools/list"}, list_filter(RESTRICTED))
    priming = b"id: 1\ndata: \n\n"
    assert rewriter.feed(priming) == priming
    listed = {"jsonrpc": "2.0", "id": 2, "result": {"tools": [{"name": "github.create_issue"}]}}
    out = rewriter.feed(b"data:   " + orjson.dumps(listed) + b"\n\n")
    assert data_of(out) == [{**listed, "result": {"tools": []}}]


def test_an_empty_json_answer_passes() -> None:
    """The official SDK answers a notification 202 with an empty application/json body."""
    assert rewrite_json(b"", {}, list_filter(RESTRICTED)) is None
    assert rewrite_json(b" \r\n", {}, list_filter(RESTRICTED)) is None


@pytest.mark.parametrize(
    "framing",
    [
        b"event:\n",
        b"event\n",
        b"event: x\nevent: message\n",
        b"event: x\nevent:\n",
        b"event: x\nevent\n",
        b"event: notifications\n",
        b"\xef\xbb\xbf",
        b"\xef\xbb\xbfevent: message\n",
    ],
    ids=[
        "empty-name",
        "bare-event-line",
        "last-name-wins",
        "last-empty-wins",
        "last-bare-wins",
        "other-name-with-json",
        "byte-order-mark",
        "byte-order-mark-named",
    ],
)
@pytest.mark.parametrize("seed", range(3))
def test_every_event_a_client_reads_as_a_message_is_narrowed(framing: bytes, seed: int) -> None:
    """The SDKs dispatch each of these as a ``message`` (the last ``event`` field wins, an
    empty one is ``message``; a stream's leading byte order mark is dropped): none may
    carry a hidden tool past the narrowing. An event named otherwise whose data is JSON is
    read too, in case a client takes it for one."""
    stream = framing + b"data: " + orjson.dumps(LIST_ANSWER) + b"\n\n"
    rewriter = SseRewriter({2: "tools/list"}, list_filter(RESTRICTED))
    out = feed_in_pieces(rewriter, stream, seed)
    assert data_of(out)[0]["result"]["tools"] == [{"name": "weather.get"}]
    assert rewriter.changed == 1


def test_an_event_that_is_not_a_message_passes_unread() -> None:
    """MCP clients dispatch only ``message`` events (or unnamed ones); a server's own
    ``ping`` events with plain data are not messages, and end nothing."""
    rewriter = SseRewriter({}, list_filter(RESTRICTED))
    ping = b"event: ping\ndata: ping\n\n"
    assert rewriter.feed(ping) == ping
    with pytest.raises(McpStreamError):
        rewriter.feed(b"event: message\ndata: ping\n\n")


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
def test_a_rewritten_message_too_deep_to_write_back_fails_closed(sse: bool) -> None:
    """orjson reads 1,024 levels but writes 255: a message a rewriter changed that nests
    deeper can go on neither rewritten nor as it was."""
    deep = b'{"n":' * 300 + b'"x"' + b"}" * 300
    message = b'{"jsonrpc":"2.0","method":"notifications/message","params":{"data":' + deep + b"}}"

    def touch(method: str | None, document: dict[str, Any]) -> dict[str, Any]:
        return {**document, "touched": True}

    with pytest.raises(McpStreamError, match="too deep"):
        if sse:
            SseRewriter({}, touch).feed(b"data: " + message + b"\n\n")
        else:
            rewrite_json(message, {}, touch)
