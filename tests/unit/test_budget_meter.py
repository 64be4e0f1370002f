"""The budget stage on the in-process store, with an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from extproc.budgets.keys import counter_key
from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.meter import Cost, Meter, usage_cost
from extproc.budgets.windows import window_bounds
from extproc.dialects.anthropic_messages import DIALECT
from extproc.dialects.fields import asks_hour_cache
from extproc.dialects.openai_chat import DIALECT as CHAT_DIALECT
from extproc.dialects.usage import Usage
from extproc.errors import RateLimited
from extproc.policy.compiled import CatalogueModel, Limits
from tests.unit.policies import make_policy, sha


def policy_with(limits: list[dict[str, object]]) -> tuple[Limits, CatalogueModel]:
    models = {"gpt-4o-mini": {"tokenizer": "o200k", "pricing": {"input": 1, "output": 2}}}
    key_limits, catalogue = limited(limits, models)
    return key_limits, catalogue["gpt-4o-mini"]


def limited(
    limits: list[dict[str, object]], models: dict[str, dict[str, object]]
) -> tuple[Limits, dict[str, CatalogueModel]]:
    """One key's ``limits`` (on its team) and the catalogue ``models``, compiled."""
    policy = make_policy(
        teams={"t": {"models": {"allow": ["*"]}, "limits": limits}},
        users={},
        keys={"k": {"sha256": sha("k"), "team": "t"}},
        models=models,
    )
    key = next(iter(policy.keys_by_digest.values()))
    return key.limits, {model.name: model for model in policy.catalogue}


async def reserve(
    meter: Meter, limits: Limits, model: CatalogueModel, now: datetime, out: int | None = 10
):  # type: ignore[no-untyped-def]
    return await meter.reserve(limits, model, 5, out, 100, now)


@pytest.mark.parametrize(
    ("window", "now", "later", "retry_after"),
    [
        pytest.param(
            "minute",
            datetime(2026, 3, 1, 12, 0, 50, tzinfo=UTC),
            timedelta(seconds=10),
            10,
            id="minute",
        ),
        pytest.param(
            "hour", datetime(2026, 3, 1, 12, 59, 0, tzinfo=UTC), timedelta(minutes=1), 60, id="hour"
        ),
        pytest.param(
            "day", datetime(2026, 3, 1, 23, 0, 0, tzinfo=UTC), timedelta(hours=1), 3600, id="day"
        ),
        pytest.param(
            "month",
            datetime(2026, 1, 31, 23, 59, 0, tzinfo=UTC),
            timedelta(minutes=1),
            60,
            id="month-jan-feb",
        ),
        pytest.param(
            "month",
            datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC),
            timedelta(seconds=30),
            30,
            id="month-dec-jan",
        ),
        pytest.param(
            "month",
            datetime(2028, 2, 29, 23, 0, 0, tzinfo=UTC),
            timedelta(hours=1),
            3600,
            id="month-leap-feb",
        ),
    ],
)
async def test_windows_roll_over(
    window: str, now: datetime, later: timedelta, retry_after: int
) -> None:
    limits, model = policy_with([{"unit": "requests", "window": window, "limit": 2}])
    meter = Meter(MemoryStore(clock=lambda: now.timestamp()))
    await reserve(meter, limits, model, now)
    await reserve(meter, limits, model, now + timedelta(seconds=1) if window != "minute" else now)
    with pytest.raises(RateLimited) as caught:
        await reserve(meter, limits, model, now)
    assert dict(caught.value.headers)["retry-after"] == str(retry_after)
    assert await reserve(meter, limits, model, now + later) is not None


async def test_a_reservations_counters_are_named_as_counter_key_names_them() -> None:
    """The meter builds each key from what its limit fixed at compile time: the names in
    Redis must stay those of :func:`counter_key` (a model name with a colon escaped, the
    per-model counter apart, the only-some-models one tagged)."""
    models = {"org/m:1": {"tokenizer": "o200k", "pricing": {"input": 1, "output": 2}}}
    limits, catalogue = limited(
        [
            {"unit": "requests", "window": "minute", "limit": 9},
            {"unit": "usd", "window": "month", "limit": 9, "per_model": True},
            {"unit": "total_tokens", "window": "day", "limit": 999, "models": ["org/*"]},
        ],
        models,
    )
    now = datetime(2026, 2, 14, 12, 30, 15, tzinfo=UTC)
    reservation = await Meter(MemoryStore()).reserve(limits, catalogue["org/m:1"], 5, 10, 100, now)
    assert reservation is not None
    expected = [
        counter_key(
            limit.scope,
            limit.scope_id,
            limit.subject("org/m:1"),
            limit.unit,
            limit.window,
            window_bounds(limit.window, now)[0],
        )
        for limit in limits
    ]
    assert [c.key for c in reservation.counters] == expected
    assert (
        expected[1]
        == f"team:t:org/m%3A1:usd:month:{int(datetime(2026, 2, 1, tzinfo=UTC).timestamp())}"
    )


