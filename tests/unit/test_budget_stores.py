"""Budget stores: one behaviour table run against MemoryStore, RedisStore and Redis Cluster,
then ResilientStore's fail modes against a fake primary and a real Redis that dies.

Redis-backed cases use ``EXTPROC_TEST_REDIS_URL`` (default db 15 on 127.0.0.1:6379) with a
unique key prefix per test, deleted afterwards; throwaway ``redis-server`` processes on free
ports cover Redis Cluster and outages. Both fail when unavailable: Redis is part of the suite.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from extproc.budgets import resilient_store
from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.meter import Cost, Meter
from extproc.budgets.redis_store import RedisStore, _Batcher
from extproc.budgets.resilient_store import FailMode, ResilientStore
from extproc.budgets.store import (
    EXPIRY_SLACK_SECONDS,
    TOKEN_TTL_SECONDS,
    AdjustResult,
    BudgetStore,
    Counter,
    Delta,
    ReserveResult,
    StoreUnavailable,
)
from tests.redis_server import RedisServer, free_port
from tests.unit.test_budget_meter import policy_with

REDIS_URL = os.environ.get("EXTPROC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REDIS_SERVER = shutil.which("redis-server")


def window_end(seconds: int = 60) -> int:
    return int(time.time()) + seconds


# --- the behaviour table, for every store ---------------------------------------------------


@dataclass
class Harness:
    store: BudgetStore
    ttl: Callable[[str], Awaitable[int | None]]
    """Seconds until a counter expires (None if it has no expiry or does not exist)."""


async def _redis_harness(url: str, cluster: bool = False) -> AsyncIterator[Harness]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    # A generous timeout: a loaded CI machine must not look like a Redis outage here.
    store = RedisStore.from_url(url, prefix=prefix, cluster=cluster, timeout=2.0)
    try:
        await store.ping()
    except StoreUnavailable as error:
        await store.close()
        pytest.fail(f"no Redis at {url}: {error}")
    raw = store.client

    async def ttl(key: str) -> int | None:
        seconds = int(await raw.ttl(store.key(key)))
        return seconds if seconds >= 0 else None

    yield Harness(store, ttl)
    stale = [k async for k in raw.scan_iter(match=f"{{{prefix}}}:*")]
    if stale:
        await raw.delete(*stale)
    await store.close()


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        store = MemoryStore()

        async def ttl(key: str) -> int | None:
            expiry = store.expiry(key)
            return None if expiry is None else expiry - int(time.time())

        yield Harness(store, ttl)
    elif request.param == "redis":
        async for h in _redis_harness(REDIS_URL):
            yield h
    else:
        cluster: RedisServer = request.getfixturevalue("cluster_server")
        async for h in _redis_harness(cluster.url, cluster=True):
            yield h


async def test_reserve_adds_to_every_counter(harness: Harness) -> None:
    end = window_end()
    first = await harness.store.reserve([Counter("a", 10, 3, end), Counter("b", 5, 4, end)])
    assert first == ReserveResult(True, (3, 4))
    second = await harness.store.reserve([Counter("a", 10, 7, end), Counter("b", 5, 1, end)])
    assert second == ReserveResult(True, (10, 5)), "reaching the limit exactly is allowed"


@pytest.mark.parametrize(
    ("amounts", "failed"),
    [
        pytest.param((1, 2), 1, id="second-fails"),
        pytest.param((8, 2), 0, id="first-named-when-both-fail"),
        pytest.param((0, 2), 1, id="zero-amount-passes-under-limit"),
    ],
)
async def test_reserve_is_all_or_nothing(
    harness: Harness, amounts: tuple[int, int], failed: int
) -> None:
    end = window_end()
    await harness.store.reserve([Counter("a", 10, 3, end), Counter("b", 5, 4, end)])
    result = await harness.store.reserve(
        [Counter("a", 10, amounts[0], end), Counter("b", 5, amounts[1], end)]
    )
    assert result == ReserveResult(False, (3, 4), failed, ("a", "b")[failed])
    assert await harness.store.read(["a", "b"]) == (3, 4), "nothing was added"


async def test_counter_already_over_its_limit_rejects_even_zero(harness: Harness) -> None:
    end = window_end()
    await harness.store.adjust([Delta("a", 12, end)])
    result = await harness.store.reserve([Counter("a", 10, 0, end)])
    assert (result.ok, result.failed, result.values) == (False, 0, (12,))


@pytest.mark.parametrize(
    ("deltas", "values"),
    [
        pytest.param((-2,), (3,), id="give-back"),
        pytest.param((+4,), (9,), id="charge-more"),
        pytest.param((+20,), (25,), id="past-the-limit"),
        pytest.param((-7,), (0,), id="never-below-zero"),
        pytest.param((0,), (5,), id="zero"),
    ],
)
async def test_adjust_applies_signed_deltas(
    harness: Harness, deltas: tuple[int, ...], values: tuple[int, ...]
) -> None:
    end = window_end()
    await harness.store.reserve([Counter("a", 10, 5, end)])
    assert (await harness.store.adjust([Delta("a", d, end) for d in deltas])).values == values
    assert await harness.store.read(["a"]) == values


async def test_a_settlement_that_changes_nothing_still_cannot_be_replayed(
    harness: Harness,
) -> None:
    """Used exactly what was reserved: every store must still remember the token, or a
    replayed record with other figures would be applied."""
    limits, model = policy_with([{"unit": "total_tokens", "window": "day", "limit": 1000}])
    meter = Meter(harness.store)
    reservation = await meter.reserve(limits, model, 50, 200, 100, datetime.now(UTC))
    assert reservation is not None
    await meter.apply(reservation.settlement, reservation.reserved)
    await meter.apply(reservation.settlement, Cost(0, 0, 0))  # a replay claiming nothing
    assert await harness.store.read([c.key for c in reservation.counters]) == (250,)


async def test_adjust_with_a_token_applies_once(harness: Harness) -> None:
    end = window_end()
    deltas = [Delta("a", 4, end), Delta("b", -1, end)]
    # b has nothing to give back: a counter never goes below 0 (it would owe the next one).
    assert await harness.store.adjust(deltas, token="req-1") == AdjustResult((4, 0))
    # Replayed: nothing applied, and the caller learns so (its exchange is reported once).
    assert await harness.store.adjust(deltas, token="req-1") == AdjustResult((4, 0), False)
    assert await harness.store.adjust(deltas, token="req-2") == AdjustResult((8, 0))


async def test_reservations_made_together_are_judged_in_turn(harness: Harness) -> None:
    """On Redis, reservations of one event-loop turn share a script call; each stays
    all-or-nothing and sees the ones before it."""
    end = window_end()
    results = await asyncio.gather(
        *(
            harness.store.reserve([Counter("shared", 10, 4, end), Counter(f"own-{i}", 9, 1, end)])
            for i in range(3)
        )
    )
    assert [r.ok for r in results] == [True, True, False]
    assert [r.values for r in results] == [(4, 1), (8, 1), (8, 0)]
    assert results[2].failed_key == "shared"
    assert await harness.store.read(["shared", "own-2"]) == (8, 0)


async def test_concurrent_adjusts_each_apply_once_with_their_own_values(
    harness: Harness,
) -> None:
    """Adjusts made together (one access-log batch) go out together on Redis: each must still
    apply once under its token and get back its own counters' values."""
    end = window_end()
    first = [Delta("a", 3, end), Delta("b", 1, end)]
    results = await asyncio.gather(
        harness.store.adjust(first, token="t-1"),
        harness.store.adjust([Delta("a", 2, end)]),
        harness.store.adjust(first, token="t-1"),  # a retried settlement: no effect
        harness.store.adjust([Delta("c", -4, end), Delta("a", 1, end)], token="t-2"),
    )
    assert [r.values for r in results] == [(3, 1), (5,), (5, 1), (0, 6)]
    assert [r.applied for r in results] == [True, True, False, True]
    assert await harness.store.read(["a", "b", "c"]) == (6, 1, 0)


