"""The budget stage: reserve before the call, settle with real usage after it.

A request is priced at its worst case (prompt tokens plus the output cap) and that amount
is reserved atomically on every counter its limits name; if any would overflow, nothing is
reserved and the caller gets a 429 naming the limit, with ``retry-after`` and OpenAI-style
``x-ratelimit-*`` headers. When the answer (or its end) is known, each counter is moved by
the difference between what was used and what was reserved, under the reservation's own
token so a retried or replayed settlement never counts twice. A request that set no
output cap and does not fit is offered what is left instead (the cap is then written into
its body), so a tight budget slows callers down before it stops them.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from extproc.budgets.alerts import AlertSink, Watch, reached
from extproc.budgets.keys import Unit, used_key
from extproc.budgets.pricing import FREE, Price, cost_micro_usd, micro_to_usd
from extproc.budgets.store import BudgetStore, Counter, Delta, ReserveResult, StoreUnavailable
from extproc.budgets.tokens import count_prompt_tokens
from extproc.budgets.windows import (
    bounds_at,
    epoch_seconds,
    reset_duration,
    resets_in,
    seconds_to_reset,
    window_bounds,
)
from extproc.decisions import Headers
from extproc.dialects.base import LLMRequest
from extproc.dialects.usage import Usage
from extproc.errors import RateLimited, ServiceUnavailable
from extproc.policy.compiled import CatalogueModel, CompiledLimit, Limits

log = logging.getLogger(__name__)

_TOKEN_UNITS = (Unit.INPUT_TOKENS, Unit.OUTPUT_TOKENS, Unit.TOTAL_TOKENS)
_FAMILY = {Unit.REQUESTS: "requests", Unit.USD: "usd"} | {u: "tokens" for u in _TOKEN_UNITS}


@dataclass(frozen=True, slots=True)
class Cost:
    """What one request uses (or is reserved for) in every unit a limit can count."""

    input_tokens: int
    output_tokens: int
    micro_usd: int
    requests: int = 1
    """1 for a request that went upstream (or may yet); 0 for one that never did."""

    def of(self, unit: Unit) -> int:
        if unit is Unit.REQUESTS:
            return self.requests
        if unit is Unit.INPUT_TOKENS:
            return self.input_tokens
        if unit is Unit.OUTPUT_TOKENS:
            return self.output_tokens
        if unit is Unit.TOTAL_TOKENS:
            return self.input_tokens + self.output_tokens
        return self.micro_usd


NOTHING_USED = Cost(0, 0, 0, requests=0)
"""Settling a reservation with this gives all of it back, the request count too: for a
request that never went upstream (handed over to ext_proc, which counts it afresh;
refused by the gateway; its caller gone before it left)."""


@dataclass(slots=True)
class Reservation:
    counters: tuple[Counter, ...]
    limits: tuple[CompiledLimit, ...]
    reserved: Cost
    token: str
    """Random, one per reservation: makes settlement idempotent in the store. Not the
    request id, which callers choose (two exchanges under one id would settle as one)."""
    headers: Headers
    """``x-ratelimit-*`` headers for the answer, from the values after reserving."""
    output_cap: int | None = None
    """Set when the budget afforded less than the default cap: write it into the body."""
    watches: tuple[Watch, ...] = ()
    """The counters whose limits raise alerts, judged when the reservation is settled."""
    settled: bool = field(default=False)

    @property
    def settlement(self) -> Settlement:
        units = (limit.unit for limit in self.limits)
        counters = tuple(
            (c.key, u, c.expires_at) for c, u in zip(self.counters, units, strict=True)
        )
        return Settlement(self.token, self.reserved, counters, self.watches)


@dataclass(frozen=True, slots=True)
class Settlement:
    """What settling a reservation takes, in plain values that can travel in an exchange's
    ticket (:mod:`extproc.ticket`) to whichever process settles it: each counter's key,
    unit and window end, what was reserved, and the token that has the store apply it
    once."""

    token: str
    reserved: Cost
    counters: tuple[tuple[str, Unit, int], ...]
    watches: tuple[Watch, ...] = ()
    """Those of ``counters`` whose limits raise alerts (:mod:`extproc.budgets.alerts`)."""

    def deltas(self, used: Cost) -> list[Delta]:
        """The changes that replace what was reserved with what was ``used``."""
        reserved = self.reserved
        return [
            Delta(key, used.of(unit) - reserved.of(unit), expires_at)
            for key, unit, expires_at in self.counters
        ]

    def used_deltas(self, used: Cost) -> list[tuple[Watch, Delta]]:
        """What ``used`` adds to the used-only counter of each watched counter it moves."""
        moves = []
        for watch in self.watches:
            key, unit, expires_at = self.counters[watch.counter]
            if amount := used.of(unit):
                moves.append((watch, Delta(used_key(key), amount, expires_at)))
        return moves


def prompt_tokens(model: CatalogueModel, request: LLMRequest) -> int:
    """Prompt tokens as the model's tokenizer counts them (ids given directly count as is)."""
    texts = [part.text for part in request.texts]
    return (
        count_prompt_tokens(model.tokenizer, texts, request.chat_messages)
        + request.prompt_token_ids
    )


