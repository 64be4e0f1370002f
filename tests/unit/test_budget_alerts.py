"""Budget alerts: crossing thresholds posts one event per threshold and window, with retries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from extproc.budgets import alerts
from extproc.budgets.alerts import AlertSink, ThresholdCrossed, Watch, reached
from extproc.budgets.keys import Scope, Unit, counter_key, key_fields
from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.meter import NOTHING_USED, Cost, Meter, Reservation
from extproc.budgets.resilient_store import FailMode, ResilientStore
from extproc.budgets.windows import Window
from extproc.exchange import Exchange
from extproc.ticket import TicketSigner, signing_key
from tests.unit.policies import make_policy
from tests.unit.test_budget_meter import policy_with
from tests.unit.test_budget_stores import FAST, FlakyStore, until


@pytest.mark.parametrize(
    ("used", "expected"),
    [
        pytest.param(49, [], id="below"),
        pytest.param(50, [50], id="exactly-50"),
        pytest.param(85, [50, 80], id="two"),
        pytest.param(130, [50, 80, 100], id="over-the-limit"),
    ],
)
def test_reached(used: int, expected: list[int]) -> None:
    assert reached(used, 100, (50, 80, 100)) == expected


def test_a_counter_key_reads_back_as_its_fields() -> None:
    key = counter_key(Scope.TEAM, "eu:search%2", "gpt-4o", Unit.USD, Window.DAY, 1767225600)
    assert key_fields(key) == ("team", "eu:search%2", "gpt-4o", "usd", "day", "1767225600")


async def test_thresholds_post_once_per_window_with_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(alerts, "RETRY_DELAYS", (0.01, 0.01))
    received: list[dict[str, Any]] = []
    attempts = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            return web.Response(status=500)  # the first delivery fails and is retried
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with TestServer(app) as server:
        limits, model = policy_with(
            [{"unit": "total_tokens", "window": "day", "limit": 100, "alerts": [50, 80, 100]}]
        )
        store = MemoryStore()
        outcomes: list[str] = []
        sink = AlertSink(store, lambda: str(server.make_url("/hook")), outcomes.append)
        meter = Meter(store, sink)
        now = datetime.now(UTC)
        first = await meter.reserve(limits, model, 30, 30, 0, now)  # 60 reserved: no alert
        assert first is not None
        await meter.settle(first, Cost(10, 10, 0))  # 20 used
        second = await meter.reserve(limits, model, 20, 20, 0, now)
        assert second is not None
        await meter.settle(second, Cost(20, 20, 0))  # 20 → 60 used: crosses 50
        third = await meter.reserve(limits, model, 10, 15, 0, now)
        assert third is not None
        await meter.settle(third, Cost(10, 15, 0))  # 60 → 85: crosses 80
        # No output cap asked: the 15 tokens left are offered (5 of output), and used.
        last = await meter.reserve(limits, model, 10, None, 1000, now)
        assert last is not None and last.output_cap == 5
        await meter.settle(last, Cost(10, 5, 0))  # 85 → 100: the budget is spent
        await sink.close()
    assert [(e["threshold_percent"], e["used"]) for e in received] == [
        (50, 60),
        (80, 85),
        (100, 100),
    ]
    assert received[0]["type"] == "budget.threshold_crossed"
    assert (received[0]["scope"], received[0]["scope_id"], received[0]["unit"]) == (
        "team",
        "t",
        "total_tokens",
    )
    assert sink.sent == 3 and sink.failed == 0
    assert outcomes == ["sent", "sent", "sent"]  # what /metrics counts (extproc_budget_alerts)


def exchange_with(reservation: Reservation) -> Exchange:
    return Exchange(make_policy(), reservation=reservation)


class Sink(AlertSink):
    """Keeps what it is handed, to see which thresholds were judged crossed."""

    def __init__(self) -> None:
        super().__init__(MemoryStore(), lambda: None)
        self.events: list[ThresholdCrossed] = []

    def notify(self, event: ThresholdCrossed) -> None:
        self.events.append(event)
        self._remember((event.counter_key, event.threshold_percent), event.expires_at)


async def test_a_reservation_given_back_raises_no_alert() -> None:
    """A request reserved at its worst case (most of the budget) that used little, or
    never went upstream, has not spent the budget: nothing to alert about."""
    limits, model = policy_with(
        [{"unit": "total_tokens", "window": "day", "limit": 1000, "alerts": [50, 80]}]
    )
    sink = Sink()
    meter = Meter(MemoryStore(), sink)
    now = datetime.now(UTC)
    big = await meter.reserve(limits, model, 10, 900, 0, now)  # 91 % reserved
    assert big is not None
    await meter.settle(big, Cost(10, 20, 0))
    refused = await meter.reserve(limits, model, 10, 900, 0, now)
    assert refused is not None
    await meter.settle(refused, NOTHING_USED)
    await meter.settle(refused, Cost(10, 900, 0))  # a replay of the settlement changes nothing
    assert sink.events == []


class BrokenSink(Sink):
    def notify(self, event: ThresholdCrossed) -> None:
        raise RuntimeError("unexpected")


async def test_a_failure_judging_alerts_does_not_fail_the_settlement() -> None:
    """The store has applied it by then: a settlement that raised would be tried again by
    an exchange's access-log record, find its token used, and report nothing."""
    limits, model = policy_with(
        [{"unit": "total_tokens", "window": "day", "limit": 100, "alerts": [50]}]
    )
    store = MemoryStore()
    meter = Meter(store, BrokenSink())
    reservation = await meter.reserve(limits, model, 10, 40, 0, datetime.now(UTC))
    assert reservation is not None
    assert await meter.apply(reservation.settlement, Cost(10, 50, 0))  # 60 %: judged
    assert sorted(store._entries.values())[-1][0] == 60


