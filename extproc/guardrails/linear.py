"""Linear-time regular expressions: RE2, compiled once, run on UTF-8 bytes.

Every pattern the guardrails run, ours and the policy author's, is an RE2 pattern, so a
prompt can never make matching super-linear (no backtracking, no catastrophic inputs).
Patterns from a policy that RE2 cannot compile (backreferences, lookaround, possessive
quantifiers) are rejected at load with RE2's own reason.

The ``re2`` wrapper encodes a ``str`` to UTF-8 on every call and maps offsets back with
Python code per match; here a text is encoded once (:class:`Utf8`) and shared by every
detector, and byte offsets become character offsets in one pass only when the text is
not ASCII.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import re2

MAX_PROGRAM_BYTES = 8 << 20
"""RE2 memory budget per pattern; a policy pattern needing more is rejected at load."""


class PatternError(ValueError):
    """A pattern RE2 cannot compile; the message says why and never runs the pattern."""


def _options(*, case_insensitive: bool = False) -> Any:
    options = re2.Options()
    options.log_errors = False
    options.max_mem = MAX_PROGRAM_BYTES
    options.case_sensitive = not case_insensitive
    return options


def compile_re2(pattern: str, *, case_insensitive: bool = False) -> Regex:
    """Compile ``pattern`` with RE2 or raise :class:`PatternError` naming the reason."""
    try:
        compiled = re2.compile(pattern, _options(case_insensitive=case_insensitive))
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "invalid pattern"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(
            f"RE2 cannot compile {pattern!r}: {reason} (guardrail patterns must run in "
            "linear time, so backreferences, lookaround and possessive quantifiers are "
            "not supported)"
        ) from None
    return Regex(compiled)


class Regex:
    """One compiled RE2 pattern, matched against :class:`Utf8` texts."""

    __slots__ = ("_re",)

    def __init__(self, compiled: Any) -> None:
        self._re = compiled

    @property
    def groups(self) -> int:
        return int(self._re.groups)

    def search(self, text: Utf8, start: int = 0, end: int | None = None) -> bool:
        """Whether the pattern matches anywhere in ``text.data[start:end]`` (byte offsets)."""
        stop = len(text.data) if end is None else end
        return self._re.search(text.data, start, stop) is not None

    def byte_spans(
        self, text: Utf8, group: int = 0, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, int]]:
        """Byte spans of ``group`` for each non-overlapping match, left to right."""
        stop = len(text.data) if end is None else end
        for match in self._re.finditer(text.data, start, stop):
            span = match.span(group)
            if span[0] >= 0:
                yield span

    def spans(self, text: Utf8, group: int = 0) -> list[tuple[int, int]]:
        """Character spans of ``group`` for each match."""
        return text.char_spans(list(self.byte_spans(text, group)))

    def fullmatch(self, value: str) -> bool:
        return self._re.fullmatch(value) is not None


class RegexSet:
    """Many patterns matched in one pass: which of them occur anywhere in a text.

    This is the prefilter: clean text costs one scan (a few microseconds per KB) and
    only the detectors whose patterns occur run at all.
    """

    __slots__ = ("_set", "size")

    def __init__(self, patterns: Sequence[str]) -> None:
        self.size = len(patterns)
        self._set = re2.Set.SearchSet(_options())
        for pattern in patterns:
            try:
                self._set.Add(pattern)
            except re2.error as exc:
                raise PatternError(f"RE2 cannot add {pattern!r} to a set: {exc}") from None
        self._set.Compile()

    def matches(self, text: Utf8) -> frozenset[int]:
        """Indices of the patterns that match somewhere in ``text``."""
        if not self.size:
            return frozenset()
        found = self._set.Match(text.data)
        return frozenset(found) if found else frozenset()


class Utf8:
    """A text with its UTF-8 encoding, computed once and shared by every detector."""

    __slots__ = ("data", "is_ascii", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.is_ascii = text.isascii()
        self.data = text.encode("utf-8", "surrogatepass")

    def char_spans(self, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Convert byte spans to character spans (one pass over the sorted offsets)."""
        if self.is_ascii or not spans:
            return list(spans)
        table = self.char_offsets(offset for span in spans for offset in span)
        return [(table[a], table[b]) for a, b in spans]

    def char_offsets(self, offsets: Iterable[int]) -> dict[int, int]:
        """Map byte offsets (on character boundaries) to character offsets."""
        ordered = sorted(set(offsets))
        if self.is_ascii:
            return {offset: offset for offset in ordered}
        table: dict[int, int] = {}
        last_byte = last_char = 0
        for offset in ordered:
            last_char += len(self.data[last_byte:offset].decode("utf-8", "surrogatepass"))
            last_byte = offset
            table[offset] = last_char
        return table


def glob_to_re2(glob: str) -> str:
    """Translate a shell glob (``*``, ``?``, ``[abc]``) into an anchored RE2 pattern."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        char = glob[i]
        i += 1
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[":
            close = glob.find("]", i + 1 if i < n and glob[i] in "!]" else i)
            if close < 0:
                out.append(re2.escape("["))
                continue
            body = glob[i:close].replace("\\", "\\\\")
            i = close + 1
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
        else:
            out.append(re2.escape(char))
    return "(?s:" + "".join(out) + ")"


class GlobSet:
    """Shell globs matched against names and paths (linear time, anchored)."""

    __slots__ = ("_regex",)

    def __init__(self, globs: Sequence[str]) -> None:
        self._regex = compile_re2("|".join(glob_to_re2(glob) for glob in globs)) if globs else None

    def __bool__(self) -> bool:
        return self._regex is not None

    def matches(self, value: str) -> bool:
        return self._regex is not None and self._regex.fullmatch(value)