def priced(
    prices: Price | None,
    input_tokens: int,
    output_tokens: int,
    cached: int = 0,
    written: int = 0,
    written_1h: int = 0,
) -> Cost:
    """What the tokens cost at ``prices`` (``None``: a model without a price is free);
    ``cached`` and ``written`` of the input tokens read from and written to the cache,
    ``written_1h`` of the written to the 1-hour cache."""
    cached = min(cached, input_tokens)
    written = min(written, input_tokens - cached)
    written_1h = min(written_1h, written)
    micro = cost_micro_usd(prices or FREE, input_tokens, cached, output_tokens, written, written_1h)
    return Cost(input_tokens, output_tokens, micro)


def worst_case(
    model: CatalogueModel, input_tokens: int, output_tokens: int, hour_cache: bool = False
) -> Cost:
    """What a request may cost at most, as reserved: where writing the prompt to the
    provider's cache costs more than reading it as input (Anthropic's 1.25x, 2x for its
    1-hour cache when the request asks for it: ``hour_cache``), all of it written
    (reserved at the input price, a cache write settled above its reservation)."""
    prices = model.price or FREE
    written = input_tokens if _prompt_price(prices, hour_cache) > prices.input else 0
    hourly = written if hour_cache and prices.hour_write > (prices.cache_write or 0) else 0
    return priced(model.price, input_tokens, output_tokens, 0, written, hourly)


def _prompt_price(prices: Price, hour_cache: bool = False) -> int:
    """What a prompt token is reserved at: the input price, or the cache write's where
    that is higher (:func:`worst_case`, and the output a tight budget leaves)."""
    return max(prices.input, prices.cache_write or 0, prices.hour_write if hour_cache else 0)


class OutputCapNeeded(Exception):
    """The request fits only with an output cap written into its body, and the caller
    (the authorizer, which cannot change a body) asked for no cap. Nothing was reserved."""


