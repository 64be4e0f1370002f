"""The HTTP authorizer: Envoy's ext_authz ``http_service`` in, a whole request decided.

Why a second front door beside ext_proc: transport, not policy, was the largest cost the
benchmark measured. A no-op grpc.aio server spends ~290 µs of CPU per ext_proc exchange
on the benchmark machine (gRPC's poller thread hands every event to the event loop); a
no-op HTTP/1.1 server on the event loop itself, ~30 µs. Envoy's ext_authz filter with
``with_request_body`` sends the request's headers and buffered body as one HTTP request on
a kept-alive connection, and takes the answer as:

* **200** with the headers to set upstream (``allowed_upstream_headers`` in
  envoy/gateway.yaml), the client headers to drop (``x-envoy-auth-headers-to-remove``),
  and, kept by Envoy as dynamic metadata (``dynamic_metadata_from_headers``), the
  answer's budget and guardrail headers (set by the virtual host) and the exchange's
  ticket: a request decided here, whose answer is read only to account for it
  (:mod:`extproc.accounting`), and settled when Envoy's access log or, with
  ``x-gateway-accounting: service``, Envoy's report of the answer comes;
* **200** with ``x-gateway-processing: ext_proc`` and nothing else: handed over; the
  header switches on the ext_proc filter behind this one, which decides the request from
  scratch (see :func:`extproc.pipeline.decide_request` for which requests);
* any other status: the refusal, with its body and headers, in the caller's dialect.

The same port takes Envoy's reports of answers (:mod:`.answer_report`), on a path of their
own, answered 204 once settled.

The wire format is parsed and connections kept by :mod:`extproc.http_server`; this module
decides and frames the answers.
"""

from __future__ import annotations

import contextlib
import logging
import time

from extproc import http_server, pipeline
from extproc.accounting import HEADER, HEADER_TICKET, Accountant
from extproc.adapters.answer_report import REPORT_PATH, reported_answer
from extproc.budgets.meter import NOTHING_USED, Meter
from extproc.decisions import Forward, Headers, Reply, removals_not_set
from extproc.dialects.envelopes import render_error
from extproc.errors import NotFound
from extproc.exchange import Clock, Exchange, utc_now
from extproc.http_server import Request, Write, frame
from extproc.policy.store import PolicyStore
from extproc.telemetry.observer import Observer
from extproc.ticket import InvalidTicket, TicketSigner

log = logging.getLogger(__name__)

HEADER_PROCESSING = "x-gateway-processing"
"""Set on a handed-over request: envoy/gateway.yaml runs ext_proc only when it says so."""
ACCOUNTING_REPORTED = "service"
"""``x-gateway-accounting: service``: envoy/gateway.yaml lifts the answer's usage and
reports it to the service before the answer ends (:mod:`.answer_report`)."""
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
"""Envoy's ext_authz removes the request headers this answer header lists."""
_HANDED_OVER = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-gateway-processing: ext_proc\r\n\r\n"
_REPORT_SETTLED = b"HTTP/1.1 204 No Content\r\n\r\n"
MAX_TICKET_CHARS = 16 * 1024
"""A ticket longer than this goes through ext_proc's metadata instead of an answer header
(Envoy takes at most 60 KiB of headers from the authorization service). The caller's ids
are bounded (:data:`extproc.pipeline.MAX_REQUEST_ID_CHARS`), so only a policy with
extreme names could make one this long (a limit adds its counter's key, and a limit with
alerts four short values more); the authorizer's reservation is then given back whole and
ext_proc reserves afresh."""

MAX_CHECK_BYTES = 16 * 1024 * 1024
"""Bounds one check (URL, headers and body): twice what Envoy sends at most (the ext_authz
filter's ``max_request_bytes``, 8 MiB in the shipped configs, plus the headers). A larger
check from another client of the port is handed over unread, and its connection closed;
one that takes over a minute to arrive is dropped (:class:`~extproc.http_server.Server`'s
``request_seconds``: Envoy's check times out after 15 s)."""


