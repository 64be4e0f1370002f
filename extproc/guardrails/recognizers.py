"""Recognizers: one entity type each, found with RE2 and confirmed by a validator.

A recognizer declares a *trigger* (an RE2 pattern the prefilter set runs on every text)
and finds its entity only in texts where the trigger matched. Our own recognizers
(secrets, phone numbers, custom entities) use their full pattern as the trigger and run
it over the whole text: RE2 is linear, so there is nothing to bound. Presidio's
recognizers (:mod:`extproc.guardrails.presidio_backend`) use backtracking regexes and are
only run on bounded windows around trigger matches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from extproc.guardrails.findings import Finding
from extproc.guardrails.linear import Regex, Utf8, compile_re2

Validator = Callable[[str, str, int, int], float | None]
"""(value, whole text, start, end) → the score, or ``None`` to reject the candidate."""


class Recognizer(Protocol):
    entity: str
    trigger: str
    """RE2 pattern: where it does not match, :meth:`find` would find nothing."""
    context: tuple[str, ...]
    """Words that, near a candidate, raise its confidence."""

    def find(self, text: Utf8) -> list[Finding]:
        """Candidates in ``text`` (before context, allow-lists and thresholds)."""
        ...


@dataclass(frozen=True, slots=True)
class Re2Recognizer:
    """An entity found by one RE2 pattern, optionally confirmed by a validator."""

    entity: str
    pattern: str
    score: float
    context: tuple[str, ...] = ()
    group: int = 0
    """The capture group holding the value (e.g. the token after ``Bearer``)."""
    validator: Validator | None = None
    case_insensitive: bool = False

    @property
    def trigger(self) -> str:
        return f"(?i:{self.pattern})" if self.case_insensitive else self.pattern

    def compiled(self) -> CompiledRe2Recognizer:
        regex = compile_re2(self.pattern, case_insensitive=self.case_insensitive)
        return CompiledRe2Recognizer(self, regex)


class CompiledRe2Recognizer:
    __slots__ = ("_regex", "_spec", "context", "entity", "trigger")

    def __init__(self, spec: Re2Recognizer, regex: Regex) -> None:
        self._spec = spec
        self._regex = regex
        self.entity = spec.entity
        self.trigger = spec.trigger
        self.context = spec.context

    def find(self, text: Utf8) -> list[Finding]:
        spec = self._spec
        found: list[Finding] = []
        for start, end in self._regex.spans(text, spec.group):
            if start == end:
                continue
            score: float | None = spec.score
            if spec.validator is not None:
                score = spec.validator(text.text[start:end], text.text, start, end)
            if score is not None and score > 0:
                found.append(Finding(start, end, spec.entity, score))
        return found
