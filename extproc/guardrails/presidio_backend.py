"""Presidio's pattern recognizers, run only on small windows the prefilter chose.

Presidio's recognizers bring the domain knowledge (card number ranges and the Luhn check,
IBAN country formats and the mod-97 checksum, SSN invalidation rules, IPv6 forms), but
they use backtracking regexes (the ``regex`` module) and per-call overhead of tens of
microseconds. So each one is paired with an RE2 *trigger*, a generous shape of what it
can match; it runs only on windows around trigger matches (padded, merged, at most
:data:`MAX_WINDOW` characters each), which keeps its work proportional to the suspicious
part of a text and bounded on any input. Where a recognizer's patterns all compile with
RE2 and nothing checks a match (URLs), RE2 runs them instead of Presidio's engine: its URL
patterns backtrack for seconds on a few KB of ``www.a.a.a.…`` (Presidio's own timeout is
60 s a pattern), and findings are Presidio's all the same (its duplicate removal, its
scores).

Only the recognizer modules are imported (:mod:`extproc.guardrails.presidio_import`), when
the first PII rule is compiled, never at module import. Email validation uses tldextract's
bundled suffix list: the default extractor would try to download the list at run time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from extproc.guardrails.findings import Finding, merge_windows
from extproc.guardrails.linear import Regex, Utf8, compile_re2
from extproc.guardrails.presidio_import import core_class, pattern_class, recognizer_class

MAX_WINDOW = 2048
"""Characters a Presidio recognizer sees at once."""
_WIDEN = 32
"""How far a window edge moves to reach whitespace, so it does not cut a value."""


@dataclass(frozen=True, slots=True)
class _Spec:
    factory: str
    trigger: str
    pad: int
    upper: bool = False
    """Show the recognizer upper-cased text (its regex is case-sensitive, the format
    is not: ``gb82 west …`` is a valid IBAN)."""
    linear: bool = False
    """Run the recognizer's patterns with RE2 (:func:`_linear_patterns`)."""


SPECS: dict[str, _Spec] = {
    "EMAIL_ADDRESS": _Spec(
        "email",
        # A top-level domain has at least two letters.
        r"[\pL\pN_!#$%&'*+/=?^`{|}~-]@[\pL\pN_-]+(?:\.[\pL\pN_-]+)*\.\pL{2,}",
        80,
    ),
    "CREDIT_CARD": _Spec("credit_card", r"\d(?:[ -]?\d){11,18}", 8),
    "IBAN_CODE": _Spec("IbanRecognizer", r"(?i)[a-z]{2}\d{2}[ -]?[a-z0-9]{4}", 48, upper=True),
    "US_SSN": _Spec("UsSsnRecognizer", r"\d{3}[- .]?\d{2}[- .]?\d{4}", 8),
    "IP_ADDRESS": _Spec(
        "IpRecognizer",
        r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}",
        48,
    ),
    "URL": _Spec("UrlRecognizer", r"(?i)\b(?:https?://|ftp://|www\.)", 64, linear=True),
    "MAC_ADDRESS": _Spec(
        "MacAddressRecognizer",
        r"[0-9A-Fa-f]{2}[:-][0-9A-Fa-f]{2}[:-][0-9A-Fa-f]{2}|[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.",
        24,
    ),
    "CRYPTO": _Spec("CryptoRecognizer", r"\b(?:bc1|[13])[a-zA-HJ-NP-Z0-9]{25,}", 8),
    "US_ITIN": _Spec("UsItinRecognizer", r"9\d{2}[- ]?[5-9]\d[- ]?\d{4}", 8),
    "US_PASSPORT": _Spec("UsPassportRecognizer", r"\d{8,9}", 8),
    "US_BANK_NUMBER": _Spec("UsBankRecognizer", r"\d{8,17}", 8),
    "US_DRIVER_LICENSE": _Spec("UsLicenseRecognizer", r"\d{4,}", 16),
    "UK_NHS": _Spec("NhsRecognizer", r"\d{3}[- ]?\d{3}[- ]?\d{4}", 8),
}

_CARD_EXTENDED = (
    # Presidio's own card pattern covers 13-17 digit numbers starting 1, 3, 4, 5[0-5], 6.
    # Issuers also use 2221-2720 (Mastercard), 2131/1800 (JCB), 50/56-69 (Maestro) and
    # lengths 12-19; Luhn still has to pass.
    r"\b(?:4\d{3}|5\d{3}|2[2-7]\d{2}|6\d{3}|3\d{3}|1800|2131)(?:[- ]?\d){8,15}\b"
)


@functools.cache
def _offline_tld() -> Any:
    import tldextract

    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def _build(entity: str, factory: str) -> Any:
    if factory == "email":
        extract = _offline_tld()

        def validate_result(self: Any, pattern_text: str) -> bool:
            return bool(extract(pattern_text).fqdn)

        offline = type(
            "OfflineEmailRecognizer",
            (recognizer_class("EmailRecognizer"),),
            {"validate_result": validate_result},
        )
        return offline()
    if factory == "credit_card":
        base = recognizer_class("CreditCardRecognizer")
        patterns = [
            *base.PATTERNS,
            pattern_class()("Credit card (extended ranges)", _CARD_EXTENDED, 0.3),
        ]
        return base(patterns=patterns)
    return recognizer_class(factory)()


