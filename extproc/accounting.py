"""Answers accounted from Envoy's access log (policy ``settings.accounting: envoy``).

Reading an answer through ext_proc costs two more gRPC messages per request (response
headers and body), the largest single cost the benchmark measures. Most answers are read
only to account for them: usage for the budget, status for metrics and audit. For those,
Envoy can do the reading: the service marks the request (``x-gateway-accounting:
envoy``), which switches on ``json_to_metadata`` / ``sse_to_metadata`` for its answer,
and the gateway's gRPC access log delivers status, lifted usage and the serving endpoint
once the exchange is over. The exchange waits here, in the process that reserved its
budget, until that record arrives; then it is settled and reported exactly as the
response phases would have done.

Answers the service must read itself keep the response phases: translated ones, those
an output guardrail may check, MCP, and dialects whose usage Envoy is not told to lift.
An exchange whose record never comes (a log stream lost, a config without the access
log) is settled at its deadline as reserved and reported with ``usage_source:
"reserved"``: a budget is never under-charged and no audit record is lost.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from extproc.budgets.meter import Meter, usage_cost
from extproc.dialects.usage import Usage, usage_from_body
from extproc.exchange import Exchange
from extproc.identity import Principal
from extproc.telemetry.observer import Observer

log = logging.getLogger(__name__)

HEADER_EXCHANGE = "x-gateway-exchange"
"""The HTTP authorizer's answer header naming a handed-over exchange's key; Envoy keeps it
as dynamic metadata (``dynamic_metadata_from_headers``), so the access log carries it."""
EXCHANGE_NAMESPACE = "extproc.exchange"
"""ext_proc's dynamic metadata namespace for the same key (``{"key": ...}``)."""
HEADER = "x-gateway-accounting"
"""Set on a request whose answer Envoy accounts for; switches the usage-lifting filters on."""
LIFTED_DIALECTS = frozenset({"openai.chat", "openai.completions", "anthropic.messages"})
"""Dialects whose usage fields envoy/gateway.yaml lifts, in JSON answers and SSE streams."""
BYTES_PER_TOKEN = 4
"""For a JSON answer without usage: output tokens estimated from the bytes sent."""
STREAM_BYTES_PER_TOKEN = 64
"""For a stream cut before its usage arrived. An SSE event carries about one token in
150-250 bytes of JSON; 64 errs towards charging more than was sent, never much less."""
DEFAULT_DEADLINE_SECONDS = 900.0
"""How long an exchange waits for its access-log record (beyond the longest stream)."""


def hands_to_envoy(exchange: Exchange, principal: Principal, path: str) -> bool:
    """Whether this request's answer is needed only to account for it.

    Decided at the request headers, before the model is known (Envoy takes a change of
    processing mode only then), so every model the caller may use must qualify.
    """
    policy, dialect = exchange.policy, exchange.dialect
    if policy.accounting != "envoy" or dialect is None or dialect.name not in LIFTED_DIALECTS:
        return False
    if policy.guardrails.applies(
        "output", team=principal.team, key_id=principal.key_id, model=None, path=path
    ):
        return False
    # An OpenAI chat request for a model on an Anthropic backend is translated back.
    return dialect.name != "openai.chat" or principal.allowed_models.isdisjoint(
        policy.anthropic_models
    )


@dataclass(frozen=True, slots=True)
class LoggedAnswer:
    """What Envoy's access log says about one finished exchange."""

    request_id: str
    """For logs only: callers choose it, so it cannot tell two exchanges apart."""
    key: str | None
    """The key :meth:`PendingAnswers.add` gave the exchange, from the request's dynamic
    metadata; ``None`` for a record of an exchange that was not handed over."""
    status: int
    """The status the caller got; 0 when the client left before any answer."""
    usage: Mapping[str, int]
    """Usage fields lifted from the answer, under the provider's own names."""
    served_by: str | None
    response_bytes: int
    owner: int | None = None
    """The worker holding the exchange, when the HTTP authorizer named one (--workers)."""