async def test_a_lone_redis_call_goes_at_once_and_calls_that_come_together_share_one() -> None:
    """A request that arrives on its own waits for no turn of the event loop before its
    Redis call leaves; calls made while one is under way, or in the turn of a batch that
    had company, share the round trip."""
    sent: list[list[int]] = []
    answer = asyncio.Event()

    async def send(items: list[int]) -> list[int]:
        sent.append(items)
        await answer.wait()
        return [item * 10 for item in items]

    batcher: _Batcher[int, int] = _Batcher(send)
    first = asyncio.ensure_future(batcher(1))
    await asyncio.sleep(0)  # the caller's own turn
    assert sent == [[1]]
    meanwhile = [asyncio.ensure_future(batcher(item)) for item in (2, 3)]
    answer.set()
    assert await asyncio.gather(first, *meanwhile) == [10, 20, 30]
    assert sent == [[1], [2, 3]]
    # The last batch had company: a call waits for its turn's, even alone.
    sixth = asyncio.ensure_future(batcher(6))
    await asyncio.sleep(0)
    assert sent[-1] == [2, 3]
    assert await sixth == 60 and sent[-1] == [6]
    # Calls come one at a time again: at once.
    seventh = asyncio.ensure_future(batcher(7))
    await asyncio.sleep(0)
    assert sent[-1] == [7]
    assert await seventh == 70