_LinearPattern = tuple[Regex, float]


def _linear_patterns(recognizer: Any) -> tuple[_LinearPattern, ...]:
    """The recognizer's patterns compiled by RE2, each with its score, with Presidio's
    flags (ignore case, dot matches newline, multi-line) and its ``\\s`` read as Python
    reads it, Unicode spaces included (RE2's is ASCII). Only for a recognizer that checks
    no match: RE2 cannot run its checks."""
    if _pattern_scores(recognizer) is None:
        raise ValueError(f"{type(recognizer).__name__} checks its matches: not linear")
    return tuple(
        (
            compile_re2("(?ms)" + p.regex.replace(r"[^\s", r"[^\s\pZ"), case_insensitive=True),
            p.score,
        )
        for p in recognizer.patterns
    )


def _pattern_scores(recognizer: Any) -> tuple[float, ...] | None:
    """The scores a recognizer that checks no candidate gives, lowest first (a checksum
    raises the score of one that does to 1.0, whatever its patterns say)."""
    kind = type(recognizer)
    base = next(c for c in kind.__mro__ if c.__name__ == "PatternRecognizer")
    if any(
        getattr(kind, m) is not getattr(base, m) for m in ("validate_result", "invalidate_result")
    ):
        return None
    return tuple(sorted(pattern.score for pattern in recognizer.patterns)) or None


@functools.cache
def presidio_recognizer(entity: str) -> PresidioRecognizer:
    """The shared recognizer for ``entity``: built and warmed once per process, reused by
    every rule and policy version (it holds no per-request state)."""
    return PresidioRecognizer(entity)


class PresidioRecognizer:
    """One Presidio recognizer behind an RE2 trigger."""

    __slots__ = (
        "_linear",
        "_pad",
        "_presidio",
        "_trigger",
        "_upper",
        "context",
        "entity",
        "pattern_scores",
        "trigger",
    )

    def __init__(self, entity: str) -> None:
        spec = SPECS[entity]
        self.entity = entity
        self.trigger = spec.trigger
        self._trigger: Regex = compile_re2(spec.trigger)
        self._pad = spec.pad
        self._upper = spec.upper
        self._presidio = _build(entity, spec.factory)
        self.context: tuple[str, ...] = tuple(self._presidio.context or ())
        self.pattern_scores = _pattern_scores(self._presidio)
        """The scores a candidate can have before context, lowest first; ``None`` when a
        checksum can raise them to 1.0."""
        self._linear = _linear_patterns(self._presidio) if spec.linear else None
        # Presidio compiles its regexes on first use; do it now, not on a request.
        self._presidio.analyze("warm up 4111 1111 1111 1111 a@example.com", [entity], None)

    def find(self, text: Utf8) -> list[Finding]:
        value = text.text
        spans = self._trigger.spans(text)
        if not spans:
            return []
        found: dict[tuple[int, int], Finding] = {}
        for lo, hi in merge_windows(spans, self._pad, len(value), MAX_WINDOW):
            lo, hi = _widen(value, lo, hi)
            window = value[lo:hi]
            if self._upper and window.isascii():
                window = window.upper()
            for result in self._analyze(window):
                start, end = result.start + lo, result.end + lo
                if result.score > 0 and (start, end) not in found:
                    found[(start, end)] = Finding(start, end, self.entity, float(result.score))
        return list(found.values())

    def _analyze(self, window: str) -> list[Any]:
        """Presidio's results for ``window``: from its engine, or from RE2 running its
        patterns, then its own duplicate removal (a match inside another of no lower
        score goes), as its engine does."""
        if self._linear is None:
            return list(self._presidio.analyze(window, [self.entity], None))
        result, recognizer = _result_classes()
        text = Utf8(window)
        found = [
            result(self.entity, start, end, score)
            for regex, score in self._linear
            for start, end in regex.spans(text)
            if end > start
        ]
        return list(recognizer.remove_duplicates(found))


@functools.cache
def _result_classes() -> tuple[Any, Any]:
    """Presidio's ``RecognizerResult`` and ``EntityRecognizer`` (its duplicate removal),
    looked up once, not for every window scanned."""
    return core_class("RecognizerResult"), core_class("EntityRecognizer")


def _widen(text: str, lo: int, hi: int) -> tuple[int, int]:
    """Move window edges outwards to whitespace (at most :data:`_WIDEN` characters)."""
    if lo > 0:
        floor = max(0, lo - _WIDEN)
        while lo > floor and not text[lo - 1].isspace():
            lo -= 1
    if hi < len(text):
        ceiling = min(len(text), hi + _WIDEN)
        while hi < ceiling and not text[hi].isspace():
            hi += 1
    return lo, hi
