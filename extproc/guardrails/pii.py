"""PII and secrets detection: one prefilter pass, then only the recognizers it points at.

Every recognizer of a detector contributes its RE2 trigger to one :class:`RegexSet`; a
text is scanned once and, when nothing matches (the common case: a few microseconds per
KB), the detector is done. Otherwise only the recognizers whose triggers matched run.
Their candidates then go through the per-entity policy: context words nearby raise the
score (as Presidio's context enhancer does, which cannot work without an NLP model),
allow-listed values are dropped, scores under the entity's threshold are dropped, and
overlapping candidates keep the best one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.guardrails.findings import Finding, resolve_overlaps
from extproc.guardrails.linear import RegexSet, Utf8
from extproc.guardrails.recognizers import Recognizer

CONTEXT_BEFORE = 40
CONTEXT_AFTER = 20
CONTEXT_BOOST = 0.35
"""Presidio's default context similarity factor."""
CONTEXT_FLOOR = 0.4
"""Presidio's minimum score once a context word is found."""

_WORDS = re.compile(r"[^\W\d_]+")  # runs of letters: linear, no nested quantifiers


@dataclass(frozen=True, slots=True)
class EntityPolicy:
    """How candidates of one entity are judged within one detector."""

    threshold: float
    allow: frozenset[str]
    """Lower-cased values never reported."""
    context_words: frozenset[str]
    context_phrases: tuple[str, ...]


def entity_policy(threshold: float, allow: Sequence[str], context: Sequence[str]) -> EntityPolicy:
    words = [c.strip().lower() for c in context if c.strip()]
    return EntityPolicy(
        threshold=threshold,
        allow=frozenset(v.strip().lower() for v in allow),
        context_words=frozenset(w for w in words if _WORDS.fullmatch(w)),
        context_phrases=tuple(w for w in words if not _WORDS.fullmatch(w)),
    )


class EntityScanner:
    """Finds a fixed set of entities in texts, each judged by its :class:`EntityPolicy`."""

    __slots__ = ("_policies", "_prefilter", "_recognizers", "entities")

    def __init__(
        self, recognizers: Sequence[Recognizer], policies: dict[str, EntityPolicy]
    ) -> None:
        self._recognizers = tuple(recognizers)
        self._policies = policies
        self._prefilter = RegexSet([r.trigger for r in recognizers])
        self.entities = frozenset(r.entity for r in recognizers)

    def detect(self, text: Utf8) -> list[Finding]:
        hits = self._prefilter.matches(text)
        if not hits:
            return []
        kept: list[Finding] = []
        for index in sorted(hits):
            for finding in self._recognizers[index].find(text):
                judged = self._judge(text.text, finding)
                if judged is not None:
                    kept.append(judged)
        return resolve_overlaps(kept)

    def _judge(self, text: str, finding: Finding) -> Finding | None:
        policy = self._policies[finding.label]
        score = finding.score
        if score < 1.0 and _has_context(text, finding, policy):
            score = with_context(score)
        if score < policy.threshold:
            return None
        if policy.allow and text[finding.start : finding.end].strip().lower() in policy.allow:
            return None
        if score == finding.score:
            return finding
        return Finding(finding.start, finding.end, finding.label, score)


def with_context(score: float) -> float:
    """A candidate's score once a context word is near it."""
    return min(1.0, max(score + CONTEXT_BOOST, CONTEXT_FLOOR))


def _has_context(text: str, finding: Finding, policy: EntityPolicy) -> bool:
    if not policy.context_words and not policy.context_phrases:
        return False
    before = text[max(0, finding.start - CONTEXT_BEFORE) : finding.start]
    after = text[finding.end : finding.end + CONTEXT_AFTER]
    window = f"{before} {after}".lower()
    if policy.context_words and not policy.context_words.isdisjoint(_WORDS.findall(window)):
        return True
    return any(phrase in window for phrase in policy.context_phrases)
