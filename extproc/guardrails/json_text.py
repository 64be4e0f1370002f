"""Texts that are JSON source: tool-call arguments as OpenAI sends them, Anthropic's
``partial_json`` deltas.

Detectors read them as written, escapes included, so ``"Hi,\\njane@example.com"`` showed
them ``njane@example.com`` (an e-mail rewritten with the ``n``, which left ``\\<EMAIL>``: an
invalid escape the client's JSON parser refuses), and a card number at the start of a line
sat right after an ``n`` with no word boundary (never found). Here each two-character escape
reads as two spaces, so offsets still match the text, and no finding starts or ends inside
an escape (``\\u00e9`` stays as written; a finding is shrunk to end before it or to start
after it), so a rewrite always leaves valid JSON source.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from extproc.guardrails.findings import Finding

Span = tuple[int, int]

_UNICODE_ESCAPE = 6
"""``\\uXXXX``."""


def escapes(text: str) -> list[Span]:
    """The spans of ``text``'s escape sequences (none, cheaply, without a backslash)."""
    spans: list[Span] = []
    at = text.find("\\")
    while at >= 0:
        width = _UNICODE_ESCAPE if text.startswith("u", at + 1) else 2
        end = min(at + width, len(text))
        spans.append((at, end))
        at = text.find("\\", end)
    return spans


def blanked(text: str, spans: Sequence[Span]) -> str:
    """``text`` with every two-character escape read as two spaces (same offsets)."""
    pieces: list[str] = []
    last = 0
    for start, end in spans:
        if end - start == 2:
            pieces += (text[last:start], "  ")
            last = end
    pieces.append(text[last:])
    return "".join(pieces)


def outside(findings: list[Finding], spans: Sequence[Span]) -> list[Finding]:
    """``findings`` shrunk so that none starts or ends inside an escape (dropped when
    nothing is left)."""
    if not spans:
        return findings
    starts = [low for low, _ in spans]
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
        if start < end:
            kept.append(
                finding
                if (start, end) == (finding.start, finding.end)
                else Finding(start, end, finding.label, finding.score)
            )
    return kept