class Meter:
    """Reserves and settles against one store; the store decides fail-open or closed."""

    def __init__(self, store: BudgetStore, alerts: AlertSink | None = None) -> None:
        self._store = store
        self._alerts = alerts

    async def reserve(
        self,
        limits: Limits,
        model: CatalogueModel,
        input_tokens: int,
        requested_output: int | None,
        default_output: int,
        now: datetime,
        *,
        may_cap_output: bool = True,
        answers: int = 1,
        min_output_cap: int = 1,
        hour_cache: bool = False,
    ) -> Reservation | None:
        """Reserve the request's worst case, or raise :class:`RateLimited`.

        Returns ``None`` when no limit counts this model (nothing to settle later). With
        ``may_cap_output`` false, a request that would fit only capped raises
        :class:`OutputCapNeeded` instead, having reserved nothing. Output is reserved for
        each of ``answers`` (``n``), and a cap applies to each; a cap below
        ``min_output_cap`` (the API's floor) is not offered. ``hour_cache``: the request
        asks for Anthropic's 1-hour cache, whose writes its prompt is reserved at.
        """
        applicable = _dedupe([limit for limit in limits if limit.counts(model.name)])
        if not applicable:
            return None
        output = requested_output if requested_output is not None else default_output
        cost = worst_case(model, input_tokens, output * answers, hour_cache)
        counters = _counters(applicable, model.name, cost, now)
        result = await self._call_reserve(counters)
        output_cap = None
        if not result.ok and requested_output is None:
            affordable = (
                _affordable_output(
                    applicable, counters, result.values, model, input_tokens, hour_cache
                )
                // answers
            )
            if affordable >= max(1, min_output_cap):
                if not may_cap_output:
                    raise OutputCapNeeded
                output_cap = affordable
                cost = worst_case(model, input_tokens, affordable * answers, hour_cache)
                counters = _counters(applicable, model.name, cost, now)
                result = await self._call_reserve(counters)
        if not result.ok:
            assert result.failed is not None
            raise _rate_limited(applicable, counters, result.values, result.failed, now)
        headers = _ratelimit_headers(applicable, counters, result.values, now)
        watches = tuple(
            Watch(index, counters[index].limit, limit.alerts, limit.per_model)
            for index, limit in enumerate(applicable)
            if limit.alerts
        )
        token = secrets.token_hex(12)
        return Reservation(tuple(counters), applicable, cost, token, headers, output_cap, watches)

    async def reserve_tools(
        self, limits: Limits, server: str, tools: Sequence[str], now: datetime
    ) -> None:
        """Count a body's MCP tool calls against the caller's tool limits, all or none, or
        raise RateLimited (a refused batch runs no call, so none of it is counted).

        Tool limits count requests, which need no settlement afterwards. Their counters
        are named ``mcp:<server>`` (``mcp:<server>:<tool>`` when ``per_model``,
        ``mcp:<server>:only-<hash>`` for a limit on some tools only), apart
        from model counters of the same scope and window; calls sharing a counter add up.
        """
        by_key: dict[str, tuple[CompiledLimit, Counter]] = {}
        for tool in tools:
            for limit in _dedupe([limit for limit in limits if limit.counts_tool(tool)]):
                start, end = window_bounds(limit.window, now)
                key = limit.key(limit.tool_subject(server, tool), start)
                _, seen = by_key.get(key, (limit, Counter(key, limit.limit, 0, end)))
                by_key[key] = (limit, replace(seen, amount=seen.amount + 1))
        if not by_key:
            return
        applicable = [limit for limit, _ in by_key.values()]
        counters = [counter for _, counter in by_key.values()]
        result = await self._call_reserve(counters)
        if not result.ok:
            assert result.failed is not None
            raise _rate_limited(applicable, counters, result.values, result.failed, now)
        # A tool call counted stays counted (nothing settles it): judge alerts on it now.
        if not result.local:
            for index, (limit, counter) in enumerate(by_key.values()):
                if limit.alerts:
                    watch = Watch(index, counter.limit, limit.alerts, limit.per_model)
                    self._judge(
                        watch, counter.key, limit.unit, counter.expires_at, result.values[index]
                    )

    async def precheck(
        self,
        limits: Limits,
        model: CatalogueModel,
        input_tokens: int,
        requested_output: int | None,
        now: datetime,
        answers: int = 1,
        min_output_cap: int = 1,
        hour_cache: bool = False,
    ) -> None:
        """Raise :class:`RateLimited` if the request cannot fit now, reserving nothing.

        For ext_authz, which cannot see the answer and so cannot settle: the reservation
        itself is made by ext_proc. A request without an output cap passes if the smallest
        cap its API accepts fits (``min_output_cap``, as :meth:`reserve` offers), since
        ext_proc will then cap it to what is left.
        """
        applicable = _dedupe([limit for limit in limits if limit.counts(model.name)])
        if not applicable:
            return
        smallest = max(1, min_output_cap)
        output = (requested_output if requested_output is not None else smallest) * answers
        cost = worst_case(model, input_tokens, output, hour_cache)
        counters = _counters(applicable, model.name, cost, now)
        try:
            values = await self._store.read([c.key for c in counters])
        except StoreUnavailable:
            raise _store_unavailable() from None
        for index, (counter, value) in enumerate(zip(counters, values, strict=True)):
            if value + counter.amount > counter.limit:
                raise _rate_limited(applicable, counters, values, index, now)

    async def settle(self, reservation: Reservation, used: Cost) -> bool:
        """Replace the reservation with what was used. Safe to call twice (idempotent).
        Returns whether the caller should report the exchange: ``False`` if its token had
        been used already (the exchange's access-log record settled it first, and reported
        it); ``True`` also when this reservation was settled here before."""
        if reservation.settled:
            return True
        applied = await self.apply(reservation.settlement, used)
        # Marked after the store has it: a settlement cut short can run again (the
        # reservation's token keeps a repeat from counting twice).
        reservation.settled = True
        return applied

    async def apply(self, settlement: Settlement, used: Cost) -> bool:
        """Replace what ``settlement`` reserved with what was ``used`` (once per token);
        ``False`` if it had been applied already (a replayed report of the exchange).

        Raises only before the store has applied it: judging the budget alerts after it
        never fails the settlement, so a caller may try a failed one again (an answer
        report leaves it to the access log; extproc/accounting.py)."""
        deltas = settlement.deltas(used)
        if not deltas:
            return True
        watched = settlement.used_deltas(used)
        changes = [d for d in deltas if d.amount] + [delta for _, delta in watched]
        # Also when nothing changes (used exactly what was reserved): the store then
        # remembers the token, so a replayed settlement cannot apply other figures.
        result = await self._store.adjust(changes or deltas, token=settlement.token)
        # Not on a stand-in's values (Redis down): the first settlement after it is back
        # judges the shared counters, and raises what was reached meanwhile.
        if result.applied and watched and not result.local:
            try:
                values = result.values[len(changes) - len(watched) :]
                for (watch, _), used_now in zip(watched, values, strict=True):
                    key, unit, expires_at = settlement.counters[watch.counter]
                    self._judge(watch, key, unit, expires_at, used_now)
            except Exception:
                log.exception("judging the budget alerts of a settlement failed")
        return result.applied

    def _judge(self, watch: Watch, key: str, unit: Unit, expires_at: int, used: int) -> None:
        """Hand over each threshold ``used`` has reached that this process has not."""
        alerts = self._alerts
        if alerts is None:
            return
        for percent in reached(used, watch.limit, watch.thresholds):
            if not alerts.raised(key, percent):
                alerts.notify(watch.event(key, unit.value, expires_at, percent, used))

    async def _call_reserve(self, counters: Sequence[Counter]) -> ReserveResult:
        try:
            return await self._store.reserve(counters)
        except StoreUnavailable:
            raise _store_unavailable() from None


