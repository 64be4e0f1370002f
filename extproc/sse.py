"""Server-sent events framing, for every reader of a streamed answer: where one event
ends, its lines, its data.

The format ends a line with CRLF, LF or CR, and an event with an empty line. Providers
send LF; a server behind another proxy may send CRLF, and the format allows CR alone. The
readers (usage, translation, output guardrails, MCP narrowing) split the same way, so
none of them sees an event another one missed. A stream's leading byte order mark is
dropped, as the format's UTF-8 decoding and the TypeScript SDKs' parser drop it: kept,
it would hide the first line's field from the readers, not from those clients.
"""

from __future__ import annotations

import re

_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
"""A line's end followed by an empty line's: any two of CRLF, LF and CR (a CRLF is one)."""
_LINE_END = re.compile(rb"\r\n|\n|\r")
_CR = 0x0D
_BOM = b"\xef\xbb\xbf"
MESSAGE = b"message"
"""The type of an event whose ``event`` field is absent or empty."""


class Events:
    """A stream's bytes as they arrive: its complete events out, the unfinished last one
    held. Each byte is searched once for an event's end: a large event arriving in small
    chunks is not searched again from its start with every chunk."""

    __slots__ = ("_begun", "_held", "_searched")

    def __init__(self) -> None:
        self._held = bytearray()
        self._searched = 0
        self._begun = False
        """Whether the stream's first bytes were seen (and a byte order mark dropped)."""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events ``chunk`` completes, each with the empty line that ends it (an event
        passed on unchanged keeps its bytes)."""
        held = self._held
        held += chunk
        if not self._begun and not self._begin():
            return []
        events: list[bytes] = []
        start = 0
        # An end that began in the last chunk: back up by one end's length less a byte.
        for match in _EVENT_END.finditer(held, max(0, self._searched - 3)):
            if match.end() == len(held) and held[-1] == _CR:
                break  # a CR last: the next chunk may start with the LF of its CRLF
            events.append(bytes(held[start : match.end()]))
            start = match.end()
        del held[:start]
        self._searched = len(held)
        return events

    def _begin(self) -> bool:
        """Drop the stream's leading byte order mark; ``False`` while the bytes so far may
        still be the start of one."""
        held = self._held
        if len(held) < len(_BOM) and _BOM.startswith(held):
            return False
        if held.startswith(_BOM):
            del held[: len(_BOM)]
        self._begun = True
        return True

    @property
    def held(self) -> int:
        """Bytes of the unfinished event."""
        return len(self._held)

    def rest(self) -> bytes:
        """The unfinished last event (the stream has ended), forgotten."""
        rest = bytes(self._held)
        self.clear()
        return rest

    def clear(self) -> None:
        self._held.clear()
        self._searched = 0


def lines(event: bytes) -> list[bytes]:
    """The event's lines, whichever way they end (empty ones included)."""
    return _LINE_END.split(event)


def name(event: bytes) -> bytes:
    """The type a client dispatches the event as: its last ``event`` field's value (a bare
    ``event`` line's is empty), :data:`MESSAGE` when that is empty or there is none.

    As the format says and the SDKs do: ``event: x`` then ``event: message``, or a bare
    ``event:``, is a ``message`` to them, and must be to every reader here too.
    """
    found = b""
    for line in lines(event):
        if line.startswith(b"event:"):
            found = _value(line[6:])
        elif line == b"event":
            found = b""
    return found or MESSAGE


def with_data(event: bytes, text: bytes) -> bytes:
    """``event`` with its data lines replaced by one carrying ``text``: every other line
    (``event``, ``id``, ``retry``, comments) kept as it came, in place and in the event's
    own line endings, so that each client reads the event's type as it did (the SDKs tell
    a missing ``event`` line from an empty one differently)."""
    newline = b"\r\n" if b"\r\n" in event else (b"\r" if b"\n" not in event else b"\n")
    kept: list[bytes] = []
    placed = False
    for line in lines(event):
        if not line:
            continue
        if line.startswith(b"data:") or line == b"data":
            if not placed:
                kept.append(b"data: " + text)
                placed = True
            continue
        kept.append(line)
    return newline.join(kept) + newline + newline


def data(event: bytes) -> bytes | None:
    """The event's data: its data fields' values joined by LF (one leading space dropped
    from each, as the format says; a bare ``data`` line's value is empty, as in
    :func:`with_data`), or ``None`` if it has none."""
    values: list[bytes] = []
    for line in lines(event):
        if line.startswith(b"data:"):
            values.append(_value(line[5:]))
        elif line == b"data":
            values.append(b"")
    return b"\n".join(values) if values else None


def _value(field: bytes) -> bytes:
    return field[1:] if field[:1] == b" " else field
