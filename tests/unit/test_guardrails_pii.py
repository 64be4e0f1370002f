"""PII and secrets: what is found, what is not, and how each operator rewrites it."""

from __future__ import annotations

import hashlib

import pytest

from extproc.guardrails import Guardrails, GuardResult, decrypt
from extproc.guardrails.linear import Utf8
from extproc.guardrails.presidio_backend import presidio_recognizer
from extproc.guardrails.testing import guardrails_from_yaml, user_text

ENTITIES = "[EMAIL_ADDRESS, CREDIT_CARD, IBAN_CODE, US_SSN, IP_ADDRESS, PHONE_NUMBER]"
SALT = "a-salt-of-sixteen-bytes"
KEY = "0123456789abcdef"  # 128-bit AES key


@pytest.fixture(scope="module")
def audit() -> Guardrails:
    return guardrails_from_yaml(
        f"""
- name: pii
  stage: both
  mode: audit
  detector: {{kind: pii, entities: {ENTITIES}}}
- name: secrets
  stage: both
  mode: audit
  detector: {{kind: secrets, types: [OPENAI_API_KEY, ANTHROPIC_API_KEY, AWS_ACCESS_KEY,
    AWS_SECRET_KEY, GITHUB_TOKEN, GITLAB_TOKEN, SLACK_TOKEN, GOOGLE_API_KEY, STRIPE_KEY,
    PRIVATE_KEY, JWT, BEARER_TOKEN, ASSIGNED_SECRET]}}
"""
    )


def found(guardrails: Guardrails, text: str) -> set[str]:
    result = guardrails.check(
        "input", [user_text(text)], team=None, key_id=None, model=None, path="/"
    )
    return {entity for verdict in result.verdicts for entity in verdict.entities}


JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0"
    ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi\n"
    "Z1BjP5CE8Du7fvGyzqYt\n-----END RSA PRIVATE KEY-----"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("write to jane.doe@example.co.uk today", {"EMAIL_ADDRESS"}, id="email"),
        pytest.param("card 4111 1111 1111 1111 exp 12/29", {"CREDIT_CARD"}, id="card-spaced"),
        pytest.param("card 2223003122003222 ok", {"CREDIT_CARD"}, id="card-mastercard-2-series"),
        pytest.param("IBAN GB82 WEST 1234 5698 7654 32", {"IBAN_CODE"}, id="iban-spaced"),
        pytest.param("my iban is gb82west12345698765432", {"IBAN_CODE"}, id="iban-lowercase"),
        pytest.param("ssn 536-22-1234 on file", {"US_SSN"}, id="ssn"),
        pytest.param("server at 192.168.10.7 is down", {"IP_ADDRESS"}, id="ipv4"),
        pytest.param("v6 2001:db8:85a3::8a2e:370:7334 ok", {"IP_ADDRESS"}, id="ipv6"),
        pytest.param("call +1 (415) 555-0100 now", {"PHONE_NUMBER"}, id="phone-us-intl"),
        pytest.param("Phone: 0490 75 40 81", {"PHONE_NUMBER"}, id="phone-national"),
        pytest.param("Fax: 9498777106", {"PHONE_NUMBER"}, id="phone-bare-with-context"),
        pytest.param(
            "key sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z", {"OPENAI_API_KEY"}, id="openai"
        ),
        pytest.param(
            "sk-ant-api03-x7Yq2Lm9Zp4Rt6Wv8Bn1Cd3Fg5Hj0Kk2Ll4Mm6",
            {"ANTHROPIC_API_KEY"},
            id="anthropic",
        ),
        pytest.param("AKIAIOSFODNN7EXAMPLE is my key", {"AWS_ACCESS_KEY"}, id="aws-access-key"),
        pytest.param(
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            {"AWS_SECRET_KEY"},
            id="aws-secret",
        ),
        pytest.param("ghp_1a2B3c4D5e6F7g8H9i0J1k2L3m4N5o6P7q8R", {"GITHUB_TOKEN"}, id="github"),
        pytest.param(f"token {JWT}", {"JWT"}, id="jwt"),
        pytest.param(PEM, {"PRIVATE_KEY"}, id="pem-block"),
        pytest.param(
            "Authorization: Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0", {"BEARER_TOKEN"}, id="bearer"
        ),
        pytest.param("password = hunter2!x", {"ASSIGNED_SECRET"}, id="assigned-secret"),
    ],
)
def test_finds(audit: Guardrails, text: str, expected: set[str]) -> None:
    assert found(audit, text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("card 4111 1111 1111 1112 fails Luhn", id="card-bad-luhn"),
        pytest.param("IBAN GB82WEST12345698765433 bad checksum", id="iban-bad-checksum"),
        pytest.param("ssn 000-12-3456 is invalid", id="ssn-zero-area"),
        pytest.param("released on 2024-05-17 and 17.05.2024", id="dates"),
        pytest.param("version 1.2.3.4567 and pi 3.14159", id="versions"),
        pytest.param("from 1990-2020 we grew", id="year-range"),
        pytest.param("population 1 000 000", id="thousands"),
        pytest.param("digits 1 2 3 4 5 6 7 8 9", id="digits-one-by-one"),
        pytest.param("mail me at john at example dot com", id="spelled-email"),
        pytest.param("we use sk-learn and a task-list", id="sk-lookalike"),
        pytest.param("Bearer <your-token-here>", id="bearer-placeholder"),
        pytest.param("see the sk-learn-pipeline-tutorial-2024 repo", id="sk-words-and-year"),
        pytest.param("branch sk-1234-fix-login-redirect-bug", id="sk-branch-name"),
        pytest.param("see sk-learn-tutorial2024-notes", id="sk-word-run"),
        pytest.param("see sk-DataPipeline2-tutorial-notes", id="sk-camel-case-run"),
        pytest.param("Authorization: Bearer YOUR_ACCESS_TOKEN_HERE_123", id="bearer-upper"),
        pytest.param("password: required", id="password-word"),
        pytest.param("the eyJhbGciOi prefix starts JWTs", id="jwt-prefix"),
        pytest.param("a@b.c is not a real address", id="email-bad-tld"),
        pytest.param("plain prose with nothing in it at all", id="clean"),
    ],
)
def test_ignores(audit: Guardrails, text: str) -> None:
    assert found(audit, text) == set()


def mutate(operator: str, text: str, **settings: str) -> str:
    guardrails = guardrails_from_yaml(
        f"""
- name: m
  stage: input
  mode: mutate
  detector: {{kind: pii, entities: [EMAIL_ADDRESS, US_SSN], operator: {operator}}}
""",
        settings={"hash_salt_env": "SALT", "encryption_key_env": "KEY"},
        environ={"SALT": SALT, "KEY": KEY},
    )
    result = guardrails.check(
        "input", [user_text(text)], team=None, key_id=None, model=None, path="/"
    )
    return result.rewrites.get(("messages", 0, "content"), text)


@pytest.mark.parametrize(
    ("operator", "expected"),
    [
        pytest.param("replace", "mail <EMAIL_ADDRESS> ssn <US_SSN>", id="replace"),
        pytest.param("{type: replace, new_value: '[x]'}", "mail [x] ssn [x]", id="replace-value"),
        pytest.param("mask", "mail ************* ssn ***********", id="mask"),
        pytest.param(
            "{type: mask, chars_to_mask: 4, from_end: true}",
            "mail a@example**** ssn 536-22-****",
            id="mask-end",
        ),
        pytest.param("redact", "mail  ssn ", id="redact"),
    ],
)
def test_operators(operator: str, expected: str) -> None:
    assert mutate(operator, "mail a@example.com ssn 536-22-1234") == expected


