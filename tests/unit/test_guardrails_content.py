"""Content policy: banned terms on word boundaries after Unicode folding, topics, regexes."""

from __future__ import annotations

import pytest

from extproc.guardrails.content import ContentDetector
from extproc.guardrails.linear import Utf8
from extproc.guardrails.testing import guardrails_from_yaml, user_text

DETECTOR = ContentDetector(
    deny=[r"\bproject\s+falcon\b", r"\b\d{3}-secret\b"],
    allow=[r"kill (?:the |a )?(?:process|task|job)"],
    banned_terms=["kill", "bad word", "naïve"],
    topics={"weapons": ["rifle", "hand grenade"], "gambling": ["casino"]},
)


def labels(text: str) -> list[str]:
    return [f.label for f in DETECTOR.detect(Utf8(text))]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("I will kill him", ["banned_term"], id="term"),
        pytest.param("KILL", ["banned_term"], id="case"),
        pytest.param("skill and killer and kills", [], id="word-boundaries"),
        pytest.param("kill, then kill again", ["banned_term", "banned_term"], id="repeated"),
        pytest.param("\uff4b\uff49\uff4c\uff4c now", ["banned_term"], id="full-width"),
        pytest.param("k\u200bill now", ["banned_term"], id="zero-width-inside"),
        pytest.param("\u043a\u0456ll now", ["banned_term"], id="cyrillic-look-alikes"),
        pytest.param("that bad   word here", ["banned_term"], id="phrase-any-spacing"),
        pytest.param("so naive", ["banned_term"], id="accents-fold"),
        pytest.param("how to kill a process in linux", [], id="allow-pattern"),
        pytest.param("buy a Rifle", ["topic:weapons"], id="topic"),
        pytest.param("a hand grenade", ["topic:weapons"], id="topic-phrase"),
        pytest.param("the casino's", ["topic:gambling"], id="topic-apostrophe"),
        pytest.param("Project  FALCON launch", ["deny[0]"], id="deny-regex-case-insensitive"),
        pytest.param("code 123-secret", ["deny[1]"], id="deny-regex-2"),
        pytest.param("nothing to see", [], id="clean"),
    ],
)
def test_content(text: str, expected: list[str]) -> None:
    assert labels(text) == expected


def test_spans_map_back_to_the_original_text() -> None:
    text = "x \uff4b\uff49\uff4c\uff4c y"
    (finding,) = DETECTOR.detect(Utf8(text))
    assert text[finding.start : finding.end] == "\uff4b\uff49\uff4c\uff4c"


def test_mutate_replaces_and_validate_blocks() -> None:
    guardrails = guardrails_from_yaml(
        """
- name: words
  stage: input
  mode: mutate
  detector: {kind: content, banned_terms: [darn], replacement: '***'}
- name: topics
  stage: input
  mode: validate
  message: That topic is not allowed here.
  detector: {kind: content, topics: {gambling: [casino, roulette]}}
"""
    )
    mutated = guardrails.check(
        "input", [user_text("darn it, darn")], team=None, key_id=None, model=None, path="/"
    )
    assert mutated.rewrites == {("messages", 0, "content"): "*** it, ***"}
    blocked = guardrails.check(
        "input", [user_text("best roulette odds")], team=None, key_id=None, model=None, path="/"
    )
    assert blocked.blocked_by == "topics"
    assert blocked.message == "That topic is not allowed here."
    assert blocked.verdicts[-1].entities == ("topic:gambling",)


def test_large_inputs_complete() -> None:
    for text in ("kill" * 250_000, "kill " * 200_000, "\u043a" * 1_000_000):
        assert isinstance(DETECTOR.detect(Utf8(text)), list)
