"""Texts that are JSON source: tool-call arguments as OpenAI sends them, Anthropic's
``partial_json`` deltas.

Detectors read them as written, escapes included, so ``"Hi,\\njane@example.com"`` showed
them ``njane@example.com`` (an e-mail rewritten with the ``n``, which left ``\\<EMAIL>``: an
invalid escape the client's JSON parser refuses), and a card number at the start of a line
sat right after an ``n`` with no word boundary (never found). Here each two-character escape
reads as two spaces, so offsets still match the text, and no finding starts or ends inside
an escape (``\\u00e9`` stays as written; a finding is shrunk to end before it or to start
after it). Nor does a finding take in a quote that opens or closes a string (Presidio's
"quoted URL" takes the quotes around it, a content pattern such as ``password\\S*`` runs
on past its string): it is shrunk to the string it starts in. So a rewrite always leaves
valid JSON source.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from collections.abc import Sequence

from extproc.dialects.base import TextPart
from extproc.guardrails.findings import Finding

Span = tuple[int, int]

_UNICODE_ESCAPE = 6
"""``\\uXXXX``."""
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
"""A JSON number, as a member's bare value starts."""


def escapes(text: str) -> list[Span]:
    """The spans of ``text``'s escape sequences, and of its quotes (one character each:
    those that open and close strings; a quote inside a string is escaped), in order."""
    spans: list[Span] = []
    at = text.find("\\")
    while at >= 0:
        width = _UNICODE_ESCAPE if text.startswith("u", at + 1) else 2
        end = min(at + width, len(text))
        spans.append((at, end))
        at = text.find("\\", end)
    quotes = _quotes(text, spans)
    return sorted(spans + quotes) if spans and quotes else spans or quotes


def _quotes(text: str, escaped: Sequence[Span]) -> list[Span]:
    """The quotes of ``text`` outside its escapes."""
    found: list[Span] = []
    inside = {low + 1 for low, high in escaped if high - low == 2}
    at = text.find('"')
    while at >= 0:
        if at not in inside:
            found.append((at, at + 1))
        at = text.find('"', at + 1)
    return found


_ESCAPED_BY_ENCODERS = frozenset("\"\\<>&'=+`")
"""Printable ASCII some encoders do write as ``\\uXXXX`` (Go: ``<``, ``>``, ``&``; Gson
also ``=`` and ``'``; .NET also ``+`` and a backtick; PHP quotes), or that would change how
the rest reads (a backslash)."""


def _plain_escape(text: str, low: int, high: int) -> str | None:
    """The printable ASCII character a ``\\uXXXX`` escape spells, unless some encoder
    escapes it: only text hiding from a reader spells the rest that way (``\\u0020``,
    ``\\u002d``, ``\\u0049``)."""
    if high - low != _UNICODE_ESCAPE or text[low + 1] != "u":
        return None
    try:
        char = chr(int(text[low + 2 : high], 16))
    except ValueError:
        return None
    plain = char.isascii() and char.isprintable() and char not in _ESCAPED_BY_ENCODERS
    return char if plain else None


def with_decoded(texts: Sequence[TextPart]) -> Sequence[TextPart]:
    """``texts``, and for each JSON source that spells plain ASCII as ``\\uXXXX``
    escapes (``\\u0049gnore``, ``jane\\u0040example.com``, ``212\\u002d555``), that
    text with them decoded, locked (findings in it have no place to be rewritten: a rule that would
    rewrite one blocks). No encoder escapes those (:func:`_plain_escape`); a model reads
    ``\\u0049gnore`` as ``Ignore``, and the detectors, which read escapes as written,
    did not."""
    added: list[TextPart] = []
    for part in texts:
        if part.json_source:
            decoded = plain_decoded(part.text)
            if decoded is not part.text:
                added.append(dataclasses.replace(part, text=decoded, locked=True))
    return (*texts, *added) if added else texts


def plain_decoded(text: str) -> str:
    """JSON source ``text`` with the escapes :func:`_plain_escape` decodes decoded (the
    same object when there are none)."""
    if "\\u" not in text:
        return text
    last = 0
    pieces: list[str] = []
    for low, high in escapes(text):
        char = _plain_escape(text, low, high)
        if char is not None:
            pieces += (text[last:low], char)
            last = high
    if not pieces:
        return text
    pieces.append(text[last:])
    return "".join(pieces)


