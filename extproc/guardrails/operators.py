"""Rewriting operators (Presidio's anonymizer operators), bound to their secrets at load.

An operator turns a found value into its replacement: ``replace`` (``<EMAIL_ADDRESS>``),
``mask`` (``*****``), ``redact`` (nothing), ``hash`` (salted SHA-256/512, so the same
value always gives the same digest and records stay joinable) or ``encrypt`` (AES, so a
key holder can restore it with :func:`decrypt`). Salt and key are read from the
environment variables the policy names when the policy is compiled; a missing or
unusable secret is a compile error, never a request-time surprise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from extproc.guardrails.config import (
    EncryptOperator,
    HashOperator,
    MaskOperator,
    Operator,
    RedactOperator,
    ReplaceOperator,
)
from extproc.guardrails.presidio_import import anonymizer_operators

Rewrite = Callable[[str, str], str]
"""(entity type, original value) → replacement text."""


class OperatorError(ValueError):
    """An operator cannot be built: its secret is missing or unusable."""


def build_operator(
    operator: Operator,
    environ: Mapping[str, str],
    default_salt_env: str | None,
    default_key_env: str | None,
) -> Rewrite:
    if isinstance(operator, ReplaceOperator):
        fixed = operator.new_value
        return lambda entity, value: fixed if fixed is not None else f"<{entity}>"
    if isinstance(operator, RedactOperator):
        return lambda entity, value: ""
    if isinstance(operator, MaskOperator):
        return _mask(operator)
    if isinstance(operator, HashOperator):
        salt = _secret(operator.salt_env or default_salt_env, environ, "hash salt")
        return _presidio_operator(
            "Hash", {"hash_type": operator.hash_type, "salt": salt.encode("utf-8")}
        )
    if isinstance(operator, EncryptOperator):
        key = _secret(operator.key_env or default_key_env, environ, "encryption key")
        return _presidio_operator("Encrypt", {"key": key})
    raise OperatorError(f"unsupported operator {operator!r}")


def decrypt(token: str, key: str) -> str:
    """Restore a value rewritten by an ``encrypt`` operator."""
    return str(anonymizer_operators().Decrypt().operate(token, {"key": key}))


def _mask(operator: MaskOperator) -> Rewrite:
    implementation = anonymizer_operators().Mask()
    char, count, from_end = operator.masking_char, operator.chars_to_mask, operator.from_end

    def mask(entity: str, value: str) -> str:
        params = {
            "masking_char": char,
            "chars_to_mask": len(value) if count is None else count,
            "from_end": from_end,
        }
        return str(implementation.operate(value, params))

    return mask


def _secret(name: str | None, environ: Mapping[str, str], what: str) -> str:
    if not name:
        raise OperatorError(f"no environment variable is named for the {what}")
    value = environ.get(name)
    if not value:
        raise OperatorError(f"environment variable {name} (the {what}) is not set")
    return value


def _presidio_operator(name: str, params: dict[str, Any]) -> Rewrite:
    operators = anonymizer_operators()
    from presidio_anonymizer.entities import InvalidParamError

    implementation = getattr(operators, name)()
    try:
        implementation.validate(params)
        implementation.operate("probe", params)
    except (InvalidParamError, ValueError) as exc:
        raise OperatorError(f"{name.lower()}: {exc}") from None

    def rewrite(entity: str, value: str) -> str:
        return str(implementation.operate(value, params))

    return rewrite
