"""Server-sent events framing, for every reader of a streamed answer: where one event
ends, its lines, its data.

The format ends a line with CRLF, LF or CR, and an event with an empty line. Providers
send LF; a server behind another proxy may send CRLF, and the format allows CR alone. The
readers (usage, translation, output guardrails, MCP narrowing) split the same way, so
none of them sees an event another one missed.
"""

from __future__ import annotations

import re

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE_END = re.compile(rb"\r\n|\n|\r")


def take_events(buffer: bytearray) -> list[bytes]:
    """Remove and return the complete events at the start of ``buffer``, each with the
    empty line that ends it (an event passed on unchanged keeps its bytes)."""
    events: list[bytes] = []
    start = 0
    for match in _EVENT_END.finditer(buffer):
        events.append(bytes(buffer[start : match.end()]))
        start = match.end()
    del buffer[:start]
    return events


def lines(event: bytes) -> list[bytes]:
    """The event's lines, whichever way they end (empty ones included)."""
    return _LINE_END.split(event)


def data(event: bytes) -> bytes | None:
    """The event's data: its ``data:`` lines' values joined by LF (one leading space
    dropped from each, as the format says), or ``None`` if it has none."""
    values = [_value(line[5:]) for line in lines(event) if line.startswith(b"data:")]
    return b"\n".join(values) if values else None


def _value(field: bytes) -> bytes:
    return field[1:] if field[:1] == b" " else field