async def test_a_settlement_reaching_a_lost_counter_does_not_make_it_owe(
    harness: Harness,
) -> None:
    """Redis restarted without persistence (or failed over, or evicted the key) between a
    reservation and its settlement: the settlement's give-back must not start the counter
    below 0, or the next requests would be admitted past the limit by that much."""
    end = window_end()
    await harness.store.reserve([Counter("a", 10_000, 4196, end)])
    await harness.store.adjust([Delta("a", -10_000, end)])  # the counter is gone: reset
    assert (await harness.store.adjust([Delta("a", 150 - 4196, end)], token="t")).values == (0,)
    admitted = [await harness.store.reserve([Counter("a", 10_000, 4196, end)]) for _ in range(3)]
    assert [r.ok for r in admitted] == [True, True, False]


async def test_read_missing_counters_is_zero(harness: Harness) -> None:
    assert await harness.store.read(["nope", "nada"]) == (0, 0)
    assert await harness.store.read([]) == ()


async def test_counters_expire_with_their_window(harness: Harness) -> None:
    end = window_end(60)
    await harness.store.reserve([Counter("r", 10, 1, end)])
    await harness.store.adjust([Delta("d", 1, end)])
    for key in ("r", "d"):
        ttl = await harness.ttl(key)
        assert ttl is not None
        assert 0 < ttl <= 60 + EXPIRY_SLACK_SECONDS


async def test_writes_to_a_long_gone_window_are_dropped(harness: Harness) -> None:
    gone = int(time.time()) - EXPIRY_SLACK_SECONDS - 10
    assert (await harness.store.adjust([Delta("old", 5, gone)])).values == (5,)
    assert await harness.store.read(["old"]) == (0,)