def blanked(text: str, spans: Sequence[Span]) -> str:
    """``text`` with every two-character escape read as two spaces (same offsets; its
    quotes stay)."""
    pieces: list[str] = []
    last = 0
    for start, end in spans:
        if end - start == 2:
            pieces += (text[last:start], "  ")
            last = end
    pieces.append(text[last:])
    return "".join(pieces)


def outside(findings: list[Finding], spans: Sequence[Span], text: str) -> list[Finding]:
    """``findings`` shrunk so that none starts or ends inside an escape, nor takes in a
    quote (from :func:`escapes`): the quotes a finding starts with are left out, and one
    that crosses from a string into another is split into its parts inside them
    (:func:`_in_strings`; dropped when nothing is left). Told by the quotes alone, not by
    counting them, since a stream's window may begin inside a string."""
    if not spans:
        return findings
    starts = [low for low, _ in spans]
    quoted = quotes(spans)
    kept: list[Finding] = []
    for finding in findings:
        start, end = finding.start, finding.end
        # The one escape each offset may fall in: the last that starts before it.
        low, high = spans[max(bisect.bisect_left(starts, start) - 1, 0)]
        if low < start < high:
            start = high
        low, high = spans[max(bisect.bisect_left(starts, end) - 1, 0)]
        if low < end < high:
            end = low
        pieces = _in_strings(start, end, quoted, text)
        if pieces == [(finding.start, finding.end)]:
            kept.append(finding)
        else:
            kept.extend(Finding(low, high, finding.label, finding.score) for low, high in pieces)
    return kept


def quotes(spans: Sequence[Span]) -> list[int]:
    """Where the quotes among :func:`escapes`' ``spans`` stand (those that open and close
    strings), in order: worked out once a text, for each of its findings."""
    return [low for low, high in spans if high - low == 1]


def in_structure(finding: Finding, quoted: Sequence[int]) -> bool:
    """Whether ``finding``, in a whole JSON source whose :func:`quotes` are ``quoted``,
    lies outside every string: a number (a phone number written ``2125551234``), which a
    rewrite would leave no JSON (so a rule that would rewrite it blocks). Only for a whole
    text: a stream's window may begin inside a string. A text without quotes is taken
    for what a model sometimes writes instead of JSON (arguments are objects, which
    have), and is rewritten as text."""
    return bool(quoted) and bisect.bisect_right(quoted, finding.start) % 2 == 0


def _in_strings(start: int, end: int, quotes: Sequence[int], text: str) -> list[Span]:
    """The parts of ``start:end`` a rewrite may take: from ``start`` (past the quote it
    may start with) to the string's close; and, when the finding runs on from a member's
    name into its value (``password": "hunter2``, across a ``:`` alone), the value's part
    too, a string's (inside its quotes) or a number's (rewritten, it is no JSON, which
    :func:`in_structure` tells). Cut at the name, the value (a secret) went on unmasked.
    Past a ``,`` the finding ran into the next member, and an object, an array, ``true``,
    ``false`` or ``null`` has no place for a rewrite: no part of it is taken."""
    at = bisect.bisect_left(quotes, start)
    if at < len(quotes) and quotes[at] == start:
        start, at = start + 1, at + 1  # an opening quote: the string starts after it
    stop = quotes[at] if at < len(quotes) and quotes[at] < end else end
    pieces = [(start, stop)] if start < stop else []
    if stop == end:
        return pieces
    following = quotes[at + 1] if at + 1 < len(quotes) and quotes[at + 1] < end else end
    between = text[stop + 1 : following]
    name_end, colon, value = between.partition(":")
    if not colon or name_end.strip():
        return pieces  # no value of this member follows: the finding ran into structure
    if following < end and not value.strip():  # a string value: its inside, up to the end
        close = quotes[at + 2] if at + 2 < len(quotes) and quotes[at + 2] < end else end
        if following + 1 < close:
            pieces.append((following + 1, close))
        return pieces
    number = _NUMBER.match(value.lstrip())
    if number is not None:  # a bare number (what follows it is the next member's)
        value_start = stop + 1 + len(name_end) + 1 + len(value) - len(value.lstrip())
        pieces.append((value_start, min(value_start + number.end(), end)))
    return pieces  # an object, an array, true, false, null: no place for a rewrite
