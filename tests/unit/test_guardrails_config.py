"""Guardrail rules in the policy: precise validation errors, and compile-time secrets."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from extproc.guardrails import (
    GuardrailConfigError,
    GuardrailRule,
    GuardrailSettings,
    compile_guardrails,
    guardrail_problems,
)
from extproc.guardrails.config import HashOperator, MaskOperator, PiiDetector, SecretsDetector
from extproc.guardrails.entities import DEFAULT_SECRETS


def rule(text: str) -> GuardrailRule:
    return GuardrailRule.model_validate(yaml.safe_load(text))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param(
            "{name: r, stage: input, mode: validate, detector: {kind: pii, entities: [EMAIL]}}",
            "unknown entity 'EMAIL'; known:",
            id="unknown-entity",
        ),
        pytest.param(
            "{name: r, stage: input, mode: validate, detector: {kind: pii, entities: [PERSON]}}",
            "PERSON needs an NLP model",
            id="nlp-entity",
        ),
        pytest.param(
            r"{name: r, stage: input, mode: validate, detector: {kind: content, deny: ['(a)\1']}}",
            "RE2 cannot compile '(a)\\\\1': invalid escape sequence: \\1",
            id="backreference",
        ),
        pytest.param(
            "{name: r, stage: input, mode: validate, detector: {kind: content, deny: ['(?<=a)b']}}",
            "lookaround",
            id="lookbehind",
        ),
        pytest.param(
            "{name: r, stage: input, mode: mutate, detector: {kind: injection}}",
            "an injection cannot be rewritten away",
            id="mutate-injection",
        ),
        pytest.param(
            "{name: r, stage: sideways, mode: audit, detector: {kind: injection}}",
            "stage",
            id="bad-stage",
        ),
        pytest.param(
            "{name: r, stage: input, mode: audit, detector: {kind: injection, treshold: 0.3}}",
            "treshold",
            id="typo-is-an-error",
        ),
        pytest.param(
            "{name: r, stage: input, mode: audit, detector: {kind: content}}",
            "needs deny patterns, banned_terms or topics",
            id="empty-content",
        ),
        pytest.param(
            "{name: r, stage: input, mode: audit, detector: {kind: secrets, types: [AWS]}}",
            "unknown secret type 'AWS'",
            id="unknown-secret",
        ),
        pytest.param(
            "{name: r, stage: input, mode: audit, detector: {kind: pii,"
            " entities: [EMAIL_ADDRESS, EMAIL_ADDRESS]}}",
            "'EMAIL_ADDRESS' is listed twice",
            id="duplicate-entity",
        ),
        pytest.param(
            "{name: r, stage: input, mode: audit, detector: {kind: pii, entities: [US_SSN],"
            " operator: {type: mask, masking_char: '**'}}}",
            "masking_char",
            id="mask-char-length",
        ),
    ],
)
def test_invalid_rules_name_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        rule(text)
    assert fragment in str(caught.value)


def test_shorthands_expand() -> None:
    parsed = rule(
        "{name: r, stage: both, mode: mutate, detector: {kind: pii, operator: mask,"
        " entities: [EMAIL_ADDRESS, {type: CREDIT_CARD, operator: hash, action: block}]}}"
    )
    detector = parsed.detector
    assert isinstance(detector, PiiDetector)
    assert isinstance(detector.operator, MaskOperator)
    assert detector.entities[0].type == "EMAIL_ADDRESS"
    assert isinstance(detector.entities[1].operator, HashOperator)
    assert detector.entities[1].action == "block"


def test_secrets_default_to_every_type_but_assignments() -> None:
    detector = rule("{name: s, stage: input, mode: audit, detector: {kind: secrets}}").detector
    assert isinstance(detector, SecretsDetector)
    assert tuple(t.type for t in detector.types) == DEFAULT_SECRETS
    assert "ASSIGNED_SECRET" not in DEFAULT_SECRETS


def test_cross_field_problems() -> None:
    rules = [
        rule("{name: a, stage: input, mode: audit, detector: {kind: injection}}"),
        rule("{name: a, stage: input, mode: audit, detector: {kind: injection}}"),
        rule(
            "{name: h, stage: input, mode: mutate, detector: {kind: pii, entities: [US_SSN],"
            " operator: hash}}"
        ),
    ]
    problems = guardrail_problems(rules, GuardrailSettings())
    assert "guardrails[1].name: 'a' is listed twice" in problems
    assert any("guardrails[2].detector.operator: hash needs salt_env" in p for p in problems)
    with pytest.raises(GuardrailConfigError, match="listed twice"):
        compile_guardrails(rules)


HASHING = (
    "{name: h, stage: input, mode: mutate, detector: {kind: pii, entities: [US_SSN],"
    " operator: {type: hash, salt_env: SALT}}}"
)


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        pytest.param({}, "environment variable SALT (the hash salt) is not set", id="missing"),
        pytest.param({"SALT": "short"}, "at least 16 bytes", id="too-short"),
    ],
)
def test_operator_secrets_are_checked_at_compile(environ: dict[str, str], fragment: str) -> None:
    with pytest.raises(GuardrailConfigError, match=r"guardrails\[0\] \(h\): ") as caught:
        compile_guardrails([rule(HASHING)], environ=environ)
    assert fragment in str(caught.value)
    for secret in environ.values():
        assert secret not in str(caught.value)  # never echo the secret


def test_unknown_classifier_is_a_compile_error() -> None:
    parsed = rule(
        "{name: c, stage: input, mode: audit, detector: {kind: injection, classifier: m}}"
    )
    with pytest.raises(GuardrailConfigError, match="no classifier named 'm'"):
        compile_guardrails([parsed])


def test_json_schema_is_generated() -> None:
    schema = GuardrailRule.model_json_schema()
    assert {"pii", "secrets", "injection", "content"} <= set(
        schema["properties"]["detector"]["discriminator"]["mapping"]
    )
