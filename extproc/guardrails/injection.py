"""Prompt-injection and jailbreak detection, offline: normalise, decode, score.

A text is looked at in several *views*, each scanned once by one RE2 set holding every
signal pattern (:mod:`extproc.guardrails.injection_patterns`):

- the folded text (NFKD, case, look-alike letters, invisible characters, whitespace);
- its letters alone, when it contains letters spaced or punctuated apart;
- a leetspeak reading, when letters and digits are mixed inside words;
- its rot13 and reversed readings, when rot13'd or reversed attack words occur;
- base64 runs that decode to text (bounded in number and size).

Signals found in any view combine into one score in [0, 1]; the detector reports the
families of the signals that contributed when the score reaches the rule's threshold.
An optional :class:`Classifier` (a model you host in-process) can add its own score;
nothing is downloaded.
"""

from __future__ import annotations

import base64
import binascii
import codecs
from collections.abc import Iterator, Sequence
from typing import Protocol

from extproc.guardrails import injection_patterns as P
from extproc.guardrails.findings import Finding
from extproc.guardrails.linear import RegexSet, Utf8, compile_re2
from extproc.guardrails.normalize import collapse_whitespace, fold

MAX_DECODED = 16
"""Base64 runs decoded per text at most."""
MAX_DECODED_CHARS = 16 * 1024
"""Characters of one base64 run decoded at most."""


class Classifier(Protocol):
    """A plug-in scorer, e.g. a small fine-tuned model loaded by the operator.

    ``score`` returns the probability that ``text`` is an injection; it must be pure CPU
    and thread-safe (it is called from worker threads for large bodies).
    """

    def score(self, text: str) -> float: ...


_SPACED, _LEET, _ROT13, _REVERSED, _BASE64 = range(5)


class _Views:
    """The compiled matchers shared by every injection detector of a policy."""

    def __init__(self) -> None:
        self.index = [s for s in P.SIGNALS for _ in s.patterns]
        self.set = RegexSet([p for s in P.SIGNALS for p in s.patterns])
        self.squashed_index = [s for s in P.SQUASHED for _ in s.patterns]
        self.squashed = RegexSet([p for s in P.SQUASHED for p in s.patterns])
        # One pass tells which other readings of a text are worth building.
        self.hints = RegexSet(
            [P.SPACED_RUN, P.LEET_MIX, P.ROT13_HINTS, P.REVERSED_HINTS, P.BASE64_RUN.lower()]
        )
        self.base64 = compile_re2(P.BASE64_RUN)


_VIEWS: _Views | None = None


def _views() -> _Views:
    global _VIEWS
    if _VIEWS is None:
        _VIEWS = _Views()
    return _VIEWS


class InjectionDetector:
    """Scores texts; reports the contributing families when the score reaches threshold."""

    __slots__ = ("_classifier", "_decode", "_families", "_views", "threshold")

    def __init__(
        self,
        threshold: float,
        families: Sequence[str] | None = None,
        decode: bool = True,
        classifier: Classifier | None = None,
    ) -> None:
        self.threshold = threshold
        self._families = frozenset(families) if families is not None else None
        self._decode = decode
        self._classifier = classifier
        self._views = _views()

    def score(self, text: str) -> tuple[float, dict[str, float]]:
        """The combined score and, per family, the weight of its strongest signal."""
        signals: dict[str, P.Signal] = {}
        self._scan(text, signals, self._decode)
        if self._families is not None:
            signals = {k: s for k, s in signals.items() if s.family in self._families}
        remaining = 1.0
        families: dict[str, float] = {}
        for signal in signals.values():
            remaining *= 1.0 - signal.weight
            families[signal.family] = max(families.get(signal.family, 0.0), signal.weight)
        total = 1.0 - remaining
        if self._classifier is not None:
            model = float(self._classifier.score(text))
            if model > total:
                total = model
                families["classifier"] = model
        return total, families

    def detect(self, text: Utf8) -> list[Finding]:
        total, families = self.score(text.text)
        if total < self.threshold or not families:
            return []
        end = len(text.text)
        return [Finding(0, end, family, total) for family in sorted(families)]

    def _scan(self, text: str, signals: dict[str, P.Signal], decode: bool) -> None:
        views = self._views
        folded = collapse_whitespace(fold(text))
        data = Utf8(folded)
        self._match(views.set, views.index, data, signals)
        hints = views.hints.matches(data)
        if not hints:
            return
        if _SPACED in hints:
            letters = Utf8("".join(c for c in folded if "a" <= c <= "z"))
            self._match(views.squashed, views.squashed_index, letters, signals)
        if _LEET in hints:
            self._match(views.set, views.index, Utf8(folded.translate(P.LEET)), signals)
        if not decode:
            return
        if _ROT13 in hints:
            self._scan(codecs.decode(text, "rot13"), signals, False)
        if _REVERSED in hints:
            self._scan(text[::-1], signals, False)
        if _BASE64 in hints:
            for decoded in self._base64(text):
                self._scan(decoded, signals, False)

    @staticmethod
    def _match(
        regexes: RegexSet, index: list[P.Signal], data: Utf8, signals: dict[str, P.Signal]
    ) -> None:
        for i in regexes.matches(data):
            signal = index[i]
            signals.setdefault(signal.name, signal)

    def _base64(self, text: str) -> Iterator[str]:
        data = Utf8(text)
        count = 0
        for start, end in self._views.base64.byte_spans(data):
            if count >= MAX_DECODED:
                break
            decoded = _base64_text(data.data[start : min(end, start + MAX_DECODED_CHARS)])
            if decoded is not None:
                count += 1
                yield decoded


def _base64_text(run: bytes) -> str | None:
    """The text a base64 (or base64url) run encodes, if it is mostly printable text."""
    run = run.rstrip(b"=")
    run = run[: len(run) - len(run) % 4] if len(run) % 4 == 1 else run
    padded = run + b"=" * (-len(run) % 4)
    try:
        raw = (
            base64.urlsafe_b64decode(padded)
            if b"-" in run or b"_" in run
            else base64.b64decode(padded)
        )
        decoded = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    printable = sum(1 for c in decoded if c.isprintable() or c.isspace())
    if not decoded or printable < 0.9 * len(decoded) or " " not in decoded:
        return None
    return decoded