async def test_a_settlement_in_another_process_raises_the_alert_its_ticket_names() -> None:
    """Under --workers or replicas the process settling an exchange never saw its request:
    the thresholds travel in the ticket, and the event names the limit as the meter did."""
    limits, model = policy_with(
        [
            {
                "unit": "requests",
                "window": "day",
                "limit": 2,
                "per_model": True,
                "alerts": [50, 100],
            }
        ]
    )
    store = MemoryStore()
    deciding, settling = Meter(store), Sink()
    signer = TicketSigner(signing_key("shared"))
    now = datetime.now(UTC)
    for _ in range(2):
        reservation = await deciding.reserve(limits, model, 1, 1, 1, now)
        assert reservation is not None
        carried = signer.read(signer.issue(exchange_with(reservation)).text).settlement
        assert carried == reservation.settlement
        await Meter(store, settling).apply(carried, Cost(1, 1, 0))
    assert [(e.threshold_percent, e.used, e.limit, e.model) for e in settling.events] == [
        (50, 1, 2, "gpt-4o-mini"),
        (100, 2, 2, "gpt-4o-mini"),
    ]
    assert settling.events[0].window == "day" and settling.events[0].unit == "requests"


async def test_tool_call_limits_raise_alerts_as_calls_are_counted() -> None:
    limits, _ = policy_with(
        [{"unit": "requests", "window": "day", "limit": 4, "tools": ["jira.*"], "alerts": [50]}]
    )
    sink = Sink()
    meter = Meter(MemoryStore(), sink)
    now = datetime.now(UTC)
    await meter.reserve_tools(limits, "demo", ["jira.search"], now)
    assert sink.events == []
    await meter.reserve_tools(limits, "demo", ["jira.search", "jira.create_issue"], now)
    [event] = sink.events
    assert (event.threshold_percent, event.used, event.model) == (50, 3, "mcp:demo")


