"""Answers accounted from their exchange's ticket, by whichever process reads them.

Most answers are read only to account for them: usage for the budget, status for metrics
and audit. For those the request side is decided in one call (the HTTP authorizer), and
the exchange's signed ticket (:mod:`extproc.ticket`) travels with the request in Envoy's
dynamic metadata, so whichever worker or replica reads the answer settles the reservation
and reports the exchange exactly as a full ext_proc stream would have done. Who reads it
follows the policy's ``settings.accounting``:

``envoy``
    Envoy: the service marks the request (``x-gateway-accounting: envoy``), which switches
    on ``json_to_metadata`` / ``sse_to_metadata`` for its answer, and the gateway's gRPC
    access log delivers status, lifted usage and the serving endpoint once the exchange
    is over (:class:`LoggedAnswer`). No gRPC message of the request's own.
``service``
    Envoy too, but reported before the answer ends: the service marks the request
    (``x-gateway-accounting: service``), which switches on the same lifting filters and
    a Lua filter that, holding back the answer's end, reports what the access log would
    say (:mod:`extproc.adapters.answer_report`) to the service, which settles the exchange
    and answers; the filter then marks the exchange ``answered`` and lets the end go. An
    answer not reported (the caller left before its end, the report failed) is settled
    from its access-log record, as under ``envoy``. No gRPC message at all.

Answers the service must rewrite or check keep a full ext_proc stream: translated ones,
those an output guardrail may check, MCP, dialects whose usage Envoy is not told to lift
(embeddings excepted: accounted from the prompt the service counted, see
:data:`COUNTED_DIALECTS`), and every answer of a policy that records bodies in its audit
log. A record Envoy drops
(``access_logs.grpc_access_log.logs_dropped``) leaves its reservation charged as
reserved: a budget is never under-charged, but that exchange has no audit record.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from extproc.budgets.meter import Meter, priced
from extproc.dialects import TEXTLESS_DIALECTS
from extproc.dialects.usage import (
    BYTES_PER_TOKEN,
    OUTPUT_COUNTS,
    STREAM_BYTES_PER_TOKEN,
    Usage,
    estimated,
    usage_from_body,
)
from extproc.errors import AnswerTooLarge
from extproc.exchange import Exchange
from extproc.identity import Principal
from extproc.telemetry.observer import Observer
from extproc.telemetry.record import record_time
from extproc.ticket import InvalidTicket, Ticket, TicketSigner, UnknownSignature

log = logging.getLogger(__name__)

HEADER_TICKET = "x-gateway-ticket"
"""The HTTP authorizer's answer header carrying a handed-over exchange's ticket; Envoy
keeps it as dynamic metadata (``dynamic_metadata_from_headers``), so the access log
carries it."""
AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
"""Where Envoy keeps the HTTP authorizer's ``dynamic_metadata_from_headers`` (the ticket)."""
EXCHANGE_NAMESPACE = "extproc.exchange"
"""ext_proc's dynamic metadata namespace for the same ticket (``{"ticket": ...}``), and
for the mark envoy/gateway.yaml's report filter leaves (``{"answered": "report"}``)."""
ANSWERED = "answered"
"""Set by envoy/gateway.yaml's report filter once the service settled the answer: the
access-log record of a caller who then left (Envoy logs those) must not report the
exchange a second time."""
HEADER = "x-gateway-accounting"
"""Set on a request whose answer Envoy reads (``envoy``: through the access log;
``service``: reported before its end); switches the usage-lifting filters on."""
HEADER_STREAM_USAGE = "x-gateway-stream-usage"
"""Set (``include``) by the HTTP authorizer on an OpenAI stream it decided whose caller
sent no ``stream_options``: envoy/gateway.yaml then adds ``include_usage`` to the body, so
that the provider reports the usage Envoy lifts."""
LIFTED_DIALECTS = frozenset({"openai.chat", "openai.completions", "anthropic.messages"})
"""Dialects whose usage fields envoy/gateway.yaml lifts, in JSON answers and SSE streams."""
COUNTED_DIALECTS = TEXTLESS_DIALECTS
"""Dialects whose answers are accounted from the prompt the service counted, never read
(for callers whose models all count it exactly): an embeddings answer uses the prompt
alone (the count matches the provider's on every recorded OpenAI embeddings exchange),
and it can pass the 8 MiB Envoy would hold it to (1,200 inputs of 1,536 dimensions do):
envoy/gateway.yaml lifts nothing from it, so it streams through."""


