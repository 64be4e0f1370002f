"""Content policy: deny/allow regexes, banned terms and topics.

- ``deny`` patterns are the policy author's RE2 regexes, matched on the text as written
  (case-insensitively unless the rule says otherwise); each is its own label
  (``deny[0]``, ``deny[1]``…) so a verdict says which one fired without quoting it.
- ``banned_terms`` and ``topics`` are words and phrases matched on whole words after
  folding (:func:`extproc.guardrails.normalize.fold`): full-width or mathematical
  letters, Cyrillic or Greek look-alikes, zero-width characters and case all fold away,
  so each spelling of ``bad`` matches ``bad``; ``badge`` does not. All terms of a
  rule are one RE2 alternation, so the cost does not grow with the list.
- ``allow`` patterns exempt what they match: a finding that overlaps an allowed span is
  dropped (``kill`` is denied, ``kill (the|a) process`` allowed).
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.guardrails.findings import Finding, resolve_overlaps
from extproc.guardrails.linear import Regex, Utf8, compile_re2
from extproc.guardrails.normalize import collapse_whitespace, fold, fold_with_offsets

_WORD_END = r"[\pL\pN_]"


@dataclass(frozen=True, slots=True)
class _Terms:
    regex: Regex
    """``(?:^|non-word)(term|term|…)``: group 1 is the term; its end is checked in Python."""
    labels: dict[str, str]
    word_char: Regex


class ContentDetector:
    __slots__ = ("_allow", "_deny", "_terms")

    def __init__(
        self,
        deny: list[str],
        allow: list[str],
        banned_terms: list[str],
        topics: dict[str, list[str]],
        case_sensitive: bool = False,
    ) -> None:
        insensitive = not case_sensitive
        self._deny = [compile_re2(p, case_insensitive=insensitive) for p in deny]
        self._allow = (
            compile_re2("|".join(f"(?:{p})" for p in allow), case_insensitive=insensitive)
            if allow
            else None
        )
        labels: dict[str, str] = {}
        for term in banned_terms:
            labels.setdefault(_key(term), "banned_term")
        for topic, terms in topics.items():
            for term in terms:
                labels.setdefault(_key(term), f"topic:{topic}")
        labels.pop("", None)
        self._terms = _compile_terms(labels) if labels else None

    def detect(self, text: Utf8) -> list[Finding]:
        found: list[Finding] = []
        for i, regex in enumerate(self._deny):
            found.extend(Finding(a, b, f"deny[{i}]", 1.0) for a, b in regex.spans(text) if a < b)
        if self._terms is not None:
            found.extend(self._term_findings(text.text, self._terms))
        if found and self._allow is not None:
            allowed = self._allow.spans(text)
            found = [f for f in found if not any(a < f.end and f.start < b for a, b in allowed)]
        return resolve_overlaps(found)

    @staticmethod
    def _term_findings(text: str, terms: _Terms) -> list[Finding]:
        # Cheap check on the folded text first; offsets are only tracked when it hits.
        if not terms.regex.search(Utf8(fold(text))):
            return []
        folded, origin = fold_with_offsets(text)
        data = Utf8(folded)
        found: list[Finding] = []
        for start, end in terms.regex.spans(data, group=1):
            if end < len(folded) and terms.word_char.fullmatch(folded[end]):
                continue  # "bad" inside "badge"
            label = terms.labels.get(" ".join(folded[start:end].split()))
            if label is None:
                continue
            if origin is None:
                found.append(Finding(start, end, label, 1.0))
            else:
                found.append(Finding(origin[start], origin[end - 1] + 1, label, 1.0))
        return found


def _key(term: str) -> str:
    return collapse_whitespace(fold(term))


def _compile_terms(labels: dict[str, str]) -> _Terms:
    alternatives = []
    for term in sorted(labels, key=len, reverse=True):  # longest first: "bad word" before "bad"
        alternatives.append(r"\s+".join(_escape(word) for word in term.split(" ")))
    pattern = rf"(?:^|[^\pL\pN_])({'|'.join(alternatives)})"
    return _Terms(compile_re2(pattern), labels, compile_re2(_WORD_END))


def _escape(word: str) -> str:
    return "".join(f"\\x{{{ord(c):x}}}" if not c.isalnum() else c for c in word)