async def test_settle_replaces_the_reservation_once() -> None:
    limits, model = policy_with(
        [
            {"unit": "total_tokens", "window": "day", "limit": 1000},
            {"unit": "usd", "window": "day", "limit": 1},
        ]
    )
    store = MemoryStore()
    meter = Meter(store)
    now = datetime.now(UTC)
    reservation = await meter.reserve(limits, model, 50, 200, 100, now)
    assert reservation is not None
    # $1 / $2 per million tokens is 1 / 2 micro-dollars per token.
    assert reservation.reserved == Cost(50, 200, 50 * 1 + 200 * 2)
    keys = [c.key for c in reservation.counters]
    assert await store.read(keys) == (250, 450)
    used = Cost(40, 10, 60)
    await meter.settle(reservation, used)
    await meter.settle(reservation, used)
    assert await store.read(keys) == (50, 60)


async def test_two_reservations_settle_apart() -> None:
    """Each reservation has a token of its own: callers choose x-request-id, and a request
    handed from the authorizer to ext_proc is reserved again under the same id."""
    limits, model = policy_with([{"unit": "total_tokens", "window": "day", "limit": 1000}])
    store = MemoryStore()
    meter = Meter(store)
    now = datetime.now(UTC)
    first = await meter.reserve(limits, model, 50, 200, 100, now)
    second = await meter.reserve(limits, model, 50, 200, 100, now)
    assert first is not None and second is not None and first.token != second.token
    await meter.settle(first, Cost(0, 0, 0))  # given back (the authorizer's hand-over)
    await meter.settle(second, Cost(40, 10, 0))
    assert await store.read([c.key for c in second.counters]) == (50,)


async def test_request_without_cap_gets_what_is_left() -> None:
    limits, model = policy_with([{"unit": "total_tokens", "window": "day", "limit": 120}])
    meter = Meter(MemoryStore())
    now = datetime.now(UTC)
    first = await meter.reserve(limits, model, 5, None, 100, now)
    assert first is not None and first.output_cap is None  # 5 + 100 fits
    second = await meter.reserve(limits, model, 5, None, 100, now)
    assert second is not None and second.output_cap == 120 - 105 - 5
    with pytest.raises(RateLimited):
        await meter.reserve(limits, model, 5, 20, 100, now)  # an explicit cap is kept


async def test_request_larger_than_the_whole_limit_says_so() -> None:
    limits, model = policy_with([{"unit": "output_tokens", "window": "minute", "limit": 50}])
    with pytest.raises(RateLimited) as caught:
        await Meter(MemoryStore()).reserve(limits, model, 5, 500, 100, datetime.now(UTC))
    assert "alone needs more than the whole limit" in caught.value.message


async def test_models_filter_and_per_model_counters() -> None:
    limits, model = policy_with(
        [
            {"unit": "requests", "window": "day", "limit": 1, "models": ["claude-*"]},
            {"unit": "requests", "window": "day", "limit": 5, "per_model": True},
        ]
    )
    reservation = await Meter(MemoryStore()).reserve(limits, model, 1, 1, 1, datetime.now(UTC))
    assert reservation is not None
    assert [c.key.split(":")[2] for c in reservation.counters] == ["gpt-4o-mini"]


async def test_tool_limits_count_tool_calls_apart_from_model_calls() -> None:
    limits, model = policy_with(
        [
            {"unit": "requests", "window": "day", "limit": 2, "tools": ["jira.*"]},
            {"unit": "requests", "window": "day", "limit": 100},
        ]
    )
    meter = Meter(MemoryStore())
    now = datetime.now(UTC)
    reservation = await meter.reserve(limits, model, 1, 1, 1, now)
    assert reservation is not None and len(reservation.counters) == 1  # the tool limit is not in it
    await meter.reserve_tools(limits, "demo", ["jira.create_issue"], now)
    await meter.reserve_tools(limits, "demo", ["weather.get"], now)  # not counted: not jira.*
    await meter.reserve_tools(limits, "demo", ["jira.search"], now)
    with pytest.raises(RateLimited):
        await meter.reserve_tools(limits, "demo", ["jira.create_issue"], now)


