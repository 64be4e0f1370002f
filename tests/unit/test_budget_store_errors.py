"""Budget store failures that are not a plain refused connection: redis-py errors outside
``RedisError`` (the Cluster client's own), and a recovery task that meets what it did not
expect, or ends.

RedisStore is driven by a client whose every command raises a real redis-py exception (a
Redis Cluster with a slot left without owner is not something a test machine can make),
and by redis-py's real Cluster client pointed at a closed port; ResilientStore is the real
one, over the fake primary of test_budget_stores.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    RedisClusterException,
    SlotNotCoveredError,
)

from extproc.budgets import resilient_store
from extproc.budgets.redis_store import RedisStore
from extproc.budgets.resilient_store import FailMode, ResilientStore
from extproc.budgets.store import Counter, Delta, StoreUnavailable
from tests.redis_server import free_port
from tests.unit.test_budget_stores import FAST, FlakyStore, until, window_end

# --- RedisStore: every failure of the backend is StoreUnavailable ----------------------------


class FailingClient:
    """A redis-py client whose every command raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def register_script(self, source: str) -> SimpleNamespace:
        return SimpleNamespace(script=source, sha="0" * 40)

    async def evalsha(self, *args: object) -> Any:
        return await self._fail()

    async def eval(self, *args: object) -> Any:
        return await self._fail()

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self._fail()

    async def exists(self, *keys: str) -> int:
        return await self._fail()

    async def aclose(self) -> None:
        await self._fail()

    async def _fail(self, *args: object, **kwargs: object) -> Any:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(
            RedisClusterException("Redis Cluster cannot be connected"), id="no-node-reachable"
        ),
        pytest.param(SlotNotCoveredError("slot 1234 is not covered"), id="slot-not-covered"),
        pytest.param(ClusterDownError("CLUSTERDOWN"), id="clusterdown"),
        pytest.param(ConnectionError("refused"), id="connection-error"),
        pytest.param(OSError("unreachable"), id="socket-error"),
    ],
)
async def test_every_redis_py_failure_is_store_unavailable(error: Exception) -> None:
    """RedisClusterException and its SlotNotCoveredError are not RedisError: escaping as
    themselves they were a 500, not the fail mode, and an adjust that raised was lost."""
    store = RedisStore(cast(Any, FailingClient(error)), prefix="failing")
    end = window_end()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.reserve([Counter("a", 10, 1, end)]),
        lambda: store.adjust([Delta("a", -1, end)], token="t"),
        lambda: store.read(["a"]),
        store.ping,
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable, match=type(error).__name__):
            await call()
    await store.close()  # nothing to raise either


@pytest.mark.parametrize("mode", list(FailMode))
async def test_an_unreachable_redis_cluster_is_an_outage_like_any_other(
    mode: FailMode, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py's Cluster client, no node answering: the fail mode decides, usage is kept."""
    monkeypatch.setattr(resilient_store, "STOP_SECONDS", 0.1)
    primary = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", cluster=True)
    store = ResilientStore(primary, mode, backoff=FAST)
    end = window_end()
    if mode is FailMode.CLOSED:
        with pytest.raises(StoreUnavailable):
            await store.reserve([Counter("a", 10, 1, end)])
    else:
        assert (await store.reserve([Counter("a", 10, 1, end)])).local
    assert (await store.adjust([Delta("b", 1, end)], token="t")).local  # queued, not lost
    with caplog.at_level(logging.ERROR):
        await store.close()
    assert "was not written back and is lost" in caplog.text


# --- ResilientStore: the recovery task ------------------------------------------------------


class SurprisingStore(FlakyStore):
    """A primary that, while ``surprise`` is set, raises an error that is not
    StoreUnavailable (one its mapping missed, as RedisClusterException once was)."""

    def __init__(self) -> None:
        super().__init__()
        self.surprise = False

    def _gate(self) -> None:
        if self.surprise:
            self.calls += 1
            raise RedisClusterException("Redis Cluster cannot be connected")
        super()._gate()


async def test_recovery_outlives_an_error_it_did_not_expect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The task died on such an error: the store stayed degraded after the primary was back
    (fail_closed: a 503 to every request until the process restarted)."""
    primary = SurprisingStore()
    store = ResilientStore(primary, FailMode.CLOSED, backoff=FAST)
    end = window_end()
    primary.down = True
    await store.adjust([Delta("a", 3, end)], token="t")  # the outage begins
    primary.surprise = True
    with caplog.at_level(logging.ERROR):
        await until(lambda: primary.calls >= 4)  # probes meet it, and go on
    assert "recovery failed unexpectedly" in caplog.text
    primary.surprise = primary.down = False
    await until(lambda: not store.stats().degraded)
    assert await primary.inner.read(["a"]) == (3,)
    await store.stop()


async def test_a_recovery_task_that_ended_is_started_again() -> None:
    """Whatever ends it (here a stray cancel), a degraded store must not be left with
    nothing probing: the next outage starts it again, and so does the next call made
    while degraded."""
    primary = FlakyStore()
    store = ResilientStore(primary, FailMode.OPEN, backoff=FAST)
    await store.start()
    end = window_end()
    await ended(store)  # while healthy
    primary.down = True
    await store.reserve([Counter("a", 100, 1, end)])  # the outage begins
    primary.down = False
    await until(lambda: not store.stats().degraded)

    primary.down = True
    await store.reserve([Counter("a", 100, 1, end)])
    await ended(store)  # while degraded
    primary.down = False
    await store.reserve([Counter("a", 100, 1, end)])  # still degraded: counted locally
    await until(lambda: not store.stats().degraded)
    assert await primary.inner.read(["a"]) == (3,)
    await store.stop()


async def ended(store: ResilientStore) -> None:
    """End ``store``'s recovery task from outside."""
    task = store._task
    assert task is not None
    task.cancel()
    await until(task.done)


async def test_shutdown_writes_back_past_a_recovery_task_that_died(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """stop() awaited the dead task and raised its error: the queue was never written back,
    and close() never logged it as lost."""

    async def broken(self: ResilientStore) -> None:
        raise RuntimeError("a bug in the recovery loop")

    monkeypatch.setattr(ResilientStore, "_recover", broken)
    primary = FlakyStore()
    store = ResilientStore(primary, FailMode.OPEN, backoff=FAST)
    primary.down = True
    await store.adjust([Delta("a", 5, window_end())])  # the outage begins: recovery starts
    await until(lambda: store._task is not None and store._task.done())  # and dies
    primary.down = False
    with caplog.at_level(logging.ERROR):
        assert await store.stop() == 0
    assert await primary.inner.read(["a"]) == (5,)
    assert "recovery had stopped" in caplog.text
