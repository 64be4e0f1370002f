"""Server-sent events framing shared by every stream reader (extproc/sse.py)."""

from __future__ import annotations

import pytest

from extproc import sse

STREAM = (
    b"event: a\ndata: 1\n\n: comment\n\ndata: 2\r\ndata: 3\r\n\r\ndata: 4\r\r"
    b"data: 5\n\r\ndata: 6\r\n\n"
)
EVENTS = [
    b"event: a\ndata: 1\n\n",
    b": comment\n\n",
    b"data: 2\r\ndata: 3\r\n\r\n",
    b"data: 4\r\r",
    b"data: 5\n\r\n",  # mixed: a line's LF, then an empty line's CRLF
    b"data: 6\r\n\n",
]


@pytest.mark.parametrize("size", [1, 2, 3, 5, len(STREAM)])
def test_events_are_the_same_whatever_the_chunks(size: int) -> None:
    """An event's end split across chunks (``\\r\\n`` | ``\\r\\n``) is still found."""
    events = sse.Events()
    got: list[bytes] = []
    for at in range(0, len(STREAM), size):
        got += events.feed(STREAM[at : at + size])
    assert got == EVENTS and events.held == 0


def test_the_unfinished_event_is_held_and_given_at_the_end() -> None:
    events = sse.Events()
    assert events.feed(b"data: 1\n\ndata: 2") == [b"data: 1\n\n"]
    assert events.held == len(b"data: 2")
    assert events.rest() == b"data: 2" and events.held == 0


def test_a_single_crlf_ends_a_line_not_an_event() -> None:
    events = sse.Events()
    assert events.feed(b"data: 1\r") == []
    assert events.feed(b"\ndata: 2\r\n") == []
    assert events.feed(b"\r\n") == [b"data: 1\r\ndata: 2\r\n\r\n"]


def test_data_joins_its_lines_and_drops_one_leading_space() -> None:
    assert sse.data(b'event: x\r\ndata: {"a":\r\ndata:  1}\r\n\r\n') == b'{"a":\n 1}'
    assert sse.data(b": just a comment\n\n") is None


def test_a_bare_data_line_is_an_empty_data_field() -> None:
    """As the format says and :func:`sse.with_data` reads it: ``data`` alone on its line
    adds an empty value, so a reader sees the same lines a client and the writer see."""
    assert sse.data(b'data: {"a":\ndata\ndata: 1}\n\n') == b'{"a":\n\n1}'
    assert sse.data(b"data\n\n") == b""
    assert sse.data(b"datum: x\ndata_x: y\n\n") is None
    assert sse.lines(b"a\rb\nc\r\nd") == [b"a", b"b", b"c", b"d"]


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (b"event: ping\ndata: x\n\n", b"ping"),
        (b"data: x\n\n", b"message"),
        (b"event:\ndata: x\n\n", b"message"),
        (b"event\ndata: x\n\n", b"message"),
        (b"event: x\r\nevent: message\r\ndata: x\r\n\r\n", b"message"),
        (b"event: x\nevent\ndata: x\n\n", b"message"),
        (b"event: message\nevent: ping\ndata: x\n\n", b"ping"),
        (b"event:ping\n: event: message\ndata: x\n\n", b"ping"),
        (b"event:  message\ndata: x\n\n", b" message"),
    ],
    ids=[
        "named",
        "unnamed",
        "empty",
        "bare-field",
        "last-wins",
        "last-bare",
        "last-named",
        "comment-is-no-field",
        "one-space-dropped",
    ],
)
def test_name_is_the_type_a_client_dispatches(event: bytes, expected: bytes) -> None:
    """The format's rule, which the SDKs follow: the last ``event`` field wins, and an
    empty or absent one is ``message``."""
    assert sse.name(event) == expected


@pytest.mark.parametrize("size", [1, 2, 3, 4, 100])
def test_a_leading_byte_order_mark_is_dropped_whatever_the_chunks(size: int) -> None:
    """UTF-8 decoding drops it (so do the TypeScript SDKs): kept, the first line would read
    as a field named ``\ufeffdata``, and that event's data would be missed."""
    stream = b"\xef\xbb\xbfdata: 1\n\n\xef\xbb\xbfdata: 2\n\n"
    events = sse.Events()
    got: list[bytes] = []
    for at in range(0, len(stream), size):
        got += events.feed(stream[at : at + size])
    # Only the stream's first: one later is part of a line, as clients read it.
    assert got == [b"data: 1\n\n", b"\xef\xbb\xbfdata: 2\n\n"]
    assert [sse.data(event) for event in got] == [b"1", None]


def test_a_stream_that_only_starts_like_a_byte_order_mark_is_kept() -> None:
    events = sse.Events()
    assert events.feed(b"\xef") == [] and events.held == 1
    assert events.feed(b"\xbbx\n\n") == [b"\xef\xbbx\n\n"]
    short = sse.Events()
    assert short.feed(b"\xef\xbb") == [] and short.rest() == b"\xef\xbb"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_with_data_replaces_the_data_lines_alone(newline: bytes) -> None:
    """One reader for the output guard and the MCP stream: a bare ``data`` line is a data
    field too, and the other lines stay where they were, in the event's line endings."""
    event = newline.join([b"id: 7", b"data: one", b"data", b"event: message", b": note", b"", b""])
    assert sse.with_data(event, b'{"a":1}') == newline.join(
        [b"id: 7", b'data: {"a":1}', b"event: message", b": note", b"", b""]
    )
