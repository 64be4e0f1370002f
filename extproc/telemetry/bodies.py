"""Prompts and answers in the audit log: only when the policy asks, and always redacted.

``settings.audit.record_bodies: true`` adds the texts of each prompt (as sent upstream,
after the guardrails' rewrites) and of each non-streamed answer to its audit record,
after a redaction pass of its own that replaces every structured PII entity and secret
the guardrails know, whatever the policy's guardrail rules say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from extproc.dialects.base import JsonPath, TextPart
from extproc.guardrails.answer import answer_texts
from extproc.guardrails.config import GuardrailRule
from extproc.guardrails.engine import Guardrails, compile_guardrails
from extproc.guardrails.entities import SECRET_TYPES

_REDACT = ("PHONE_NUMBER", "EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS")


def redactor() -> Guardrails:
    """The fixed redaction applied to every recorded text (compiled once per policy)."""
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
    """``texts`` as the upstream got them (``rewrites`` applied), then redacted."""
    sent = [TextPart(p.path, p.role, p.kind, str(rewrites.get(p.path, p.text))) for p in texts]
    result = redact.check("input", sent, team=None, key_id=None, model=None, path="")
    return [
        {"role": p.role, "kind": p.kind, "text": str(result.rewrites.get(p.path, p.text))}
        for p in sent
    ]


def recorded_answer(redact: Guardrails, dialect: str, body: Any) -> list[dict[str, str]]:
    return recorded(redact, answer_texts(dialect, body), {})