def only_accounted(exchange: Exchange, principal: Principal, path: str) -> bool:
    """Whether this request's answer is needed only to account for it, which its ticket
    lets any process do (from Envoy's access log, or from Envoy's report of it).

    Decided at the request headers, before the model is known (Envoy takes a change of
    processing mode only then), so every model the caller may use must qualify.
    """
    policy, dialect = exchange.policy, exchange.dialect
    if dialect is None:
        return False
    if policy.audit_redactor is not None:
        # The audit record wants the answer's text, which no ticket keeps; and the
        # redacted prompt it also wants would make a ticket of an embeddings batch.
        return False
    if dialect.name in COUNTED_DIALECTS:
        # No text in the answer for a guardrail to read, and its usage is the prompt,
        # when the model counts it exactly. Under service the HTTP authorizer, which sees
        # the model, hands one that does not over to ext_proc, which reads the answer
        # (pipeline.decide_request); under envoy nothing would read it.
        return policy.accounting == "service" or principal.allowed_models.isdisjoint(
            policy.estimated_models
        )
    if dialect.name not in LIFTED_DIALECTS:
        return False
    if policy.guardrails.applies(
        "output", team=principal.team, key_id=principal.key_id, model=None, path=path
    ):
        return False
    return not may_translate(exchange, principal)


def may_translate(exchange: Exchange, principal: Principal) -> bool:
    """Whether this request's answer may need translating back: an OpenAI chat request
    from a caller who may use a model on an Anthropic backend (decided at the request
    headers, before the model is known, as :func:`only_accounted` is)."""
    dialect = exchange.dialect
    return (
        dialect is not None
        and dialect.name == "openai.chat"
        and not principal.allowed_models.isdisjoint(exchange.policy.anthropic_models)
    )


@dataclass(frozen=True, slots=True)
class LoggedAnswer:
    """What Envoy's access log says about one finished exchange."""

    request_id: str
    """For logs only: callers choose it, so it cannot tell two exchanges apart."""
    ticket: str | None
    """The exchange's ticket, from the request's dynamic metadata; ``None`` for a record
    of an exchange that was not handed over."""
    status: int
    """The status the caller got; 0 when the client left before any answer."""
    usage: Mapping[str, int]
    """Usage fields lifted from the answer, under the provider's own names."""
    served_by: str | None
    response_bytes: int
    too_large: bool = False
    """Envoy dropped the provider's answer past its buffer limit while it held it whole
    to lift its usage: the caller got a 502, and ``response_bytes`` counts the bytes the
    provider sent (billed, though no usage was read)."""