def test_hash_is_salted_and_deterministic() -> None:
    first = mutate("hash", "a@example.com")
    assert first == mutate("hash", "a@example.com")
    assert first == hashlib.sha256(b"a@example.com" + SALT.encode()).hexdigest()
    assert first != hashlib.sha256(b"a@example.com").hexdigest()


def test_encrypt_round_trips() -> None:
    token = mutate("encrypt", "a@example.com")
    assert "example" not in token
    assert decrypt(token, KEY) == "a@example.com"


def test_per_entity_action_block_and_operator() -> None:
    guardrails = guardrails_from_yaml(
        """
- name: cards
  stage: input
  mode: mutate
  detector:
    kind: pii
    entities: [EMAIL_ADDRESS, {type: CREDIT_CARD, action: block}]
"""
    )

    def check(text: str) -> GuardResult:
        return guardrails.check(
            "input", [user_text(text)], team=None, key_id=None, model=None, path="/"
        )

    assert check("a@example.com").rewrites == {("messages", 0, "content"): "<EMAIL_ADDRESS>"}
    blocked = check("a@example.com and 4111111111111111")
    assert blocked.blocked_by == "cards"
    assert blocked.verdicts[0].entities == ("CREDIT_CARD",)
    assert blocked.rewrites == {}


def test_allow_list_threshold_and_context() -> None:
    guardrails = guardrails_from_yaml(
        """
- name: p
  stage: input
  mode: audit
  detector:
    kind: pii
    allow_list: [support@example.com]
    entities:
      - EMAIL_ADDRESS
      - {type: PHONE_NUMBER, context: [hotline]}
      - {type: IP_ADDRESS, threshold: 0.9}
"""
    )
    assert found(guardrails, "write to Support@Example.com") == set()
    assert found(guardrails, "write to sales@example.com") == {"EMAIL_ADDRESS"}
    assert found(guardrails, "host 10.0.0.1") == set()  # IP scores 0.6 < 0.9
    assert found(guardrails, "dial 467 3395") == {"PHONE_NUMBER"}  # built-in context word
    assert found(guardrails, "the hotline 467 3395") == {"PHONE_NUMBER"}  # configured one
    assert found(guardrails, "code 467 3395") == set()  # one separator, no context


def test_custom_entity() -> None:
    guardrails = guardrails_from_yaml(
        r"""
- name: ids
  stage: input
  mode: mutate
  detector:
    kind: pii
    entities: [EMPLOYEE_ID]
    custom: [{name: EMPLOYEE_ID, pattern: 'EMP-\d{6}', score: 0.9}]
"""
    )
    result = guardrails.check(
        "input", [user_text("badge EMP-123456 ok")], team=None, key_id=None, model=None, path="/"
    )
    assert result.rewrites == {("messages", 0, "content"): "badge <EMPLOYEE_ID> ok"}


def test_verdicts_never_carry_values(audit: Guardrails) -> None:
    text = "a@example.com 536-22-1234 sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"
    result = audit.check("input", [user_text(text)], team=None, key_id=None, model=None, path="/")
    assert "example" not in repr(result) and "1234" not in repr(result)
    assert "sk-proj" not in repr(result)


@pytest.mark.parametrize(
    ("entity", "with_context", "without"),
    [
        ("US_PASSPORT", "my passport number is 912803456", "order 912803456 shipped"),
        ("US_BANK_NUMBER", "bank account number 945245789012", "order 945245789012 shipped"),
    ],
)
def test_weakly_scored_entities_are_found_beside_a_context_word_only(
    entity: str, with_context: str, without: str
) -> None:
    """Presidio scores these 0.05-0.1 (any run of digits): under the default threshold
    they were never reported, even beside "passport number"."""
    rule = (
        f"- {{name: r, stage: input, mode: mutate, detector: {{kind: pii, entities: [{entity}]}}}}"
    )
    guards = guardrails_from_yaml(rule)

    def found(text: str) -> bool:
        result = guards.check(
            "input", [user_text(text)], team=None, key_id=None, model=None, path="/"
        )
        return bool(result.rewrites)

    assert found(with_context) and not found(without)


