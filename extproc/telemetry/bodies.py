"""Prompts and answers in the audit log: only when the policy asks, and always redacted.

``settings.audit.record_bodies: true`` adds the texts of each prompt (as sent upstream,
after the guardrails' rewrites) and of each non-streamed answer to its audit record,
after a redaction pass of its own that replaces every structured PII entity and secret
the guardrails know, whatever the policy's guardrail rules say.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from extproc.dialects.base import JsonPath, TextPart
from extproc.guardrails.answer import answer_texts
from extproc.guardrails.config import GuardrailRule
from extproc.guardrails.engine import Guardrails, compile_guardrails
from extproc.guardrails.entities import SECRET_TYPES
from extproc.guardrails.json_text import plain_decoded

_REDACT = ("PHONE_NUMBER", "EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS")


@functools.cache
def redactor() -> Guardrails:
    """The fixed redaction applied to every recorded text and MCP resource URI: the same
    whatever the policy, so compiled once a process (:func:`compile_policy` builds it
    when a policy will need it, off the event loop: built by the first record, it stalled
    the loop ~0.4 s)."""
    rules = [
        GuardrailRule.model_validate(
            {
                "name": "audit-redaction-pii",
                "stage": "both",
                "mode": "mutate",
                "detector": {"kind": "pii", "operator": "replace", "entities": list(_REDACT)},
            }
        ),
        GuardrailRule.model_validate(
            {
                "name": "audit-redaction-secrets",
                "stage": "both",
                "mode": "mutate",
                # Every type, the opt-in ones too (ASSIGNED_SECRET: ``password=...``): a
                # record is kept, so it errs toward redacting more than a prompt rule.
                "detector": {"kind": "secrets", "types": list(SECRET_TYPES)},
            }
        ),
    ]
    return compile_guardrails(rules)


def recorded(
    redact: Guardrails, texts: Sequence[TextPart], rewrites: Mapping[JsonPath, Any]
) -> list[dict[str, str]]:
    """``texts`` as the upstream got them (``rewrites`` applied), then redacted. Tool
    arguments stay JSON source to the redaction (a ``\\n`` escape is no ``n`` glued to
    the number after it), with the escapes that spell plain ASCII decoded first
    (``jane\\u0040example.com`` is an address to redact). Locked texts (a tool input's
    member names, decoded copies) are no text of the body, and are not recorded. A
    record need not be JSON, so a number found in JSON source is rewritten where the
    guardrails would block (``json_safe=False``): the redaction never blocks, and nothing
    is recorded raw."""
    sent = [
        dataclasses.replace(p, text=_as_sent(p, rewrites.get(p.path, p.text)))
        for p in texts
        if not p.locked
    ]
    result = redact.check(
        "input", sent, team=None, key_id=None, model=None, path="", json_safe=False
    )
    return [
        {"role": p.role, "kind": p.kind, "text": str(result.rewrites.get(p.path, p.text))}
        for p in sent
    ]


def _as_sent(part: TextPart, text: object) -> str:
    return plain_decoded(str(text)) if part.json_source else str(text)


def recorded_answer(redact: Guardrails, dialect: str, body: Any) -> list[dict[str, str]]:
    return recorded(redact, answer_texts(dialect, body), {})
