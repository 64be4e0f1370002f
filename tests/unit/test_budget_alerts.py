"""Budget alerts: crossing thresholds posts one event per threshold and window, with retries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from extproc.budgets import alerts
from extproc.budgets.alerts import AlertSink, crossed
from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.meter import Cost, Meter
from tests.unit.test_budget_meter import policy_with


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        pytest.param(0, 49, [], id="below"),
        pytest.param(0, 50, [50], id="exactly-50"),
        pytest.param(40, 85, [50, 80], id="two-at-once"),
        pytest.param(50, 60, [], id="already-past"),
        pytest.param(90, 130, [100], id="over-the-limit"),
    ],
)
def test_crossed(before: int, after: int, expected: list[int]) -> None:
    assert crossed(before, after, 100, (50, 80, 100)) == expected


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
        first = await meter.reserve(limits, model, 30, 30, 0, now)  # 0 → 60: crosses 50
        assert first is not None
        await meter.settle(first, Cost(10, 10, 0))  # back down to 20
        await meter.reserve(limits, model, 20, 20, 0, now)  # 20 → 60: 50 again, same window
        await meter.reserve(limits, model, 10, 15, 0, now)  # 60 → 85: crosses 80
        await sink.close()
    assert [(e["threshold_percent"], e["used"]) for e in received] == [(50, 60), (80, 85)]
    assert received[0]["type"] == "budget.threshold_crossed"
    assert (received[0]["scope"], received[0]["scope_id"], received[0]["unit"]) == (
        "team",
        "t",
        "total_tokens",
    )
    assert sink.sent == 2 and sink.failed == 0
    assert outcomes == ["sent", "sent"]  # what /metrics counts (extproc_budget_alerts)


async def test_alerts_never_block_the_request_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerts, "DRAIN_SECONDS", 0.05)
    limits, model = policy_with([{"unit": "requests", "window": "day", "limit": 2, "alerts": [50]}])
    store = MemoryStore()
    sink = AlertSink(store, lambda: "http://127.0.0.1:9/unreachable")
    meter = Meter(store, sink)
    await meter.reserve(limits, model, 1, 1, 1, datetime.now(UTC))
    # The reservation returned with the alert still queued: delivery happens later.
    assert sink._queue.qsize() == 1
    await sink.close()
