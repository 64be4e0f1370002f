"""What a budget counter counts, and the store key that names it.

A counter is one (scope, scope id, model, unit, window, window start) tuple. Its logical
key, which every store uses as is (the Redis store prepends its hash-tagged prefix, see
:mod:`extproc.budgets.redis_store`), is::

    <scope>:<scope id>:<model or *>:<unit>:<window>:<window start epoch seconds>

    key:prod-app:*:total_tokens:minute:1767225600
    team:search:gpt-4o:usd:month:1767225600
    global:*:*:requests:day:1767225600

Scope ids and model names may themselves contain ``:`` (policy names allow it), so ``%``
and ``:`` inside a field are percent-escaped and two different tuples can never share a
key. ``*`` cannot be a policy name (names start with a letter or digit), so it safely
means "all models" and "the one global scope".
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from extproc.budgets.windows import Window

ANY: Final = "*"
"""The model field of a limit that counts every model, and the id of the global scope."""


class Scope(StrEnum):
    KEY = "key"
    USER = "user"
    TEAM = "team"
    GLOBAL = "global"


class Unit(StrEnum):
    """What a limit counts. ``usd`` counters hold integer micro-USD."""

    REQUESTS = "requests"
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    TOTAL_TOKENS = "total_tokens"
    USD = "usd"


def counter_key(
    scope: Scope,
    scope_id: str,
    model: str | None,
    unit: Unit,
    window: Window,
    window_start: int,
) -> str:
    """The logical key of one counter; ``model=None`` counts all models together."""
    head, tail = key_parts(scope, scope_id, unit, window)
    return keyed(head, model, tail, window_start)


def key_parts(scope: Scope, scope_id: str, unit: Unit, window: Window) -> tuple[str, str]:
    """What a limit fixes of its counters' keys: the parts before and after the model
    (a compiled limit keeps them, :attr:`~extproc.policy.compiled.CompiledLimit.affixes`)."""
    ident = ANY if scope is Scope.GLOBAL else _escape(scope_id)
    return f"{scope.value}:{ident}:", f":{unit.value}:{window.value}:"


def keyed(head: str, model: str | None, tail: str, window_start: int) -> str:
    """:func:`counter_key` from :func:`key_parts`."""
    return f"{head}{ANY if model is None else _escape(model)}{tail}{window_start}"


def key_fields(key: str) -> tuple[str, ...]:
    """The six fields of a :func:`counter_key`, unescaped: scope, scope id, model (or
    ``*``, or a limit's ``only-<hash>``), unit, window and window start."""
    fields = key.split(":")
    if len(fields) != 6:
        raise ValueError(f"not a counter key: {key!r}")
    return tuple(f.replace("%3A", ":").replace("%25", "%") for f in fields)


def used_key(key: str) -> str:
    """The counter beside ``key`` that holds only what settled exchanges used (no
    reservations in flight), kept for limits with alerts, which are judged on it."""
    return f"{key}:used"


def _escape(field: str) -> str:
    if not field or field == ANY:
        raise ValueError(f"not a valid scope id or model name: {field!r}")
    if "%" in field or ":" in field:
        return field.replace("%", "%25").replace(":", "%3A")
    return field