class Accountant:
    """Settles and reports the exchanges Envoy says are over (an access-log record, or a
    report before the answer's end), from their tickets alone (this process need not
    have decided them)."""

    def __init__(self, meter: Meter, observer: Observer, tickets: TicketSigner) -> None:
        self._meter = meter
        self._observer = observer
        self._tickets = tickets

    async def settle(self, logged: LoggedAnswer) -> bool:
        """Settle and report the exchange ``logged`` describes; ``False`` if it carries no
        ticket this service signed."""
        if logged.ticket is None:
            return False
        try:
            ticket = await self.read(logged.ticket)
        except InvalidTicket as error:
            log.warning(
                "access-log record for request %s not settled: %s", logged.request_id, error
            )
            return False
        await self.settle_ticket(ticket, logged)
        return True

    async def settle_ticket(
        self, ticket: Ticket, logged: LoggedAnswer, *, last_chance: bool = True
    ) -> None:
        """Settle ``ticket``'s reservation with what ``logged`` says was used; report it,
        unless the reservation's token says this exchange was settled already: then its
        first report (a report and an access-log record both came, or Envoy re-sent a
        record) wrote its audit record and metrics.

        A settlement that fails unexpectedly is still reported on its ``last_chance`` (the
        access log: nothing else will come); otherwise (an answer report) it raises,
        unreported, so that the exchange's access-log record tries again."""
        record = ticket.record
        record.update(time=record_time(), status=logged.status or None, served_by=logged.served_by)
        if logged.too_large:
            record["error"] = AnswerTooLarge.default_code
        report = True
        try:
            if record["model"] is not None:
                usage, source = _used(ticket, logged)
                used = priced(
                    ticket.price,
                    usage.input_tokens,
                    usage.output_tokens,
                    usage.cached_input_tokens,
                    usage.cache_write_input_tokens,
                    usage.cache_write_1h_input_tokens,
                )
                record.update(
                    input_tokens=used.input_tokens,
                    output_tokens=used.output_tokens,
                    cost_micro_usd=used.micro_usd,
                    usage_source=source,
                )
                if ticket.settlement is not None:
                    report = await self._meter.apply(ticket.settlement, used)
                    if not report:
                        log.debug(
                            "request %s was settled and reported already", record["request_id"]
                        )
        except Exception:
            if not last_chance:
                report = False  # the access-log record tries again, and reports it
                raise
            log.exception("settling request %s failed", record.get("request_id"))
        finally:
            if report:
                self._observer.report(record, ticket.traceparent, ticket.started_ns)

    async def read(self, text: str) -> Ticket:
        """The ticket ``text`` carries, or :class:`~extproc.ticket.InvalidTicket`."""
        try:
            return self._tickets.read(text)
        except UnknownSignature:
            if not await self._tickets.refresh():
                raise
            return self._tickets.read(text)


def _used(ticket: Ticket, logged: LoggedAnswer) -> tuple[Usage, str]:
    """What the exchange used: the provider's report, else the answer's best estimate.

    A stream's report counts only with its output in it: Anthropic reports the prompt
    first (``message_start``) and the output at the end, so a stream cut in between
    (the caller left) carries a prompt count alone, and would be charged no output. An
    answer accounted from its prompt (embeddings) is charged the prompt the service
    counted, as ``counted``."""
    if ticket.dialect in COUNTED_DIALECTS:
        return estimated(logged.status, ticket.input_tokens, 0, 0), "counted"
    if logged.usage and (not ticket.stream or OUTPUT_COUNTS & logged.usage.keys()):
        reported = usage_from_body(ticket.dialect, {"usage": _provider_shape(logged.usage)})
        if reported is not None:
            return reported, "provider"
    per_token = STREAM_BYTES_PER_TOKEN if ticket.stream else BYTES_PER_TOKEN
    settlement = ticket.settlement
    cap = settlement.reserved.output_tokens if settlement is not None else None
    output = logged.response_bytes // per_token
    # An answer dropped for its size was a provider's answer (a 2xx), billed whole.
    status = 200 if logged.too_large else logged.status
    return estimated(status, ticket.input_tokens, output, cap), "estimate"


def _provider_shape(lifted: Mapping[str, int]) -> dict[str, object]:
    """The lifted fields back in the provider's ``usage`` object, for its own parser."""
    usage: dict[str, object] = {k: v for k, v in lifted.items() if k not in _NESTED}
    nested: dict[str, dict[str, int]] = {}
    for name, (parent, field) in _NESTED.items():
        if name in lifted:
            nested.setdefault(parent, {})[field] = lifted[name]
    usage.update(nested)
    return usage


_NESTED = {
    "cached_tokens": ("prompt_tokens_details", "cached_tokens"),
    "cache_write_tokens": ("prompt_tokens_details", "cache_write_tokens"),
    "ephemeral_1h_input_tokens": ("cache_creation", "ephemeral_1h_input_tokens"),
}
"""Lifted fields that the provider nests in ``usage`` (Envoy lifts them flat)."""
