"""A shared store with an explicit answer to "what if it is down?".

:class:`ResilientStore` wraps a primary store (Redis) and applies the policy's fail mode
when the primary raises :class:`~extproc.budgets.store.StoreUnavailable`:

``fail_closed``
    ``reserve`` and ``read`` raise ``StoreUnavailable`` (the caller answers 503).
``fail_open``
    ``reserve`` and ``read`` are served by a local :class:`MemoryStore`. Each counter
    starts locally from the last value the primary reported for it, so limits still hold
    for what this replica knows (other replicas' traffic during the outage is unseen).

In both modes an ``adjust`` never fails: the request it accounts for already happened. Its
deltas, and every local reservation, are queued and written back to the primary once it
answers again, so no usage is lost (values returned while degraded are the local view).
Each write-back carries an idempotency token and is retried with the same token after an
ambiguous failure, so it lands exactly once; an ``adjust`` given its own token is queued
and written back under that token. The one double count left: a primary call that timed
out *after* the server received it (a hung server that later resumes) was applied there
and is also counted locally, so that request is charged twice. Budgets err toward
over-charging, never under.

While degraded no request touches the primary (none waits for its timeout): a background
task started by :meth:`ResilientStore.start` probes it with exponential backoff (50 ms
doubling to 2 s by default), writes the queue back while traffic is still served locally,
then holds new calls for the last of it (what came in during the last write) and only then
switches traffic back, so the primary never sees new usage before the old. Without the
hold a busy replica never switched back: its queue was never empty when looked at (a
thousand requests a second and a round trip of a millisecond keep a few in it). It
starts by itself on the first failure if ``start`` was not called,
and again if it ever ended (an error it did not expect is logged and probed past: a store
degraded with no task probing would stay degraded for good);
:meth:`ResilientStore.stop` (or ``close``) ends it and writes the queue back, trying for
:data:`STOP_SECONDS` if the primary is still down; what is still queued then is lost with
the process, and ``close`` logs it as an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.store import (
    AdjustResult,
    BudgetStore,
    Counter,
    Delta,
    ReserveResult,
    StoreUnavailable,
)

log = logging.getLogger(__name__)


STOP_SECONDS = 2.5
"""How long shutdown keeps trying to write the queue back (to a primary that is down, or
one that is up and has a long queue to take)."""
WRITE_BACK_BATCH = 100
"""Queued settlements written back together: one script call, not one round trip each
(one at a time, a queue fed faster than the round trip never emptied)."""
MAX_TOKENED = 100_000
"""Settlements queued with their own token; past it, one is folded into the per-counter
amounts (its token, which only guards against a second report of it, is given up)."""


class FailMode(StrEnum):
    CLOSED = "fail_closed"
    OPEN = "fail_open"


@dataclass(frozen=True, slots=True)
class ResilienceStats:
    """Counters for metrics; monotonic except ``degraded`` and ``pending_keys``."""

    degraded: bool
    primary_errors: int
    """Primary calls (including probes and write-backs) that raised StoreUnavailable."""
    local_reserves: int
    """Reservations decided by the local store (fail_open while degraded)."""
    queued_adjusts: int
    """Adjust calls queued for write-back instead of reaching the primary."""
    write_backs: int
    """Successful write-back calls to the primary."""
    pending_keys: int
    """Counters with a delta not yet written back."""


class ResilientStore:
    """A primary store with a fail mode, a local fallback and write-back."""

    def __init__(
        self,
        primary: BudgetStore,
        mode: FailMode,
        *,
        clock: Callable[[], float] = time.time,
        backoff: tuple[float, float] = (0.05, 2.0),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._primary = primary
        self._mode = mode
        self._local = MemoryStore(clock=clock)
        """What this replica counts while degraded (baseline + local deltas)."""
        self._known = MemoryStore(clock=clock)
        """Last values the primary reported (fail_open only): the local baseline."""
        self._backoff = backoff
        self._sleep = sleep
        self._degraded = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[str, tuple[int, int]] = {}
        """key → (amount, expires_at) applied locally or not yet applied to the primary."""
        self._tokened: list[tuple[str, tuple[Delta, ...]]] = []
        """Queued adjusts that came with their own idempotency token."""
        self._inflight_amounts: tuple[str, tuple[Delta, ...]] | None = None
        self._inflight: list[tuple[str, tuple[Delta, ...]]] | None = None
        """Write-backs (the per-counter amounts, then settlements) that failed ambiguously:
        retried as they are, with the same tokens."""
        self._hold: asyncio.Future[None] | None = None
        """Set while the last of the queue is written back: calls wait for it, then go to
        the primary (or, if it failed again, to the local store)."""
        self._errors = self._local_reserves = self._queued = self._write_backs = 0

    @property
    def mode(self) -> FailMode:
        return self._mode

    @mode.setter
    def mode(self, mode: FailMode) -> None:
        """Follows the live policy's ``on_store_error``; queued write-backs are kept."""
        self._mode = mode

    def stats(self) -> ResilienceStats:
        return ResilienceStats(
            degraded=self._degraded,
            primary_errors=self._errors,
            local_reserves=self._local_reserves,
            queued_adjusts=self._queued,
            write_backs=self._write_backs,
            pending_keys=len(self._pending)
            + sum(len(batch) for _, batch in self._tokened)
            + sum(len(batch) for _, batch in self._inflight or ())
            + (len(self._inflight_amounts[1]) if self._inflight_amounts else 0),
        )

    async def start(self) -> None:
        self._ensure_recovery()

    async def stop(self, *, write_back: bool = True, within: float | None = None) -> int:
        """Stop the recovery task and write the queue back, trying for about ``within``
        seconds of back-off (:data:`STOP_SECONDS`) if the primary is still down; return
        the keys still pending."""
        await self._end_recovery()
        delay, waited = self._backoff[0], 0.0
        within = STOP_SECONDS if within is None else within
        deadline = time.monotonic() + within  # the attempts' own time counts too
        while write_back and self._degraded:
            try:
                if not await self._write_back(deadline):
                    break  # the primary is up, and the queue longer than shutdown waits
            except StoreUnavailable:
                self._errors += 1
                if waited + delay > within or time.monotonic() + delay > deadline:
                    break
                await self._sleep(delay)
                waited += delay
                delay = min(delay * 2, self._backoff[1])
            else:
                self._degraded = False
        return self.stats().pending_keys

    async def reserve(self, counters: Sequence[Counter]) -> ReserveResult:
        if self._hold is not None:
            await asyncio.shield(self._hold)
        if not self._degraded:
            try:
                result = await self._primary.reserve(counters)
            except StoreUnavailable:
                self._failed()
                if self._mode is FailMode.CLOSED:
                    raise
            else:
                if self._mode is FailMode.OPEN:
                    for counter, value in zip(counters, result.values, strict=True):
                        self._known.put(counter.key, value, counter.expires_at)
                return result
        self._revive_recovery()
        self._refuse_if_closed()
        self._seed((c.key, c.expires_at) for c in counters)
        result = await self._local.reserve(counters)
        self._local_reserves += 1
        if result.ok:
            self._enqueue(Delta(c.key, c.amount, c.expires_at) for c in counters)
        return replace(result, local=True)

    async def adjust(self, deltas: Sequence[Delta], *, token: str | None = None) -> AdjustResult:
        if self._hold is not None:
            await asyncio.shield(self._hold)
        if not self._degraded:
            try:
                result = await self._primary.adjust(deltas, token=token)
            except StoreUnavailable:
                self._failed()
            else:
                if self._mode is FailMode.OPEN:
                    for delta, value in zip(deltas, result.values, strict=True):
                        self._known.put(delta.key, value, delta.expires_at)
                return result
        self._revive_recovery()
        self._seed((d.key, d.expires_at) for d in deltas)
        # First (the local store does not suspend, so nothing runs in between): a replay
        # of a settlement this process queued already is not queued again; folded past
        # MAX_TOKENED, where its token is given up, it would be written back twice.
        local = await self._local.adjust(deltas, token=token)
        if local.applied:
            self._queued += 1
            if token is None or len(self._tokened) >= MAX_TOKENED:
                self._enqueue(deltas)
            else:
                self._tokened.append((token, tuple(deltas)))
        return replace(local, local=True)

    async def read(self, keys: Sequence[str]) -> tuple[int, ...]:
        if self._hold is not None:
            await asyncio.shield(self._hold)
        if not self._degraded:
            try:
                return await self._primary.read(keys)
            except StoreUnavailable:
                self._failed()
                if self._mode is FailMode.CLOSED:
                    raise
        self._revive_recovery()
        self._refuse_if_closed()
        # A counter not touched locally since the outage began reads as the primary last
        # reported it (as a reservation would start from), not as 0.
        for key in keys:
            self._local.seed_from(self._known, key)
        return await self._local.read(keys)

    async def ping(self) -> None:
        await self._primary.ping()

    async def close(self) -> None:
        pending = await self.stop()
        if pending:
            # Nothing else holds them: this process's share of the outage's usage is lost.
            log.error(
                "budget store still unavailable at shutdown: usage queued for %d counters "
                "was not written back and is lost",
                pending,
            )
        await self._primary.close()

    def _failed(self) -> None:
        """Count a primary failure and enter degraded mode if not already in it."""
        self._errors += 1
        if not self._degraded:
            log.warning("budget store unavailable, %s until it answers", self._mode.value)
            self._degraded = True
            self._local.clear()
            self._wake.set()
            self._ensure_recovery()

    def _ensure_recovery(self) -> None:
        """Start the recovery task unless it runs: also when it ended, which left a
        degraded store with nothing probing, degraded until the process restarted."""
        task = self._task
        if task is not None and not task.done():
            return
        if task is not None and not task.cancelled() and task.exception() is not None:
            log.error("budget store recovery had stopped: started again", exc_info=task.exception())
        self._task = asyncio.create_task(self._recover(), name="budget-store-recovery")

    def _revive_recovery(self) -> None:
        """While degraded: start the recovery task again if it ended (not if ``stop``
        ended it: then there is none, and shutdown writes the queue back itself)."""
        if self._task is not None and self._task.done():
            self._ensure_recovery()

    async def _end_recovery(self) -> None:
        """Cancel the recovery task and wait for it. One that had died with an error is
        logged, not raised: shutdown still has the queue to write back (or to report lost)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("budget store recovery had stopped with an error")

    def _refuse_if_closed(self) -> None:
        if self._mode is FailMode.CLOSED:
            raise StoreUnavailable("budget store unavailable (fail_closed)")

    def _seed(self, entries: Iterable[tuple[str, int]]) -> None:
        for key, expires_at in entries:
            self._local.seed(key, self._known.peek(key), expires_at)

    def _enqueue(self, deltas: Iterable[Delta]) -> None:
        for delta in deltas:
            amount, expires_at = self._pending.get(delta.key, (0, delta.expires_at))
            self._pending[delta.key] = (amount + delta.amount, max(expires_at, delta.expires_at))

    async def _recover(self) -> None:
        """Probe the primary while degraded; write the queue back and switch traffic back
        once it answers. Any error is one more failed probe: the task must outlive
        whatever the primary raises (it alone ends the degraded mode)."""
        delay = self._backoff[0]
        while True:
            await self._wake.wait()
            try:
                await self._primary.ping()
                # The bulk while traffic is served locally, then the rest with it held.
                await self._write_back(leave=WRITE_BACK_BATCH)
                await self._switch_back()
            except Exception as error:
                self._errors += 1
                if not isinstance(error, StoreUnavailable):
                    log.exception("budget store recovery failed unexpectedly: probing on")
                await self._sleep(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            log.warning("budget store available again, usage written back")

    async def _switch_back(self) -> None:
        """Write back what is left with new calls held (so that it can empty), then send
        traffic to the primary; the held calls go on either way."""
        self._hold = asyncio.get_running_loop().create_future()
        try:
            await self._write_back()
            # No await between _write_back emptying the queue and this switch.
            self._degraded = False
            self._wake.clear()
        finally:
            hold, self._hold = self._hold, None
            hold.set_result(None)

    async def _write_back(self, deadline: float | None = None, *, leave: int = 0) -> bool:
        """Write the queued deltas to the primary until no more than ``leave`` writes are
        queued; ``True`` then, ``False`` if ``deadline`` (monotonic) passed first.

        The per-counter amounts (reservations, adjusts without a token) go before the
        settlements, which mostly subtract: the other way round a counter dipped far below
        its true value for as long as the write-back took (other replicas admitting against
        it), and the store's floor at 0 would keep the dip as an over-count. Each pass
        writes the amounts queued so far, then :data:`WRITE_BACK_BATCH` settlements (one
        script call): settlements waiting for the amounts to run dry never went while
        reservations kept coming."""
        while True:
            if deadline is not None and time.monotonic() > deadline:
                return False
            if self._inflight is None and self._inflight_amounts is None:
                if bool(self._pending) + len(self._tokened) <= leave:  # writes left
                    return True
                if self._pending:
                    batch = tuple(Delta(k, a, e) for k, (a, e) in self._pending.items() if a)
                    self._pending.clear()
                    self._inflight_amounts = (f"write-back:{uuid.uuid4().hex}", batch)
                self._inflight = self._tokened[:WRITE_BACK_BATCH]
                del self._tokened[:WRITE_BACK_BATCH]
            if self._inflight_amounts is not None:
                token, batch = self._inflight_amounts
                if batch:
                    await self._primary.adjust(batch, token=token)
                    self._write_backs += 1
                self._inflight_amounts = None  # written: not sent again if settlements fail
            writes = [(token, batch) for token, batch in self._inflight or () if batch]
            await asyncio.gather(*(self._primary.adjust(b, token=t) for t, b in writes))
            self._write_backs += len(writes)
            self._inflight = None