class PendingAnswers:
    """Exchanges handed to Envoy, each waiting for its access-log record."""

    def __init__(
        self,
        meter: Meter,
        observer: Observer,
        deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
    ) -> None:
        self._meter = meter
        self._observer = observer
        self._deadline_seconds = deadline_seconds
        self._waiting: dict[str, tuple[Exchange, float]] = {}
        self._key_prefix = secrets.token_hex(8)
        self._key_count = itertools.count()

    def __len__(self) -> int:
        return len(self._waiting)

    def new_key(self) -> str:
        """A key to hand Envoy as dynamic metadata, then to :meth:`add` the exchange under.

        The key is ours, not the request id: a caller may send any ``x-request-id``, also
        one another exchange waiting here already has. A random prefix per process (so a
        record buffered across a restart finds nothing) and a counter: no system call per
        request.
        """
        return f"{self._key_prefix}{next(self._key_count):08x}"

    def add(self, exchange: Exchange, key: str) -> None:
        """Hold ``exchange`` for its record, once Envoy has its answer."""
        exchange.handed_to_envoy = True
        self._waiting[key] = (exchange, time.monotonic() + self._deadline_seconds)

    async def settle(self, logged: LoggedAnswer) -> bool:
        """Settle and report the exchange ``logged`` describes; ``False`` if not ours."""
        entry = self._waiting.pop(logged.key, None) if logged.key else None
        if entry is None:
            return False
        exchange = entry[0]
        exchange.response_status = logged.status
        exchange.status = logged.status
        exchange.served_by = logged.served_by
        await self._finish(exchange, *_used(exchange, logged))
        return True

    async def expire(self, now: float | None = None) -> int:
        """Settle, as reserved, the exchanges whose record is overdue; how many there were."""
        now = time.monotonic() if now is None else now
        overdue = [key for key, (_, deadline) in self._waiting.items() if deadline <= now]
        for key in overdue:
            exchange, _ = self._waiting.pop(key)
            log.warning(
                "no access-log record for request %s: settled as reserved", exchange.request_id
            )
            await self._finish_reserved(exchange)
        return len(overdue)

    async def drain(self) -> None:
        """On shutdown: settle every exchange still waiting, as reserved."""
        while self._waiting:
            _, (exchange, _) = self._waiting.popitem()
            await self._finish_reserved(exchange)

    async def _finish_reserved(self, exchange: Exchange) -> None:
        reservation = exchange.reservation
        if reservation is not None:
            exchange.used, exchange.usage_source = reservation.reserved, "reserved"
        self._observer.finish(exchange)  # a reservation kept as it is needs no store call

    async def _finish(self, exchange: Exchange, usage: Usage, source: str) -> None:
        model, reservation = exchange.model, exchange.reservation
        if model is not None:
            exchange.used, exchange.usage_source = usage_cost(model, usage), source
        try:
            if reservation is not None and exchange.used is not None:
                assert model is not None
                await self._meter.settle(reservation, model, exchange.used)
        except Exception:
            log.exception("settling request %s failed", exchange.request_id)
        finally:
            self._observer.finish(exchange)


def _used(exchange: Exchange, logged: LoggedAnswer) -> tuple[Usage, str]:
    """What the exchange used: the provider's report, else the answer's best estimate."""
    dialect = exchange.dialect
    if logged.usage and dialect is not None:
        reported = usage_from_body(dialect.name, {"usage": _provider_shape(logged.usage)})
        if reported is not None:
            return reported, "provider"
    if logged.status == 0 or logged.status >= 300:
        # No answer at all: the prompt was sent, nothing came back; an error: nothing used.
        return Usage(exchange.input_tokens if logged.status == 0 else 0, 0), "estimate"
    streamed = exchange.request is not None and exchange.request.stream
    output = logged.response_bytes // (STREAM_BYTES_PER_TOKEN if streamed else BYTES_PER_TOKEN)
    if exchange.reservation is not None:
        output = min(output, exchange.reservation.reserved.output_tokens)
    return Usage(exchange.input_tokens, output), "estimate"


def _provider_shape(lifted: Mapping[str, int]) -> dict[str, object]:
    """The lifted fields back in the provider's ``usage`` object, for its own parser."""
    usage: dict[str, object] = {k: v for k, v in lifted.items() if k != "cached_tokens"}
    if "cached_tokens" in lifted:
        usage["prompt_tokens_details"] = {"cached_tokens": lifted["cached_tokens"]}
    return usage
