"""Guardrails: PII, secrets, prompt injection and content policy, on input and output.

Public surface (everything else in this package is an implementation detail):

    config       GuardrailRule, GuardrailSettings (pydantic; embed in the policy),
                 guardrail_problems (cross-field checks for the policy validator)
    engine       compile_guardrails(rules, settings) -> Guardrails
                 Guardrails.applies / check / check_answer / stream
                 GuardResult, Verdict, GuardrailConfigError, describe
    stream       StreamGuard.feed / finish / result (SSE output guard)
    injection    Classifier (protocol for an optional in-process model)
    operators    decrypt (restore values rewritten by an ``encrypt`` operator)
    evaluate     run_eval, format_report (``extproc eval``)

Errors: invalid rules fail pydantic validation with their path; rules that validate but
cannot be compiled (a missing environment secret, an unknown classifier) raise
:class:`GuardrailConfigError`. Nothing in a check raises for any text.
"""

from extproc.guardrails.config import GuardrailRule, GuardrailSettings, guardrail_problems
from extproc.guardrails.engine import (
    CLEAN,
    GuardrailConfigError,
    Guardrails,
    GuardResult,
    Verdict,
    compile_guardrails,
    describe,
)
from extproc.guardrails.injection import Classifier
from extproc.guardrails.operators import decrypt
from extproc.guardrails.sse import STREAM_DIALECTS
from extproc.guardrails.stream import StreamGuard

__all__ = [
    "CLEAN",
    "STREAM_DIALECTS",
    "Classifier",
    "GuardResult",
    "GuardrailConfigError",
    "GuardrailRule",
    "GuardrailSettings",
    "Guardrails",
    "StreamGuard",
    "Verdict",
    "compile_guardrails",
    "decrypt",
    "describe",
    "guardrail_problems",
]