async def test_a_refused_batch_of_tool_calls_counts_none_of_them() -> None:
    limits, _ = policy_with(
        [{"unit": "requests", "window": "day", "limit": 2, "tools": ["jira.*"]}]
    )
    store = MemoryStore()
    meter = Meter(store)
    now = datetime.now(UTC)
    await meter.reserve_tools(limits, "demo", ["jira.search"], now)
    with pytest.raises(RateLimited):  # two more calls than the one left: the batch is refused
        await meter.reserve_tools(limits, "demo", ["jira.search", "jira.create_issue"], now)
    await meter.reserve_tools(limits, "demo", ["jira.create_issue"], now)  # the one left
    with pytest.raises(RateLimited):
        await meter.reserve_tools(limits, "demo", ["jira.search"], now)


def test_a_tools_limit_must_count_requests() -> None:
    with pytest.raises(Exception, match="unit: requests"):
        policy_with([{"unit": "total_tokens", "window": "day", "limit": 5, "tools": ["x.*"]}])


async def test_limits_on_different_models_count_apart() -> None:
    """Two limits of one scope, unit and window on different models: each counts only the
    models it names (they used to share one counter, so three calls of one model used up
    the other's allowance of two)."""
    policy = make_policy(
        teams={
            "t": {
                "models": {"allow": ["*"]},
                "limits": [
                    {"unit": "requests", "window": "day", "limit": 2, "models": ["gpt-4o"]},
                    {"unit": "requests", "window": "day", "limit": 100, "models": ["gpt-4o-mini"]},
                ],
            }
        },
        users={},
        keys={"k": {"sha256": sha("k"), "team": "t"}},
        models={"gpt-4o": {}, "gpt-4o-mini": {}},
    )
    limits = next(iter(policy.keys_by_digest.values())).limits
    mini, four = policy.resolve_model("gpt-4o-mini"), policy.resolve_model("gpt-4o")
    assert mini is not None and four is not None
    meter, now = Meter(MemoryStore()), datetime.now(UTC)
    for _ in range(3):
        assert await meter.reserve(limits, mini, 1, 1, 1, now) is not None
    for _ in range(2):
        assert await meter.reserve(limits, four, 1, 1, 1, now) is not None
    with pytest.raises(RateLimited):
        await meter.reserve(limits, four, 1, 1, 1, now)


async def test_tool_limits_on_different_tools_count_apart() -> None:
    limits, _ = policy_with(
        [
            {"unit": "requests", "window": "day", "limit": 100, "tools": ["jira.*"]},
            {"unit": "requests", "window": "day", "limit": 1, "tools": ["jira.delete*"]},
        ]
    )
    meter, now = Meter(MemoryStore()), datetime.now(UTC)
    for _ in range(3):
        await meter.reserve_tools(limits, "demo", ["jira.get"], now)
    await meter.reserve_tools(limits, "demo", ["jira.delete_a"], now)  # its first
    with pytest.raises(RateLimited):
        await meter.reserve_tools(limits, "demo", ["jira.delete_b"], now)


async def test_the_usage_report_reads_the_counters_the_meter_writes() -> None:
    """``extproc usage`` (and GetUsage) read tool limits from their MCP counters, and a
    limit on some models from its own counter."""
    from extproc.budgets.report import usage_report
    from extproc.policy.loader import load_policy
    from extproc.stack import ROOT

    policy = load_policy(ROOT / "policies" / "example.yaml")
    apps = policy.keys_by_id["demo-restricted"].limits
    store, now = MemoryStore(), datetime.now(UTC)
    meter = Meter(store)
    for _ in range(2):
        await meter.reserve_tools(apps, "demo", ["weather.get"], now)
    lines = await usage_report(policy, store, now, team="apps")
    [tools] = [line for line in lines if line.model == "mcp:demo"]
    assert (tools.unit, tools.window, tools.used, tools.limit) == ("requests", "minute", "2", "5")


