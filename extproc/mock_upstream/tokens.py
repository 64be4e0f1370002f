"""The mock's tokenizer: deterministic, lossless and simple enough to compute in a test.

Real tokenizers are large, versioned and differ per provider; the mock only needs counts that
a test (or the gateway's own estimator) can predict exactly. The rule:

    a *piece* is optional leading whitespace followed by a run of non-whitespace
    (``"  foo"``), and whitespace at the very end of the text is one more piece of its own.

So ``"".join(split(text)) == text`` for every string, the pieces of an echo can be streamed one
per SSE event and still concatenate to the exact input, and truncating to *n* tokens is
``"".join(split(text)[:n])``. "Whitespace" is Python's Unicode ``\\s`` (``str.isspace``).

The empty string has **zero** pieces: counts are the plain number of pieces, with no minimum
and no per-message overhead, so a request's prompt tokens are just the sum over its texts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Possessive ``\s*+`` (Python 3.11+) never backtracks, so splitting stays linear even for long
# runs of trailing whitespace; the ``\s+`` branch only ever matches at the end of the text.
_PIECE = re.compile(r"\s*+\S+|\s+")


def split(text: str) -> list[str]:
    """Split ``text`` into pieces whose concatenation is ``text`` exactly."""
    return _PIECE.findall(text)


def count(text: str) -> int:
    """Number of pieces (tokens) in ``text``; 0 for the empty string."""
    return len(_PIECE.findall(text)) if text else 0


def count_all(texts: Iterable[str]) -> int:
    """Token count of a whole request: the plain sum over each text it carries."""
    return sum(count(text) for text in texts)


def truncate(text: str, limit: int | None) -> tuple[list[str], bool]:
    """The pieces of ``text`` an answer limited to ``limit`` tokens returns.

    Returns ``(pieces, truncated)``; ``truncated`` is true only when pieces were dropped, so an
    echo that exactly fits the limit still finishes with "stop" like a real model would.
    """
    pieces = split(text)
    if limit is None or len(pieces) <= limit:
        return pieces, False
    return pieces[:limit], True