def test_an_entity_threshold_no_candidate_reaches_is_refused() -> None:
    with pytest.raises(ValueError, match=r"US_PASSPORT scores at most 0\.45"):
        guardrails_from_yaml(
            "- {name: r, stage: input, mode: mutate,"
            " detector: {kind: pii, entities: [{type: US_PASSPORT, threshold: 0.6}]}}"
        )


def _full_width(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


@pytest.mark.parametrize(
    "written",
    [
        pytest.param(_full_width("4111 1111 1111 1111"), id="full-width-digits"),
        pytest.param("4111\u00a01111\u00a01111\u00a01111", id="no-break-spaces"),
        pytest.param("4111\u20131111\u20131111\u20131111", id="en-dashes"),
    ],
)
def test_numbers_in_characters_that_read_as_ascii_are_found(written: str) -> None:
    """The model reads them as the card they are; the patterns matched ASCII only."""
    guards = guardrails_from_yaml(
        "- {name: r, stage: input, mode: mutate, detector: {kind: pii, entities: [CREDIT_CARD]}}"
    )
    result = guards.check(
        "input", [user_text(f"card {written} ok")], team=None, key_id=None, model=None, path="/"
    )
    assert result.rewrites == {("messages", 0, "content"): "card <CREDIT_CARD> ok"}


def test_a_full_width_e_mail_address_is_found_where_it_stands() -> None:
    guards = guardrails_from_yaml(
        "- {name: r, stage: input, mode: mutate, detector: {kind: pii, entities: [EMAIL_ADDRESS]}}"
    )
    text = "\u00e9crire \u00e0 " + _full_width("jane@example.com") + " demain"
    result = guards.check("input", [user_text(text)], team=None, key_id=None, model=None, path="/")
    assert result.rewrites == {
        ("messages", 0, "content"): "\u00e9crire \u00e0 <EMAIL_ADDRESS> demain"
    }


URL_TEXTS = [
    "see https://intranet.example.com/report?x=1 now",
    "go to www.example.org/a/b.",
    "'https://x.co/p' and \"www.a.io\"",
    '{"url":"https://intranet.example.com/report","depth":2}',
    "http://localhost:8080/x and ftp://files.example.net/a",
    "visit example.com or sub.example.co.uk/path today",
    "https://exa mple.com",
    "url https://example.com/path\u00a0more",
    "WWW.EXAMPLE.COM/X, https://ünïcode.example.de/ä",
    "www." + "a." * 30 + "com",
]


@pytest.mark.parametrize("text", URL_TEXTS)
def test_urls_are_found_by_re2_as_presidio_finds_them(text: str) -> None:
    """The URL recognizer's patterns run on RE2: the same findings (spans and scores,
    after Presidio's duplicate removal) as Presidio's engine gives on the same text."""
    recognizer = presidio_recognizer("URL")
    ours = sorted((r.start, r.end, r.score) for r in recognizer._analyze(text))
    presidios = recognizer._presidio.analyze(text, ["URL"], None)
    assert ours == sorted((r.start, r.end, r.score) for r in presidios)


def test_urls_are_found_without_presidios_backtracking_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its URL patterns backtrack for seconds on a few KB of ``www.a.a.a…`` (with a 60 s
    timeout per pattern): on the request path that stalled every stream on the loop."""
    recognizer = presidio_recognizer("URL")

    def engine(*_: object) -> list[object]:
        raise AssertionError("Presidio's engine ran a URL pattern")

    monkeypatch.setattr(recognizer._presidio, "analyze", engine)
    text = ("www." + "a." * 30) * 100 + " https://intranet.example.com/report"
    found = recognizer.find(Utf8(text))
    assert any(text[f.start : f.end] == "https://intranet.example.com/report" for f in found)