def _store_unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The budget store is unavailable, so the request cannot be admitted.",
        code="budget_store_unavailable",
    )


def usage_cost(model: CatalogueModel, usage: Usage) -> Cost:
    return priced(
        model.price,
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        usage.cache_write_input_tokens,
        usage.cache_write_1h_input_tokens,
    )


def _dedupe(limits: list[CompiledLimit]) -> tuple[CompiledLimit, ...]:
    """Two limits on the same counter (same scope, unit, window): the tighter one rules."""
    best: dict[tuple[object, ...], CompiledLimit] = {}
    for limit in limits:
        ident = (limit.scope, limit.scope_id, limit.unit, limit.window, limit.per_model, limit.only)
        if ident not in best or limit.limit < best[ident].limit:
            best[ident] = limit
    return tuple(best.values())


def _counters(
    limits: Sequence[CompiledLimit], model: str, cost: Cost, now: datetime
) -> list[Counter]:
    counters = []
    epoch = epoch_seconds(now)
    for limit in limits:
        start, end = bounds_at(limit.window, epoch)
        key = limit.key(limit.subject(model), start)
        counters.append(Counter(key, limit.limit, cost.of(limit.unit), end))
    return counters


def _affordable_output(
    limits: Sequence[CompiledLimit],
    counters: Sequence[Counter],
    values: Sequence[int],
    model: CatalogueModel,
    input_tokens: int,
    hour_cache: bool,
) -> int:
    """The largest output cap every counter still admits (0 if the input alone is too much)."""
    best = 1 << 62
    for limit, counter, value in zip(limits, counters, values, strict=True):
        room = counter.limit - value
        if limit.unit is Unit.OUTPUT_TOKENS:
            best = min(best, room)
        elif limit.unit is Unit.TOTAL_TOKENS:
            best = min(best, room - input_tokens)
        elif limit.unit is Unit.USD:
            prices = model.price or FREE
            if prices.output:
                spare = room * 1_000_000 - input_tokens * _prompt_price(prices, hour_cache)
                best = min(best, spare // prices.output)
        elif room < counter.amount:
            return 0  # a request or input-token limit is exhausted: no cap can help
    return max(0, best)


def _rate_limited(
    limits: Sequence[CompiledLimit],
    counters: Sequence[Counter],
    values: Sequence[int],
    failed: int,
    now: datetime,
) -> RateLimited:
    limit, counter = limits[failed], counters[failed]
    retry = seconds_to_reset(limit.window, now)
    scope = "global" if limit.scope.value == "global" else f"{limit.scope.value} '{limit.scope_id}'"
    if counter.amount > counter.limit:
        detail = "this request alone needs more than the whole limit; lower max tokens"
    else:
        detail = f"the limit resets in {reset_duration(retry)}"
    unit = "USD" if limit.unit is Unit.USD else limit.unit.value.replace("_", " ")
    shown = micro_to_usd(counter.limit) if limit.unit is Unit.USD else str(counter.limit)
    headers = (
        ("retry-after", str(retry)),
        *_ratelimit_headers(limits, counters, values, now),
    )
    return RateLimited(
        f"Budget exceeded for {scope}: {shown} {unit} per {limit.window.value}; {detail}.",
        code="budget_exceeded",
        headers=headers,
    )


def _ratelimit_headers(
    limits: Sequence[CompiledLimit],
    counters: Sequence[Counter],
    values: Sequence[int],
    now: datetime,
) -> Headers:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (+ ``-usd``),
    each from the tightest counter of its family."""
    tightest: dict[str, tuple[int, CompiledLimit, int]] = {}
    for limit, counter, value in zip(limits, counters, values, strict=True):
        family = _FAMILY[limit.unit]
        remaining = max(0, counter.limit - value)
        if family not in tightest or remaining < tightest[family][0]:
            tightest[family] = (remaining, limit, counter.limit)
    headers: list[tuple[str, str]] = []
    epoch = epoch_seconds(now)
    for family, (remaining, limit, cap) in sorted(tightest.items()):
        money = family == "usd"
        headers += [
            (f"x-ratelimit-limit-{family}", micro_to_usd(cap) if money else str(cap)),
            (
                f"x-ratelimit-remaining-{family}",
                micro_to_usd(remaining) if money else str(remaining),
            ),
            (f"x-ratelimit-reset-{family}", reset_duration(resets_in(limit.window, epoch))),
        ]
    return tuple(headers)
