"""Budget threshold alerts: one event per budget, threshold and window, off the request path.

Thresholds are judged on what was used, not on what is reserved: a limit's own counter
also holds what the requests in flight reserved at their worst case, so a big reservation
given back a moment later would raise an alert (and, since a reservation never takes a
counter past its limit, 100 % would almost never be reached). A limit with alerts
therefore keeps a second counter beside its own (:func:`~extproc.budgets.keys.used_key`),
moved only when exchanges are settled, by what each used; a tool-call limit, whose
reservations are never given back, is judged on its own counter when calls are counted.
That counter starts with the first settlement that moves it: after an upgrade from a
version without it, or alerts added to a limit, it counts from then on, for the rest of
that window.

After each settlement (or tool call) the meter hands over every threshold the counter has
reached and this process has not raised yet in that window (:meth:`AlertSink.raised`): a
threshold passed while the values came from a stand-in store during a Redis outage
(which this process alone has counted) is judged at the first settlement once Redis
answers again. A background task claims each in the budget store (an all-or-nothing
counter with a limit of 1, so across workers and replicas exactly one claim wins per
window), logs it, and POSTs it to the policy's webhook with retries. A full queue is
counted and logged, never waited on.

aiohttp, the webhook's client, is imported on the first POST, in a thread: most
processes never send one, and its import costs ~13 MB and ~90 ms that would otherwise
sit in every process (or stall the event loop when the first alert fires).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from extproc.budgets.keys import ANY, key_fields
from extproc.budgets.store import BudgetStore, Counter, StoreUnavailable

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

QUEUE_SIZE = 1024
RETRY_DELAYS = (0.2, 1.0, 5.0)
DRAIN_SECONDS = 1.5
REMEMBERED = 10_000
"""Thresholds a process remembers having raised; past it, those of ended windows go, and
the older half if most are still live."""


@dataclass(frozen=True, slots=True)
class ThresholdCrossed:
    scope: str
    scope_id: str
    model: str
    unit: str
    window: str
    window_ends_at: str
    threshold_percent: int
    used: int
    limit: int
    counter_key: str
    expires_at: int

    def payload(self) -> dict[str, Any]:
        data = asdict(self)
        del data["counter_key"], data["expires_at"]
        return {"type": "budget.threshold_crossed", **data}


@dataclass(frozen=True, slots=True)
class Watch:
    """A counter whose limit raises alerts: a few plain values, so that it travels in an
    exchange's ticket to the process that settles it; what an alert names beside them
    (scope, id, model, window) is read from the counter's key when one is raised."""

    counter: int
    """The counter's place among those reserved (and settled) together."""
    limit: int
    thresholds: tuple[int, ...]
    per_model: bool
    """The limit counts each model (or MCP tool) apart: its counter's key names it."""

    def event(
        self, counter_key: str, unit: str, expires_at: int, percent: int, used: int
    ) -> ThresholdCrossed:
        scope, scope_id, subject, _, window, _ = key_fields(counter_key)
        if self.per_model:
            model = subject
        elif subject.startswith("mcp:"):
            head, _, tag = subject.rpartition(":")
            model = head if tag.startswith("only-") else subject  # mcp:<server>, no tag
        else:
            model = ANY
        return ThresholdCrossed(
            scope=scope,
            scope_id=scope_id,
            model=model,
            unit=unit,
            window=window,
            window_ends_at=window_end_iso(expires_at),
            threshold_percent=percent,
            used=used,
            limit=self.limit,
            counter_key=counter_key,
            expires_at=expires_at,
        )


def reached(used: int, limit: int, thresholds: tuple[int, ...]) -> list[int]:
    """Thresholds (percent of ``limit``) that ``used`` has reached, lowest first."""
    return [t for t in thresholds if t * limit <= used * 100]


def window_end_iso(expires_at: int) -> str:
    return datetime.fromtimestamp(expires_at, UTC).isoformat().replace("+00:00", "Z")


class AlertSink:
    """A bounded queue and one sender task; ``webhook`` is read per event (hot reload)."""

    def __init__(
        self,
        store: BudgetStore,
        webhook: Callable[[], str | None],
        on_outcome: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self._store = store
        self._webhook = webhook
        self._on_outcome = on_outcome
        """Called with ``sent``, ``failed`` or ``dropped`` per webhook delivery (metrics)."""
        self._queue: asyncio.Queue[ThresholdCrossed] = asyncio.Queue(QUEUE_SIZE)
        self._raised: dict[tuple[str, int], int] = {}
        """(counter key, threshold) → window end, for those this process handed over."""
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.dropped = 0
        self.sent = 0
        self.failed = 0

    def raised(self, counter_key: str, percent: int) -> bool:
        """Whether this process has handed over ``percent`` of that counter's window (its
        claim in the store, made once per process, settles it across processes)."""
        return (counter_key, percent) in self._raised

    def notify(self, event: ThresholdCrossed) -> None:
        """Hand an event over without waiting; never raises. One dropped on a full queue is
        not remembered: the next settlement that finds its threshold reached offers it
        again."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="budget-alerts")
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            self._on_outcome("dropped")
            log.error("budget alert queue full; dropped %s", event.payload())
            return
        self._remember((event.counter_key, event.threshold_percent), event.expires_at)

    def _remember(self, raised: tuple[str, int], expires_at: int) -> None:
        if len(self._raised) >= REMEMBERED:
            now = time.time()
            live = {key: end for key, end in self._raised.items() if end > now}
            if len(live) > REMEMBERED * 3 // 4:
                # The older half goes (a dict keeps its order): forgetting one costs a
                # claim in the store, not a second alert.
                live = dict(list(live.items())[len(live) // 2 :])
            self._raised = live
        self._raised[raised] = expires_at

    async def close(self) -> None:
        """Deliver what is queued (for at most ``DRAIN_SECONDS``), then stop."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), DRAIN_SECONDS)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._handle(event)
            except Exception:
                log.exception("budget alert failed")
            finally:
                self._queue.task_done()

    async def _handle(self, event: ThresholdCrossed) -> None:
        claim = Counter(
            f"alert:{event.counter_key}:{event.threshold_percent}", 1, 1, event.expires_at
        )
        try:
            if not (await self._store.reserve([claim])).ok:
                return  # another worker or replica already raised this one
        except StoreUnavailable:
            pass  # better a duplicate alert than a missed one
        log.warning("budget threshold crossed: %s", event.payload())
        url = self._webhook()
        if url:
            await self._post(url, event.payload())

    async def _post(self, url: str, payload: dict[str, Any]) -> None:
        if "aiohttp" not in sys.modules:
            await asyncio.to_thread(importlib.import_module, "aiohttp")
        import aiohttp  # imported by the thread above, off the event loop

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        for delay in (*RETRY_DELAYS, None):
            try:
                async with self._session.post(url, json=payload) as response:
                    if response.status < 300:
                        self.sent += 1
                        self._on_outcome("sent")
                        return
                    reason = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = type(exc).__name__
            if delay is None:
                self.failed += 1
                self._on_outcome("failed")
                log.error("budget alert webhook gave up after retries (%s)", reason)
                return
            await asyncio.sleep(delay)