class HttpAuthorizer:
    """Decides what it can (:func:`extproc.pipeline.decide_request`), hands over the rest."""

    def __init__(
        self,
        policies: PolicyStore,
        meter: Meter,
        observer: Observer,
        tickets: TicketSigner,
        accountant: Accountant | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._policies = policies
        self._meter = meter
        self._observer = observer
        self._tickets = tickets
        self._accountant = accountant or Accountant(meter, observer, tickets)
        """Settles the answers Envoy reports (shared with the access log's receiver)."""
        self._clock = clock

    async def answer(self, check: Request, write: Write) -> None:
        """Answer ``check``: an answer report (:mod:`.answer_report`), or a request to decide.
        (Shutdown waits for both as requests of the HTTP server: ``Server.busy``.)"""
        if check.headers.get(":path") == REPORT_PATH:
            await self._settle_report(check, write)
        else:
            await self._decide(check, write)

    async def _settle_report(self, check: Request, write: Write) -> None:
        """Settle the exchange a report describes, then say so: 204, on which Envoy's Lua
        filter marks it answered (never 200, which ext_authz would take for "allowed").
        Anything but a POST with a ticket this service signed is a client's request for a
        path the gateway does not serve (ext_authz forwards any path): refused as unknown,
        and not logged, since anyone can send it. Never raises: a report not answered 204
        is left to the access log."""
        try:
            logged = reported_answer(check.headers)
            ticket = None
            if check.headers.get(":method") == "POST" and logged.ticket:
                with contextlib.suppress(InvalidTicket):
                    ticket = await self._accountant.read(logged.ticket)
            if ticket is None:
                write(_REPORT_REFUSED)
                return
            await self._accountant.settle_ticket(ticket, logged, last_chance=False)
        except Exception:
            log.exception("settling an answer report failed; its access-log record will")
            write(_REPORT_REFUSED)
            return
        write(_REPORT_SETTLED)

    async def _decide(self, check: Request, write: Write) -> None:
        """Decide ``check`` and ``write`` the answer; never raises (a failure hands the
        request over). ``write`` returns ``False`` when Envoy has gone (it gave up on the
        check, or the caller left): a decided exchange then gives its reservation back."""
        exchange = Exchange(
            policy=self._policies.current, observe_response=self._observer.wants_responses
        )
        started = time.perf_counter()
        answered = False

        def answer_once(data: bytes) -> bool:
            nonlocal answered
            answered = True
            return write(data)

        try:
            decision = await pipeline.decide_request(
                exchange,
                check.headers,
                b"".join(check.body),
                self._meter,
                self._clock,
            )
            # Before delivering: the ticket carries the audit record's durations.
            exchange.durations["ext_authz_http"] = time.perf_counter() - started
            await self._deliver(decision, exchange, answer_once)
        except Exception:
            log.exception("unexpected error in the HTTP authorizer; handing over")
            if not answered:
                # ext_proc decides it again and fails closed on its own if it must. One
                # already answered keeps its answer: a second on the same keep-alive
                # connection would be taken for the next check's.
                await self._release(exchange)
                write(_HANDED_OVER)
        finally:
            self._observer.phase("ext_authz_http", time.perf_counter() - started)

    async def _deliver(
        self, decision: Forward | Reply | None, exchange: Exchange, write: Write
    ) -> None:
        if decision is None:
            write(_HANDED_OVER)
            return
        if isinstance(decision, Reply):
            if decision.status >= 500:
                # Envoy takes a 5xx from an HTTP authorization service for the service
                # failing (ext_authz_error: its own 503, the body dropped); ext_proc sends
                # the refusal as it is. Nothing was reserved yet.
                write(_HANDED_OVER)
                return
            refused = _refused(decision)
            write(refused)
            self._observer.finish(exchange)
            return
        ticket: Headers = ()
        mark: Headers = ()
        issued = None
        if _answer_is_read(exchange):
            issued = self._tickets.issue(exchange)
            if len(issued.text) > MAX_TICKET_CHARS:
                await self._release(exchange)
                write(_HANDED_OVER)
                return
            ticket = ((HEADER_TICKET, issued.text),)
            if not exchange.accounted_by_envoy:
                mark = ((HEADER, ACCOUNTING_REPORTED),)
        if write(_allowed(decision, ticket, mark)):
            if issued is None:
                self._observer.finish(exchange)  # passed through: nothing more to learn
            else:
                self._tickets.keep(issued)
            return
        # Nothing went upstream: no charge, and no record will come for it.
        await self._release(exchange)
        exchange.status, exchange.error_code = 0, "check_abandoned"
        self._observer.finish(exchange)

    async def _release(self, exchange: Exchange) -> None:
        """Give back a reservation for a request that will not go up from here (ext_proc
        reserves afresh for one handed over).

        Settled as nothing used, so tokens, dollars and the request count return (ext_proc
        counts a handed-over request afresh).
        """
        reservation = exchange.reservation
        if reservation is None or reservation.settled:
            return
        try:
            await self._meter.settle(reservation, NOTHING_USED)
        except Exception:
            log.exception("releasing request %s failed", exchange.request_id)


def _answer_is_read(exchange: Exchange) -> bool:
    """Whether a decided exchange's answer is read, and settled from its ticket: by Envoy's
    access log (``accounting: envoy``; also an LLM call nothing meters, for metrics), or
    from Envoy's report of it when something needs the answer (a budget, the
    audit log)."""
    if not exchange.only_accounted:
        return False  # a path no dialect serves: nothing to account
    return exchange.accounted_by_envoy or exchange.metered or exchange.observe_response


def _allowed(forward: Forward, metadata: Headers, mark: Headers) -> bytes:
    """The 200 that lets the request go on. ``metadata``: kept by Envoy as dynamic
    metadata (the ticket); ``mark``: set on the request (who reads the answer). A
    header set on the request is not also listed for removal: Envoy removes after it
    sets, so a client's copy is overwritten instead."""
    upstream = (*forward.set_headers, *mark)
    removed = ",".join(removals_not_set(forward.remove_headers, upstream))
    headers: Headers = (*upstream, *forward.answer_headers, *metadata)
    if removed:
        headers = (*headers, (HEADERS_TO_REMOVE, removed))
    return frame(200, headers, b"")


def _refused(reply: Reply) -> bytes:
    return frame(reply.status, reply.headers, reply.body)


_REPORT_REFUSED = _refused(
    render_error(NotFound(f"Invalid URL ({REPORT_PATH})", code="unknown_url"), "openai")
)


async def start(
    authorizer: HttpAuthorizer, host: str, port: int, *, shared: bool = False
) -> http_server.Server:
    """Listen on ``host:port`` (``shared``: with the other workers, through SO_REUSEPORT). Closing
    the server stops taking checks: idle connections close at once, busy ones once their
    check is answered (Envoy fails closed on checks it can no longer send)."""
    server = http_server.Server(
        authorizer.answer,
        unreadable=_HANDED_OVER,
        failed=_HANDED_OVER,
        max_request_bytes=MAX_CHECK_BYTES,
    )
    await server.start(host, port, reuse_port=shared)
    return server
