"""The in-process budget store: the default for a single worker, and the fail-open fallback.

Counters live in a dict. Each method is ``async`` to satisfy the store protocol but never
awaits, so under asyncio every call runs to completion without interleaving: a
reservation is atomic without locks. (It is not thread-safe; use it from one event loop.)

Expiry mirrors Redis: a counter carries an absolute expiry (window end + slack), an
expired counter reads as absent, a write whose expiry has already passed is dropped, and a
sweep at most once a minute removes expired entries so memory tracks live windows only.
Idempotency tokens, one per settled request, all live as long: they expire in the order
they came, so the sweep drops them from the oldest on and stops at the first still live
(rebuilding the whole table, a million of them stalled the request that swept for 0.3 s).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from extproc.budgets.store import (
    EXPIRY_SLACK_SECONDS,
    TOKEN_TTL_SECONDS,
    AdjustResult,
    Counter,
    Delta,
    ReserveResult,
    check_counters,
)

SWEEP_INTERVAL_SECONDS = 60.0


class MemoryStore:
    """Counters in a dict; see the module docstring for the expiry rules."""

    __slots__ = ("_clock", "_entries", "_next_sweep", "_slack", "_tokens")

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        slack: int = EXPIRY_SLACK_SECONDS,
    ) -> None:
        self._clock = clock
        self._slack = slack
        self._entries: dict[str, list[int]] = {}
        """key → [value, expiry epoch seconds]."""
        self._tokens: OrderedDict[str, float] = OrderedDict()
        """Token → expiry, oldest first (one lifetime for all: expiry order)."""
        self._next_sweep = 0.0

    async def reserve(self, counters: Sequence[Counter]) -> ReserveResult:
        check_counters(counters)
        now = self._tick()
        current = tuple(self._value(c.key, now) for c in counters)
        for index, (counter, value) in enumerate(zip(counters, current, strict=True)):
            if value + counter.amount > counter.limit:
                return ReserveResult(False, current, index, counter.key)
        return ReserveResult(
            True, tuple(self._add(c.key, c.amount, c.expires_at, now) for c in counters)
        )

    async def adjust(self, deltas: Sequence[Delta], *, token: str | None = None) -> AdjustResult:
        now = self._tick()
        if token is not None:
            if self._tokens.get(token, 0.0) > now:
                return AdjustResult(tuple(self._value(d.key, now) for d in deltas), applied=False)
            self._tokens[token] = now + TOKEN_TTL_SECONDS
            self._tokens.move_to_end(token)  # one expired, not yet swept, comes again
        return AdjustResult(tuple(self._add(d.key, d.amount, d.expires_at, now) for d in deltas))

    async def read(self, keys: Sequence[str]) -> tuple[int, ...]:
        now = self._clock()
        return tuple(self._value(key, now) for key in keys)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self.clear()

    # Synchronous helpers for ResilientStore and tests.

    def seed(self, key: str, value: int, expires_at: int) -> None:
        """Start an absent (or expired) counter at ``value``; a live counter is kept."""
        now = self._tick()
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            self._add(key, value, expires_at, now)

    def seed_from(self, other: MemoryStore, key: str) -> None:
        """Start an absent (or expired) counter as ``other`` holds it, expiry and all; a
        live counter is kept."""
        now = self._tick()
        mine, theirs = self._entries.get(key), other._entries.get(key)
        if theirs is not None and theirs[1] > now and (mine is None or mine[1] <= now):
            self._entries[key] = list(theirs)  # its own: counted apart from here on

    def peek(self, key: str) -> int:
        """The current value of ``key`` (0 if absent), without sweeping."""
        return self._value(key, self._clock())

    def put(self, key: str, value: int, expires_at: int) -> None:
        """Set ``key`` to ``value`` outright (e.g. the last value seen in another store)."""
        now = self._tick()
        self._entries.pop(key, None)
        self._add(key, value, expires_at, now)

    def clear(self) -> None:
        self._entries.clear()
        self._tokens.clear()

    def expiry(self, key: str) -> int | None:
        """When ``key`` expires (epoch seconds), or ``None`` if it is absent."""
        entry = self._entries.get(key)
        return entry[1] if entry is not None and entry[1] > self._clock() else None

    def __len__(self) -> int:
        return len(self._entries)

    # Internals.

    def _value(self, key: str, now: float) -> int:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            return 0
        return entry[0]

    def _add(self, key: str, amount: int, expires_at: int, now: float) -> int:
        expiry = expires_at + self._slack
        # Never below nothing, as the Redis script: a settlement's minus amount may reach
        # a counter that is gone (a restart) and must not leave it owing the next request.
        value = max(0, self._value(key, now) + amount)
        if expiry <= now:
            # Like EXPIREAT in the past on Redis: the write lands and is deleted at once.
            self._entries.pop(key, None)
        else:
            self._entries[key] = [value, expiry]
        return value

    def _tick(self) -> float:
        now = self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_SECONDS
            self._entries = {k: e for k, e in self._entries.items() if e[1] > now}
            tokens = self._tokens
            while tokens and next(iter(tokens.values())) <= now:
                tokens.popitem(last=False)
        return now
