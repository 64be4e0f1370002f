"""Choosing and running the budget store a service process uses.

No Redis: the in-process store (one worker; counters live and die with the process).
Redis (a node, or a node of a Redis Cluster): Redis behind the resilient wrapper, whose
fail mode follows the live policy's ``settings.budgets.on_store_error``.
"""

from __future__ import annotations

from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.redis_store import RedisStore, RedisTarget
from extproc.budgets.resilient_store import FailMode, ResilientStore
from extproc.budgets.store import BudgetStore, StoreUnavailable
from extproc.policy.compiled import CompiledPolicy


def open_store(redis: RedisTarget | None, policy: CompiledPolicy) -> BudgetStore:
    if redis is None:
        return MemoryStore()
    return ResilientStore(RedisStore.at(redis), FailMode(policy.on_store_error))


async def start_store(store: BudgetStore) -> None:
    if isinstance(store, ResilientStore):
        await store.start()


def follow_policy(store: BudgetStore, policy: CompiledPolicy) -> None:
    """Apply a reloaded policy's fail mode to a running store."""
    if isinstance(store, ResilientStore):
        store.mode = FailMode(policy.on_store_error)


async def store_health(store: BudgetStore, policy: CompiledPolicy) -> str:
    """``ok``, ``degraded`` (down but fail_open admits) or ``unreachable`` (fail_closed)."""
    if not isinstance(store, ResilientStore):
        return "ok"
    try:
        await store.ping()
    except StoreUnavailable:
        return "degraded" if policy.on_store_error == "fail_open" else "unreachable"
    return "ok"