async def test_alerts_never_block_the_request_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerts, "DRAIN_SECONDS", 0.05)
    limits, model = policy_with([{"unit": "requests", "window": "day", "limit": 2, "alerts": [50]}])
    store = MemoryStore()
    sink = AlertSink(store, lambda: "http://127.0.0.1:9/unreachable")
    meter = Meter(store, sink)
    reservation = await meter.reserve(limits, model, 1, 1, 1, datetime.now(UTC))
    assert reservation is not None
    await meter.settle(reservation, Cost(1, 1, 0))
    # The settlement returned with the alert still queued: delivery happens later.
    assert sink._queue.qsize() == 1
    await sink.close()


@pytest.mark.parametrize("mode", [FailMode.OPEN, FailMode.CLOSED])
async def test_thresholds_reached_while_redis_is_down_are_raised_once_it_answers(
    mode: FailMode,
) -> None:
    """During an outage a process sees only its own share of the counters (a stand-in
    store): no alert is judged on that; the first settlement once Redis answers again
    judges the shared counter, which then holds the outage's usage too."""
    limits, model = policy_with(
        [{"unit": "total_tokens", "window": "day", "limit": 1000, "alerts": [10, 50]}]
    )
    primary = FlakyStore()
    store = ResilientStore(primary, mode, backoff=FAST)
    sink = Sink()
    meter = Meter(store, sink)
    now = datetime.now(UTC)
    first = await meter.reserve(limits, model, 50, 50, 0, now)
    assert first is not None
    primary.down = True
    await meter.settle(first, Cost(50, 50, 0))  # 100 used: 10 % reached, not judged
    assert sink.events == []
    primary.down = False
    await until(lambda: not store.stats().degraded)
    second = await meter.reserve(limits, model, 200, 250, 0, now)
    assert second is not None
    await meter.settle(second, Cost(200, 250, 0))  # 550 used
    assert [(e.threshold_percent, e.used) for e in sink.events] == [(10, 550), (50, 550)]
    await store.close()


def crossing(percent: int, key: str = "team:t:*:requests:day:0") -> ThresholdCrossed:
    watch = Watch(0, 100, (50, 80), per_model=False)
    return watch.event(key, "requests", 4_000_000_000, percent, percent)


async def test_a_threshold_dropped_on_a_full_queue_is_offered_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(alerts, "QUEUE_SIZE", 1)
    sink = AlertSink(MemoryStore(), lambda: None)
    sink.notify(crossing(50))
    sink.notify(crossing(80))  # the queue is full: dropped, and not remembered as raised
    assert sink.dropped == 1
    assert sink.raised("team:t:*:requests:day:0", 50)
    assert not sink.raised("team:t:*:requests:day:0", 80)
    await sink.close()


def test_remembered_thresholds_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past REMEMBERED, those of ended windows go, and the older half if most are live."""
    monkeypatch.setattr(alerts, "REMEMBERED", 8)
    sink = AlertSink(MemoryStore(), lambda: None)
    for i in range(8):
        sink._remember((f"live-{i}", 50), 2**40)
    sink._remember(("newest", 50), 2**40)
    assert not sink.raised("live-0", 50) and sink.raised("live-7", 50)
    assert sink.raised("newest", 50) and len(sink._raised) <= 5
    for i in range(3):
        sink._remember((f"ended-{i}", 50), 1)  # windows long over
    sink._remember(("later", 50), 2**40)
    assert not sink.raised("ended-0", 50) and sink.raised("later", 50)


async def test_a_tool_limit_alert_names_a_server_whose_name_holds_a_colon() -> None:
    limits, _ = policy_with(
        [{"unit": "requests", "window": "day", "limit": 4, "tools": ["jira.*"], "alerts": [50]}]
    )
    sink = Sink()
    await Meter(MemoryStore(), sink).reserve_tools(
        limits, "corp:search", ["jira.search", "jira.create"], datetime.now(UTC)
    )
    [event] = sink.events
    assert event.model == "mcp:corp:search"
