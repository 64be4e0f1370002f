"""Credentials in prompts and answers: provider API keys, cloud keys, tokens, key blocks.

Each type is a prefix or structure the issuer documents (``AKIA`` + 16 base32 characters,
``ghp_`` + 36, a PEM block, a JWT whose header decodes to JSON) plus, where the shape
alone is weak, a check that the value looks random rather than like prose
(``sk-learn-tutorial`` is not a key). Patterns are RE2, so a megabyte of look-alike text
costs one linear scan.
"""

from __future__ import annotations

import base64
import binascii
import re

import orjson

from extproc.guardrails.recognizers import Re2Recognizer, Validator

_RUNS = re.compile(r"[-_]")
"""What separates the runs of a key's body."""
_PLACEHOLDERS = ("<", ">", "${", "{{", "***", "xxx", "...", "your_", "your-", "example")


def looks_random(value: str, min_distinct: int = 8) -> bool:
    """Mixed letters and digits with enough distinct characters to be a credential."""
    has_digit = any(c.isdigit() for c in value)
    has_alpha = any(c.isalpha() for c in value)
    return has_digit and has_alpha and len(set(value)) >= min_distinct


def _random_tail(prefix_len: int, score: float) -> Validator:
    def check(value: str, text: str, start: int, end: int) -> float | None:
        return score if looks_random(value[prefix_len:]) else None

    return check


def _openai(value: str, text: str, start: int, end: int) -> float | None:
    """A key's body is long and random (48 characters, or 70-160 of base64url after
    ``sk-proj-`` or ``sk-svcacct-``, whose ``-`` and ``_`` leave a run of 12 or more in
    every one of 20,000 random bodies tried) with a run in mixed case of 16, or of 12 in
    a body of 40 or more: a name of words and numbers (``sk-learn-tutorial2024-notes``,
    ``sk-DataPipeline2-notes``) is shorter, or has no such run."""
    if value.startswith("sk-ant-"):
        return None  # an Anthropic key; its own recognizer reports it
    body = value[3:]
    longest = max(_RUNS.split(body), key=len)
    mixed = longest.lower() != longest and longest.upper() != longest
    long_enough = len(longest) >= 16 or (len(body) >= 40 and len(longest) >= 12)
    return 0.9 if long_enough and mixed and looks_random(body) else None


def _jwt(value: str, text: str, start: int, end: int) -> float | None:
    header = value.split(".", 1)[0]
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        return None
    return 0.95 if isinstance(decoded, dict) and ("alg" in decoded or "typ" in decoded) else None


def _bearer(value: str, text: str, start: int, end: int) -> float | None:
    if _placeholder(value):
        return None  # "Bearer YOUR_ACCESS_TOKEN_HERE_123", "Bearer <token>"
    return 0.8 if looks_random(value, min_distinct=6) else None


def _placeholder(value: str) -> bool:
    lowered = value.lower()
    return any(marker in lowered for marker in _PLACEHOLDERS)


def _assigned(value: str, text: str, start: int, end: int) -> float | None:
    if _placeholder(value):
        return None
    if not any(not c.isalpha() for c in value):
        return None  # a plain word ("password: required") is not a secret
    return 0.7


PRIVATE_KEY_FOOTER = r"-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
"""Where a private key ends (a stream rewriting one cut at its window stops there)."""

SECRET_RECOGNIZERS: tuple[Re2Recognizer, ...] = (
    Re2Recognizer(
        "OPENAI_API_KEY",
        r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
        0.9,
        validator=_openai,
    ),
    Re2Recognizer(
        "ANTHROPIC_API_KEY",
        r"\bsk-ant-[A-Za-z0-9_-]{20,}",
        0.95,
        validator=_random_tail(7, 0.95),
    ),
    Re2Recognizer(
        "AWS_ACCESS_KEY",
        r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA|ASCA)[A-Z2-7]{16}\b",
        0.95,
    ),
    Re2Recognizer(
        "AWS_SECRET_KEY",
        r"(?:aws|secret[_ .-]?access)[A-Za-z0-9_ .-]{0,32}?[\"']?\s*[:=]\s*[\"']?"
        r"([A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+=]|$)",
        0.9,
        group=1,
        case_insensitive=True,
    ),
    Re2Recognizer(
        "GITHUB_TOKEN",
        r"\b(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,247})\b",
        0.95,
    ),
    Re2Recognizer("GITLAB_TOKEN", r"\bglpat-[A-Za-z0-9_-]{20,}", 0.95),
    Re2Recognizer(
        "SLACK_TOKEN",
        r"\bxox[abposr]-[A-Za-z0-9-]{10,}|https://hooks\.slack\.com/services/[A-Za-z0-9/]{20,}",
        0.9,
    ),
    Re2Recognizer("GOOGLE_API_KEY", r"\bAIza[0-9A-Za-z_-]{35}", 0.9),
    Re2Recognizer("STRIPE_KEY", r"\b(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}", 0.9),
    Re2Recognizer(
        "PRIVATE_KEY",
        # Header, body (base64, PEM headers such as "Proc-Type: 4,ENCRYPTED"; a dash
        # only inside a word, so the body stops at the next "-----"), optional footer.
        # No alternative may need to look past its own end: with one that searched
        # for a footer, a text of many headers and no footer would cost n² to scan.
        r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
        r"(?:[A-Za-z0-9+/=\s:,.]|-[A-Za-z0-9])*"
        rf"(?:{PRIVATE_KEY_FOOTER})?",
        1.0,
    ),
    Re2Recognizer(
        "JWT",
        r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*",
        0.95,
        validator=_jwt,
    ),
    Re2Recognizer(
        "BEARER_TOKEN",
        r"\bbearer\s+([A-Za-z0-9._~+/-]{16,}=*)",
        0.8,
        group=1,
        validator=_bearer,
        case_insensitive=True,
    ),
    Re2Recognizer(
        "ASSIGNED_SECRET",
        r"\b(?:password|passwd|pwd|passphrase|secret|api[_-]?key|access[_-]?token|auth[_-]?token"
        r"|client[_-]?secret)[\"']?\s*[:=]\s*[\"']?([^\s\"',;]{6,})",
        0.7,
        group=1,
        validator=_assigned,
        case_insensitive=True,
    ),
)

SECRETS_BY_TYPE: dict[str, Re2Recognizer] = {r.entity: r for r in SECRET_RECOGNIZERS}