async def test_an_embeddings_call_reserves_no_output() -> None:
    """Vectors out, no tokens: the reservation holds the prompt alone, not the policy's
    default output cap (which made concurrent embeddings calls refuse each other)."""
    from extproc.dialects.openai_embeddings import DIALECT

    limits, model = policy_with([{"unit": "total_tokens", "window": "day", "limit": 50}])
    request = DIALECT.parse({"model": "gpt-4o-mini", "input": "hello"})
    meter, now = Meter(MemoryStore()), datetime.now(UTC)
    for _ in range(5):  # 5 x 5 prompt tokens fit in 50; 5 x (5 + 100) would not
        reservation = await meter.reserve(limits, model, 5, request.max_output_tokens, 100, now)
        assert reservation is not None and reservation.reserved.output_tokens == 0


async def test_a_reservation_given_back_whole_uncounts_its_request() -> None:
    """A request that never went upstream (handed over to ext_proc, which counts it
    afresh; refused by the gateway) leaves no request on a requests limit."""
    from extproc.budgets.meter import NOTHING_USED

    limits, model = policy_with([{"unit": "requests", "window": "day", "limit": 1}])
    meter, now = Meter(MemoryStore()), datetime.now(UTC)
    for _ in range(3):  # a limit of one request admits each in turn once given back
        reservation = await meter.reserve(limits, model, 5, 10, 100, now)
        assert reservation is not None
        await meter.settle(reservation, NOTHING_USED)
    used = await meter.reserve(limits, model, 5, 10, 100, now)
    assert used is not None
    await meter.settle(used, Cost(5, 10, 0))  # went up: counted
    with pytest.raises(RateLimited):
        await meter.reserve(limits, model, 5, 10, 100, now)


async def test_output_is_reserved_and_capped_once_per_answer() -> None:
    """``n: 5`` asks for five answers of up to max tokens each: five times the output is
    reserved, and a tight budget caps each answer to a fifth of what is left."""
    limits, model = policy_with([{"unit": "output_tokens", "window": "day", "limit": 1000}])
    meter, now = Meter(MemoryStore()), datetime.now(UTC)
    reservation = await meter.reserve(limits, model, 5, 100, 4096, now, answers=5)
    assert reservation is not None and reservation.reserved.output_tokens == 500
    with pytest.raises(RateLimited):  # 500 more for five answers of 100: 1,000 + 0 left
        await meter.reserve(limits, model, 5, 101, 4096, now, answers=5)
    capped = await meter.reserve(limits, model, 5, None, 4096, now, answers=5)
    assert capped is not None and capped.output_cap == 100  # 500 left, five answers
    assert capped.reserved.output_tokens == 500


async def test_per_model_limits_with_and_without_globs_share_the_models_counter() -> None:
    """Per model, a limit on some models and one on all count the same model's counter:
    the tighter rules (they used to name one counter twice, a 500 for every request)."""
    limits, model = policy_with(
        [
            {"unit": "requests", "window": "day", "limit": 50, "per_model": True},
            {
                "unit": "requests",
                "window": "day",
                "limit": 1,
                "per_model": True,
                "models": ["gpt-4o*"],
            },
        ]
    )
    meter, now = Meter(MemoryStore()), datetime.now(UTC)
    assert await meter.reserve(limits, model, 1, 1, 1, now) is not None
    with pytest.raises(RateLimited):
        await meter.reserve(limits, model, 1, 1, 1, now)


SONNET = {"pricing": {"input": 3, "cache_write": 3.75, "output": 15}}
"""Anthropic's prices: a cache write at 1.25x the input."""


def usd_a_day(limit: int) -> list[dict[str, object]]:
    return [{"unit": "usd", "window": "day", "limit": limit}]


async def test_a_prompt_that_may_be_written_to_the_cache_is_reserved_at_that_price() -> None:
    """Anthropic bills a cache write at 1.25x the input price; reserved at the input price,
    a request that wrote its prompt to the cache settled above what it had reserved."""
    cheaper_writes = {"pricing": {"input": 1, "cache_write": 0.5, "output": 2}}
    limits, models = limited(
        usd_a_day(100), {"claude-sonnet": SONNET, "gpt-4o-mini": cheaper_writes}
    )
    meter, now = Meter(MemoryStore()), datetime.now(UTC)
    reserved = {}
    for name, model in models.items():
        reservation = await meter.reserve(limits, model, 100_000, 1_000, 4096, now)
        assert reservation is not None
        reserved[name] = reservation.reserved.micro_usd
    # 100k prompt tokens at the cache-write price, 1k output; a cheaper write: the input
    assert reserved == {"claude-sonnet": 375_000 + 15_000, "gpt-4o-mini": 100_000 + 2_000}


