"""Counter keys: one per (scope, id, model, unit, window, start), never two tuples per key."""

from __future__ import annotations

import pytest

from extproc.budgets.keys import Scope, Unit, counter_key
from extproc.budgets.windows import Window
from extproc.policy.compiled import CompiledLimit

START = 1_767_225_600


@pytest.mark.parametrize(
    ("scope", "scope_id", "model", "unit", "window", "key"),
    [
        pytest.param(
            Scope.KEY, "prod-app", None, Unit.TOTAL_TOKENS, Window.MINUTE,
            f"key:prod-app:*:total_tokens:minute:{START}", id="all-models",
        ),
        pytest.param(
            Scope.TEAM, "search", "gpt-4o", Unit.USD, Window.MONTH,
            f"team:search:gpt-4o:usd:month:{START}", id="per-model",
        ),
        pytest.param(
            Scope.GLOBAL, "ignored", None, Unit.REQUESTS, Window.DAY,
            f"global:*:*:requests:day:{START}", id="global",
        ),
        pytest.param(
            Scope.USER, "a:b%c", "org/m:1", Unit.INPUT_TOKENS, Window.HOUR,
            f"user:a%3Ab%25c:org/m%3A1:input_tokens:hour:{START}", id="escaped",
        ),
    ],
)  # fmt: skip
def test_counter_key(
    scope: Scope, scope_id: str, model: str | None, unit: Unit, window: Window, key: str
) -> None:
    assert counter_key(scope, scope_id, model, unit, window, START) == key


@pytest.mark.parametrize("subject", [None, "org/m:1", "only-3f2a"])
@pytest.mark.parametrize("scope", [Scope.GLOBAL, Scope.USER])
def test_a_compiled_limit_names_its_counters_as_counter_key_does(
    scope: Scope, subject: str | None
) -> None:
    """The meter, the tool limits and the usage report name counters through the limit
    (its key parts made once); the keys must stay the ones :func:`counter_key` defines."""
    limit = CompiledLimit(scope, "a:b%c", Unit.USD, Window.HOUR, 10, False, None)
    assert limit.key(subject, START) == counter_key(
        scope, "a:b%c", subject, Unit.USD, Window.HOUR, START
    )


def test_colons_in_names_cannot_collide() -> None:
    one = counter_key(Scope.USER, "a:b", "c", Unit.REQUESTS, Window.DAY, START)
    two = counter_key(Scope.USER, "a", "b:c", Unit.REQUESTS, Window.DAY, START)
    assert one != two


@pytest.mark.parametrize("bad", ["", "*"])
def test_empty_or_wildcard_names_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid"):
        counter_key(Scope.TEAM, bad, None, Unit.REQUESTS, Window.DAY, START)
    with pytest.raises(ValueError, match="not a valid"):
        counter_key(Scope.TEAM, "t", bad, Unit.REQUESTS, Window.DAY, START)