@pytest.mark.parametrize(
    ("counters", "fragment"),
    [
        pytest.param([("a", 1), ("a", 1)], "same counter twice", id="duplicate"),
        pytest.param([("a", -1)], "negative reservation", id="negative"),
    ],
)
async def test_caller_bugs_are_value_errors(
    harness: Harness, counters: list[tuple[str, int]], fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        await harness.store.reserve([Counter(k, 10, a, window_end()) for k, a in counters])


async def test_concurrent_reserves_admit_exactly_the_limit(harness: Harness) -> None:
    end = window_end()
    counters = [Counter("hot", 20, 1, end), Counter("global", 1_000, 1, end)]
    results = await asyncio.gather(*(harness.store.reserve(counters) for _ in range(50)))
    assert sum(r.ok for r in results) == 20
    assert await harness.store.read(["hot", "global"]) == (20, 20)


async def test_memory_store_expiry_follows_its_clock() -> None:
    now = [1_000.0]
    store = MemoryStore(clock=lambda: now[0], slack=10)
    await store.reserve([Counter("a", 5, 5, 1_060)])
    now[0] = 1_069.0
    assert await store.read(["a"]) == (5,)
    now[0] = 1_070.0
    assert await store.read(["a"]) == (0,)
    assert (await store.reserve([Counter("a", 5, 5, 1_120)])).ok
    now[0] = 2_000.0
    await store.read(["b"])
    await store.adjust([])  # a write sweeps expired entries
    assert len(store) == 0


async def test_memory_store_forgets_settlement_tokens_oldest_first() -> None:
    """One token per settled request, each kept TOKEN_TTL_SECONDS: the sweep drops those
    past it from the oldest on (rebuilding the table stalled the request that swept), and
    a token within it still stops a replay."""
    now = [1_000.0]
    store = MemoryStore(clock=lambda: now[0])
    end = 1_000_000
    for i in range(100):
        now[0] = 1_000.0 + i
        assert (await store.adjust([Delta("a", 1, end)], token=f"t{i}")).applied
    now[0] = 1_000.0 + TOKEN_TTL_SECONDS + 49.5  # the first 50 are past it
    tokens = store._tokens
    assert not (await store.adjust([Delta("a", 1, end)], token="t99")).applied
    assert store._tokens is tokens and len(tokens) == 50  # dropped in place, not rebuilt
    assert (await store.adjust([Delta("a", 1, end)], token="t0")).applied  # forgotten
    assert await store.read(["a"]) == (101,)


def test_memory_store_put_sweeps_expired_entries() -> None:
    """fail_open remembers Redis's values with put(): windows gone by must not pile up."""
    now = [1_000.0]
    store = MemoryStore(clock=lambda: now[0], slack=10)
    for minute in range(100):
        now[0] = 1_000.0 + 60 * minute
        store.put(f"m{minute}", 1, int(now[0]) + 60)
    assert len(store) <= 3


async def test_redis_bursts_wait_for_a_connection_instead_of_failing() -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    store = RedisStore.from_url(REDIS_URL, prefix=prefix, max_connections=4, timeout=2.0)
    try:
        await store.ping()
    except StoreUnavailable:
        await store.close()
        pytest.fail(f"no Redis at {REDIS_URL}")
    end = window_end()
    results = await asyncio.gather(
        *(store.reserve([Counter("burst", 1_000, 1, end)]) for _ in range(300))
    )
    assert all(r.ok for r in results)
    assert await store.read(["burst"]) == (300,)
    await store.client.delete(store.key("burst"))
    await store.close()


def test_redis_key_layout_uses_one_hash_tag() -> None:
    store = RedisStore(Redis(), prefix="budget")
    assert store.key("team:search:gpt-4o:usd:month:1767225600") == (
        "{budget}:team:search:gpt-4o:usd:month:1767225600"
    )
    with pytest.raises(ValueError, match="braces"):
        RedisStore(Redis(), prefix="a{b}")


# --- throwaway redis-server processes --------------------------------------------------------


@pytest.fixture
def server() -> Iterator[RedisServer]:
    spawned = RedisServer()
    spawned.start()
    yield spawned
    spawned.stop()


Flaky = tuple["FlakyStore", Callable[[FailMode], ResilientStore]]

# --- ResilientStore ---------------------------------------------------------------------------

FAST = (0.01, 0.05)
"""Backoff for tests: probe every 10-50 ms."""


class FlakyStore:
    """A MemoryStore primary that can be switched off, or lose the reply after applying."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.down = False
        self.lose_replies = 0
        self.calls = 0

    async def reserve(self, counters: Sequence[Counter]) -> ReserveResult:
        self._gate()
        return await self.inner.reserve(counters)

    async def adjust(self, deltas: Sequence[Delta], *, token: str | None = None) -> AdjustResult:
        self._gate()
        result = await self.inner.adjust(deltas, token=token)
        if self.lose_replies:
            self.lose_replies -= 1
            raise StoreUnavailable("applied, but the reply was lost")
        return result

    async def read(self, keys: Sequence[str]) -> tuple[int, ...]:
        self._gate()
        return await self.inner.read(keys)

    async def ping(self) -> None:
        self._gate()

    async def close(self) -> None:
        return None

    def _gate(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("primary is down")


async def until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5.0
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[FlakyStore, Callable[[FailMode], ResilientStore]]]:
    primary = FlakyStore()
    made: list[ResilientStore] = []

    def make(mode: FailMode) -> ResilientStore:
        made.append(ResilientStore(primary, mode, backoff=FAST))
        return made[-1]

    yield primary, make
    for store in made:
        await store.stop(write_back=False)


async def test_fail_open_counts_locally_from_the_last_known_value(flaky: Flaky) -> None:
    primary, make = flaky
    store = make(FailMode.OPEN)
    await store.start()
    end = window_end()
    assert (await store.reserve([Counter("a", 10, 4, end)])).values == (4,)

    primary.down = True
    assert await store.reserve([Counter("a", 10, 4, end)]) == ReserveResult(True, (8,), local=True)
    calls = primary.calls
    rejected = await store.reserve([Counter("a", 10, 4, end)])
    assert (rejected.ok, rejected.values) == (False, (8,)), "the limit still holds locally"
    assert (await store.adjust([Delta("a", -2, end)])).values == (6,)
    assert await store.read(["a"]) == (6,)
    assert primary.calls - calls <= 2, "only recovery probes touch a down primary"
    stats = store.stats()
    assert (stats.degraded, stats.local_reserves, stats.queued_adjusts) == (True, 2, 1)

    primary.down = False
    await until(lambda: not store.stats().degraded)
    assert await primary.inner.read(["a"]) == (6,), "4 before + 4 reserved - 2 given back"
    assert store.stats().pending_keys == 0
    assert (await store.reserve([Counter("a", 10, 4, end)])).values == (10,)


async def test_fail_open_reads_a_counter_untouched_since_the_outage_as_last_known(
    flaky: Flaky,
) -> None:
    """The ext_authz precheck and GetUsage read counters too: one this process has not
    reserved on since Redis went away reads as Redis last reported it, not as 0."""
    primary, make = flaky
    store = make(FailMode.OPEN)
    end = window_end()
    await store.reserve([Counter("a", 10, 7, end), Counter("b", 10, 1, end)])
    primary.down = True
    await store.reserve([Counter("b", 10, 1, end)])  # the outage begins here
    assert await store.read(["a", "b"]) == (7, 2)
    await store.adjust([Delta("a", -3, end)])  # and local changes still count from there
    assert await store.read(["a"]) == (4,)


async def test_write_back_after_a_lost_reply_lands_once(flaky: Flaky) -> None:
    primary, make = flaky
    store = make(FailMode.OPEN)
    end = window_end()
    primary.down = True
    await store.reserve([Counter("a", 10, 3, end)])
    primary.lose_replies = 1
    primary.down = False
    await store.start()
    await until(lambda: not store.stats().degraded)
    assert await primary.inner.read(["a"]) == (3,)
    assert store.stats().primary_errors >= 2


async def test_a_tokened_adjust_is_written_back_under_its_token(flaky: Flaky) -> None:
    primary, make = flaky
    store = make(FailMode.OPEN)
    end = window_end()
    primary.down = True
    await store.adjust([Delta("a", 7, end)], token="req-9")
    primary.down = False
    await store.start()
    await until(lambda: not store.stats().degraded)
    assert await primary.inner.read(["a"]) == (7,)  # the settlement reached Redis
    assert await primary.inner.adjust([Delta("a", 7, end)], token="req-9") == AdjustResult(
        (7,), applied=False
    )


class WatchedStore(FlakyStore):
    """A primary that notes the first counter's value after each adjust."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    async def adjust(self, deltas: Sequence[Delta], *, token: str | None = None) -> AdjustResult:
        result = await super().adjust(deltas, token=token)
        self.seen.append(result.values[0])
        return result


async def test_write_back_puts_reservations_before_their_settlements() -> None:
    """A reservation made during the outage and its settlement: written the other way
    round, the counter dipped far below its true value while the write-back lasted (other
    replicas admitting against it), and the floor at 0 would keep the dip as an over-count."""
    primary = WatchedStore()
    store = ResilientStore(primary, FailMode.OPEN, backoff=FAST)
    end = window_end()
    primary.down = True
    await store.reserve([Counter("a", 10_000, 4196, end)])
    await store.adjust([Delta("a", 150 - 4196, end)], token="settled")
    primary.down = False
    await store.start()
    await until(lambda: not store.stats().degraded)
    await store.stop()
    assert primary.seen == [4196, 150]
    assert await primary.inner.read(["a"]) == (150,)


class SlowStore(FlakyStore):
    """A primary that is up and takes its time: 10 ms a call."""

    async def adjust(self, deltas: Sequence[Delta], *, token: str | None = None) -> AdjustResult:
        await asyncio.sleep(0.01)
        return await super().adjust(deltas, token=token)


async def test_shutdown_stops_writing_back_when_its_time_is_up() -> None:
    """With the primary up, a long queue once kept shutdown writing back one settlement
    per round trip until the supervisor killed the worker, part of it written."""
    primary = SlowStore()
    store = ResilientStore(primary, FailMode.OPEN, backoff=FAST)
    end = window_end()
    primary.down = True
    for i in range(5_000):
        await store.adjust([Delta("a", 1, end)], token=f"t-{i}")
    primary.down = False
    pending = await store.stop(within=0.2)
    assert 0 < pending < 5_000
    written = (await primary.inner.read(["a"]))[0]
    assert written + pending == 5_000  # what was not written is what is reported pending


async def test_a_busy_replica_switches_back_once_the_primary_answers() -> None:
    """Requests keep coming while the queue is written back (more than one per round
    trip): its queue was never empty when looked at, and settlements waited behind the
    reservations that kept coming, so the replica stayed degraded for good (each replica
    enforcing its own traffic alone, alerts never judged). Nothing is lost either way."""
    primary = SlowStore()
    store = ResilientStore(primary, FailMode.OPEN, backoff=FAST)
    end = window_end()
    primary.down = True
    done = 0
    stopping = asyncio.Event()

    async def traffic() -> None:
        nonlocal done
        while not stopping.is_set():
            await store.reserve([Counter("a", 10**9, 5, end)])
            await store.adjust([Delta("a", -2, end)], token=f"settle-{uuid.uuid4().hex}")
            done += 1
            await asyncio.sleep(0.001)

    callers = [asyncio.create_task(traffic()) for _ in range(4)]
    try:
        await until(lambda: done >= 200)  # an outage with a queue to write back
        primary.down = False
        await store.start()
        await until(lambda: not store.stats().degraded)
        settled = done
        await until(lambda: done >= settled + 20)  # and requests go on, on the primary
    finally:
        stopping.set()
        await asyncio.gather(*callers)
    await store.stop()
    assert store.stats().pending_keys == 0
    assert await primary.inner.read(["a"]) == (3 * done,)


async def test_fail_closed_refuses_admission_but_keeps_usage(flaky: Flaky) -> None:
    primary, make = flaky
    store = make(FailMode.CLOSED)
    end = window_end()
    primary.down = True
    with pytest.raises(StoreUnavailable):
        await store.reserve([Counter("a", 10, 1, end)])
    with pytest.raises(StoreUnavailable):
        await store.reserve([Counter("a", 10, 1, end)])
    with pytest.raises(StoreUnavailable):
        await store.read(["a"])
    await store.adjust([Delta("a", 5, end)])  # a finished request's usage: never refused
    assert store.stats().pending_keys == 1
    assert await store.stop(within=0.1) == 1, "still down: the delta is reported as pending"

    primary.down = False
    await store.start()
    await until(lambda: not store.stats().degraded)
    assert await store.read(["a"]) == (5,)


async def test_fail_closed_on_a_closed_port_fails_fast() -> None:
    store = ResilientStore(
        RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0"), FailMode.CLOSED, backoff=FAST
    )
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.reserve([Counter("a", 10, 1, window_end())])
    assert time.monotonic() - started < 1.0
    assert store.stats().primary_errors == 1
    await store.close()


async def test_fail_open_survives_a_redis_restart(server: RedisServer) -> None:
    primary = RedisStore.from_url(server.url, prefix="restart")
    store = ResilientStore(primary, FailMode.OPEN, backoff=FAST)
    await store.start()
    end = window_end()
    assert (await store.reserve([Counter("a", 10, 3, end)])).values == (3,)

    await asyncio.to_thread(server.kill)
    assert await store.reserve([Counter("a", 10, 3, end)]) == ReserveResult(True, (6,), local=True)
    assert (await store.adjust([Delta("a", -1, end)])).values == (5,)
    assert store.stats().degraded

    await asyncio.to_thread(server.start)  # same port, empty: it was started with --save ""
    await until(lambda: not store.stats().degraded)
    assert await primary.read(["a"]) == (2,), "what happened during the outage: +3 - 1"
    assert (await store.reserve([Counter("a", 10, 1, end)])).values == (3,)
    await store.close()


async def test_fail_open_survives_a_hung_redis(server: RedisServer) -> None:
    primary = RedisStore.from_url(server.url, prefix="hung")
    store = ResilientStore(primary, FailMode.OPEN, backoff=FAST)
    await store.start()
    end = window_end()
    await store.reserve([Counter("a", 100, 3, end)])

    server.pause()  # accepts connections, never answers: every call times out
    assert await store.reserve([Counter("a", 100, 2, end)]) == ReserveResult(True, (5,), local=True)
    assert (await store.adjust([Delta("a", 1, end)])).values == (6,)
    server.resume()

    await until(lambda: not store.stats().degraded)
    # Nothing is lost. The reserve that timed out was already in Redis's socket buffer and
    # ran when it resumed, and its local copy was written back too: a call whose reply is
    # lost may count twice (3 + 2 + 2 + 1), erring toward over-charging, never under.
    assert await primary.read(["a"]) == (8,)
    await store.close()


async def test_shutdown_writes_back_to_a_primary_that_comes_back_meanwhile(
    flaky: Flaky,
) -> None:
    primary, make = flaky
    store = make(FailMode.CLOSED)
    end = window_end()
    primary.down = True
    await store.adjust([Delta("a", 5, end)])

    async def back_soon() -> None:
        await asyncio.sleep(0.2)
        primary.down = False

    coming_back = asyncio.create_task(back_soon())
    assert await store.stop() == 0  # kept trying through the outage's last moments
    await coming_back
    assert await primary.inner.read(["a"]) == (5,)


async def test_usage_still_queued_at_close_is_logged_as_lost(
    flaky: Flaky,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(resilient_store, "STOP_SECONDS", 0.1)
    primary, make = flaky
    store = make(FailMode.OPEN)
    primary.down = True
    await store.adjust([Delta("a", 5, window_end()), Delta("b", 1, window_end())])
    with caplog.at_level(logging.ERROR):
        await store.close()
    assert "usage queued for 2 counters was not written back and is lost" in caplog.text


async def test_settlements_past_the_queue_bound_are_folded_not_lost(
    flaky: Flaky, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_TOKENED queued settlements, more are folded into the per-counter amounts:
    memory stays bounded, and what they gave back still reaches Redis."""
    monkeypatch.setattr(resilient_store, "MAX_TOKENED", 3)
    primary, make = flaky
    store = make(FailMode.OPEN)
    end = window_end()
    primary.down = True
    for i in range(10):
        await store.adjust([Delta("a", 2, end)], token=f"t-{i}")
    assert store.stats().pending_keys == 3 + 1  # three kept with their tokens, one counter
    primary.down = False
    await store.start()
    await until(lambda: not store.stats().degraded)
    assert await primary.inner.read(["a"]) == (20,)


async def test_a_replayed_settlement_is_queued_once_during_an_outage(
    flaky: Flaky, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report and an access-log record of one exchange both settle it: queued twice and
    folded (its token given up past MAX_TOKENED), it gave back twice."""
    monkeypatch.setattr(resilient_store, "MAX_TOKENED", 0)
    primary, make = flaky
    store = make(FailMode.OPEN)
    end = window_end()
    await store.adjust([Delta("a", 10, end)])
    primary.down = True
    for _ in range(2):
        await store.adjust([Delta("a", -4, end)], token="one-exchange")
    primary.down = False
    await store.start()
    await until(lambda: not store.stats().degraded)
    assert await primary.inner.read(["a"]) == (6,)


async def test_a_cluster_node_without_the_scripts_is_sent_them_alone(
    cluster_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a fail-over the budgets' new primary has no scripts. redis-py's fallback loads
    them on every primary first, so one unrelated shard down kept the budgets down; the
    script is sent in full to the node holding the keys instead."""
    async for harness in _redis_harness(cluster_server.url, cluster=True):
        store = harness.store
        assert isinstance(store, RedisStore)
        await store.client.script_flush()

        async def another_shard_is_down(*_: object) -> None:
            raise ConnectionError("another primary is down")

        monkeypatch.setattr(store.client, "script_load", another_shard_is_down)
        end = window_end()
        assert await store.reserve([Counter("a", 10, 3, end)]) == ReserveResult(True, (3,))
        assert await store.adjust([Delta("a", -1, end)]) == AdjustResult((2,), True)