async def test_a_tight_budget_caps_the_output_by_the_cache_write_price_too() -> None:
    """What is left for output is worked out at the price the prompt is reserved at: at
    the input price, the capped request's reservation did not fit and it was refused."""
    limits, models = limited(usd_a_day(1), {"claude-sonnet": SONNET})
    reservation = await Meter(MemoryStore()).reserve(
        limits, models["claude-sonnet"], 200_000, None, 100_000, datetime.now(UTC)
    )
    # $1 less 200k prompt tokens at $3.75/M leaves $0.25: 16,666 output tokens at $15/M.
    assert reservation is not None and reservation.output_cap == 16_666
    assert reservation.reserved.micro_usd <= 1_000_000


async def test_a_request_asking_for_the_hour_cache_is_reserved_at_its_write_price() -> None:
    """A cache_control with ttl 1h writes the prompt at twice the input price (or the
    catalogue's cache_write_1h): reserved at 1.25x, it settled far above its reservation
    (a $100k-token prompt: $0.375 reserved, $0.60 billed)."""
    hour = {"pricing": {"input": 3, "cache_write": 3.75, "cache_write_1h": 6, "output": 15}}
    limits, models = limited(usd_a_day(100), {"claude-sonnet": SONNET, "claude-hour": hour})
    meter, now = Meter(MemoryStore()), datetime.now(UTC)
    reserved = {}
    for name, model in models.items():
        reservation = await meter.reserve(limits, model, 100_000, 1_000, 4096, now, hour_cache=True)
        assert reservation is not None
        reserved[name] = reservation.reserved.micro_usd
    # Twice the input price by default ($6/M), or the catalogue's; 1k output at $15/M.
    assert reserved == {"claude-sonnet": 600_000 + 15_000, "claude-hour": 600_000 + 15_000}
    usage = Usage(100_000, 1_000, 0, 100_000, 100_000)
    assert usage_cost(models["claude-sonnet"], usage).micro_usd == reserved["claude-sonnet"]


def test_a_cache_control_asking_for_an_hour_is_seen_wherever_it_is() -> None:
    hour = {"type": "ephemeral", "ttl": "1h"}
    base: dict[str, Any] = {"model": "claude", "max_tokens": 8}
    user = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    cases = [
        {**base, "messages": [user], "cache_control": hour},
        {
            **base,
            "messages": [user],
            "system": [{"type": "text", "text": "s", "cache_control": hour}],
        },
        {
            **base,
            "messages": [user],
            "tools": [{"name": "t", "input_schema": {}, "cache_control": hour}],
        },
        {
            **base,
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": hour}]}
            ],
        },
    ]
    nested = {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "t",
                "content": [{"type": "text", "text": "x", "cache_control": hour}],
            }
        ],
    }
    cases.append({**base, "messages": [nested]})
    assert [asks_hour_cache(DIALECT.parse(case).body) for case in cases] == [True] * 5
    five = {**base, "messages": [user], "cache_control": {"type": "ephemeral", "ttl": "5m"}}
    assert not asks_hour_cache(five)
    # A chat request's parts keep their cache_control when translated for Claude.
    chat_part = {"type": "text", "text": "x", "cache_control": hour}
    chat = {"model": "claude", "messages": [{"role": "user", "content": [chat_part]}]}
    assert asks_hour_cache(CHAT_DIALECT.parse(chat).body)


async def test_a_precheck_asks_for_the_smallest_cap_the_api_accepts() -> None:
    """As reserve offers it: a Responses request a budget affords 10 output tokens of
    passed the authorizer's precheck, only to be refused one hop later."""
    limits, model = policy_with([{"unit": "total_tokens", "window": "day", "limit": 15}])
    meter = Meter(MemoryStore())
    now = datetime.now(UTC)
    await meter.precheck(limits, model, 5, None, now)  # chat: one token is a cap
    with pytest.raises(RateLimited):
        await meter.precheck(limits, model, 5, None, now, min_output_cap=16)
    with pytest.raises(RateLimited):
        await meter.reserve(limits, model, 5, None, 100, now, min_output_cap=16)
