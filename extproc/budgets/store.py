"""The budget-store protocol: atomic reserve, signed adjust, read, ping.

A store holds integer counters that expire with their window. The pipeline reserves a
request's priced estimate on every applicable counter at once (all or nothing), then
replaces it with actual usage through :meth:`BudgetStore.adjust` (``actual - reserved``).
Implementations: :class:`~extproc.budgets.memory_store.MemoryStore` (one process),
:class:`~extproc.budgets.redis_store.RedisStore` (shared) and
:class:`~extproc.budgets.resilient_store.ResilientStore` (fail-open / fail-closed).

Errors, translated from the backend's own exceptions at the store boundary:

    StoreUnavailable      the backend did not answer (down, timeout, refused, OOM...);
                          whether the request then fails (503) or passes is the
                          policy's fail mode, decided by ResilientStore, never here
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

EXPIRY_SLACK_SECONDS: Final = 300
"""Counters live this long past their window's end.

It lets a request reserved just before a window ends reconcile into that same window (a
long stream, clocks a little apart between replicas), then the counter is gone. A
reconcile arriving later still is dropped: that window is over and the next one was never
charged.
"""

TOKEN_TTL_SECONDS: Final = 3 * 3600
"""How long an adjust's idempotency token is remembered: an hour past a ticket's life
(:data:`extproc.ticket.LIFETIME_SECONDS`). Each settled request holds one (~130 bytes in
Redis): a day, as before, was ~11 GB at 1,000 requests a second; three hours is ~1.4 GB."""


class StoreUnavailable(Exception):
    """The store's backend could not be reached or could not serve the call.

    The original exception is chained as ``__cause__``. A call that failed this way may or
    may not have been applied (a timeout after the server ran it): retrying an adjust may
    then count twice, which over-charges and never under-charges.
    """


@dataclass(frozen=True, slots=True)
class Counter:
    """One counter a reservation must fit into."""

    key: str
    """Logical key from :func:`extproc.budgets.keys.counter_key`."""
    limit: int
    amount: int
    """What this request adds (>= 0)."""
    expires_at: int
    """The window's end, UTC epoch seconds; the counter expires then (+ slack)."""


@dataclass(frozen=True, slots=True)
class Delta:
    """A signed change to one counter that never fails on its limit (reconcile, write-back)."""

    key: str
    amount: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """The outcome of an all-or-nothing reservation.

    ``values`` is in the order of the counters passed in: the values after the increment
    when ``ok``, otherwise the untouched current values (to compute remaining headers).
    """

    ok: bool
    values: tuple[int, ...]
    failed: int | None = None
    """Index of the first counter that would have gone over its limit."""
    failed_key: str | None = None
    local: bool = False
    """The values are a stand-in's during an outage (see :attr:`AdjustResult.local`)."""


@dataclass(frozen=True, slots=True)
class AdjustResult:
    """The outcome of an adjust: the counters' values, in the order of the deltas passed
    in, and whether it applied. ``applied`` is ``False`` only when its token had been used
    already: a replayed settlement, whose exchange was reported by the first one."""

    values: tuple[int, ...]
    applied: bool = True
    local: bool = False
    """The values are a stand-in's during an outage (:mod:`.resilient_store`): this
    process's view of the counters, not the shared ones (budget alerts wait for those)."""


class BudgetStore(Protocol):
    """Where budget counters live. Each call is atomic across all the keys it names."""

    async def reserve(self, counters: Sequence[Counter]) -> ReserveResult:
        """Add every ``amount`` if for each counter ``current + amount <= limit``, else none.

        Raises :class:`ValueError` for duplicate keys or negative amounts (a caller bug).
        """
        ...

    async def adjust(self, deltas: Sequence[Delta], *, token: str | None = None) -> AdjustResult:
        """Apply signed deltas regardless of limits; the new values, and whether applied.

        A ``token`` makes the call idempotent: a second call with the same token (within a
        day) applies nothing and returns the current values, ``applied=False``. Settlements
        use it so that a report of the same exchange, however often it comes, counts once
        (and is recorded once while this store keeps tokens: a store standing in during an
        outage has not seen the tokens used before it); write-back so that a retry after an
        ambiguous failure cannot count twice.
        """
        ...

    async def read(self, keys: Sequence[str]) -> tuple[int, ...]:
        """Current values (0 for an absent or expired counter)."""
        ...

    async def ping(self) -> None:
        """Return when the backend answers; raise :class:`StoreUnavailable` otherwise."""
        ...

    async def close(self) -> None: ...


def check_counters(counters: Sequence[Counter]) -> None:
    """Reject a reservation no store could apply atomically and correctly."""
    keys = {c.key for c in counters}
    if len(keys) != len(counters):
        raise ValueError("a reservation names the same counter twice; merge the amounts")
    for counter in counters:
        if counter.amount < 0:
            raise ValueError(f"negative reservation on {counter.key}; use adjust()")
