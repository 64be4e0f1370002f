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

The wire format is parsed by httptools (llhttp, the parser uvicorn uses); this module only
frames answers. Requests on one connection are answered in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import httptools

from extproc import pipeline
from extproc.accounting import HEADER, HEADER_TICKET, Accountant
from extproc.adapters.answer_report import REPORT_PATH, reported_answer
from extproc.budgets.meter import Cost, Meter
from extproc.decisions import Forward, Headers, Reply
from extproc.dialects.envelopes import render_error
from extproc.errors import NotFound
from extproc.exchange import Clock, Exchange, utc_now
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
_HANDED_OVER_AND_CLOSE = _HANDED_OVER.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
}
_REPORT_SETTLED = b"HTTP/1.1 204 No Content\r\n\r\n"
NOTHING_USED = Cost(0, 0, 0)
"""Settling a reservation with this gives all of it back (but the request count)."""
MAX_TICKET_CHARS = 16 * 1024
"""A ticket longer than this goes through ext_proc's metadata instead of an answer header
(Envoy takes at most 60 KiB of headers from the authorization service). The caller's ids
are bounded (:data:`extproc.pipeline.MAX_REQUEST_ID_CHARS`), so only a policy with
extreme names could make one this long; ext_proc then reserves again, and a
requests-per-window limit counts that request twice."""
Write = Callable[[bytes], bool]
"""Writes one answer to Envoy; ``False`` if the connection is gone."""


@dataclass(slots=True)
class Check:
    """One authorization request: the client request's headers, with ``:method`` and
    ``:path`` as ext_proc names them, and its body."""

    headers: dict[str, str] = field(default_factory=dict)
    body: list[bytes] = field(default_factory=list)


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
        self.checks = 0
        """Checks and answer reports being answered now (shutdown waits for them)."""

    async def answer(self, check: Check, write: Write) -> None:
        """Answer ``check``: an answer report (:mod:`.answer_report`), or a request to decide."""
        self.checks += 1
        try:
            if check.headers.get(":path") == REPORT_PATH:
                await self._settle_report(check, write)
            else:
                await self._decide(check, write)
        finally:
            self.checks -= 1

    async def _settle_report(self, check: Check, write: Write) -> None:
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
            await self._accountant.settle_ticket(ticket, logged)
        except Exception:
            log.exception("settling an answer report failed; its access-log record will")
            write(_REPORT_REFUSED)
            return
        write(_REPORT_SETTLED)

    async def _decide(self, check: Check, write: Write) -> None:
        """Decide ``check`` and ``write`` the answer; never raises (a failure hands the
        request over). ``write`` returns ``False`` when Envoy has gone (it gave up on the
        check, or the caller left): a decided exchange then gives its reservation back."""
        exchange = Exchange(
            policy=self._policies.current, observe_response=self._observer.wants_responses
        )
        started = time.perf_counter()
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
            await self._deliver(decision, exchange, write)
        except Exception:
            # ext_proc decides it again and fails closed on its own if it must.
            log.exception("unexpected error in the HTTP authorizer; handing over")
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
        if _answer_is_read(exchange):
            issued = self._tickets.issue(exchange)
            if len(issued) > MAX_TICKET_CHARS:
                await self._release(exchange)
                write(_HANDED_OVER)
                return
            ticket = ((HEADER_TICKET, issued),)
            if not exchange.accounted_by_envoy:
                mark = ((HEADER, ACCOUNTING_REPORTED),)
        if write(_allowed(decision, ticket, mark)):
            if not ticket:
                self._observer.finish(exchange)  # passed through: nothing more to learn
            return
        # Nothing went upstream: no charge, and no record will come for it.
        await self._release(exchange)
        exchange.status, exchange.error_code = 0, "check_abandoned"
        self._observer.finish(exchange)

    async def _release(self, exchange: Exchange) -> None:
        """Give back a reservation for a request that will not go up from here (ext_proc
        reserves afresh for one handed over).

        Settled as nothing used, so tokens and dollars return; a request counter keeps
        the one request (the store cannot un-count it).
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
    setting = {name for name, _ in upstream}
    removed = ",".join(name for name in forward.remove_headers if name not in setting)
    headers: Headers = (*upstream, *forward.answer_headers, *metadata)
    if removed:
        headers = (*headers, (HEADERS_TO_REMOVE, removed))
    return _frame(200, headers, b"")


def _refused(reply: Reply) -> bytes:
    return _frame(reply.status, reply.headers, reply.body)


def _frame(status: int, headers: Headers, body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Refused')}"]
    lines += [f"{name}: {_safe(value)}" for name, value in headers if name != "content-length"]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def _safe(value: str) -> str:
    """A header value cannot carry a line break (it would forge headers)."""
    if "\r" in value or "\n" in value:
        raise ValueError("header value with a line break")
    return value


_REPORT_REFUSED = _refused(
    render_error(NotFound(f"Invalid URL ({REPORT_PATH})", code="unknown_url"), "openai")
)


class _Connection(asyncio.Protocol):
    """One kept-alive connection from Envoy; its checks are answered in arrival order."""

    def __init__(self, authorizer: HttpAuthorizer, open_connections: set[_Connection]) -> None:
        self._authorizer = authorizer
        self._open = open_connections
        self._parser = httptools.HttpRequestParser(self)
        self._check = Check()
        self._queue: deque[Check] = deque()
        self._serving: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._closing = False

    def close_when_idle(self) -> None:
        """Shutdown: close now if no check is being answered, else after its answer."""
        self._closing = True
        if self._serving is None and self._transport is not None:
            self._transport.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._open.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # A check this parser cannot read (llhttp knows fewer methods than Envoy):
            # ext_proc decides the request instead. The connection's framing is lost, so
            # it closes; Envoy opens a new one for the next check.
            assert self._transport is not None
            self._transport.write(_HANDED_OVER_AND_CLOSE)
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._open.discard(self)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        path = self._check.headers.get(":path", "") + url.decode("utf-8", "replace")
        self._check.headers[":path"] = path

    def on_header(self, name: bytes, value: bytes) -> None:
        self._check.headers[name.decode("latin-1").lower()] = value.decode("utf-8", "replace")

    def on_body(self, body: bytes) -> None:
        self._check.body.append(body)

    def on_message_complete(self) -> None:
        check, self._check = self._check, Check()
        check.headers[":method"] = self._parser.get_method().decode("ascii")
        self._queue.append(check)
        if self._serving is None:
            self._serving = asyncio.get_running_loop().create_task(self._serve())

    def _write(self, answer: bytes) -> bool:
        if self._transport is None or self._transport.is_closing():
            return False
        self._transport.write(answer)
        return True

    async def _serve(self) -> None:
        try:
            while self._queue:
                await self._authorizer.answer(self._queue.popleft(), self._write)
        finally:
            self._serving = None
            if self._closing and self._transport is not None:
                self._transport.close()


class AuthorizerServer:
    """The listening socket and the connections Envoy keeps open to it."""

    def __init__(self, server: asyncio.Server, connections: set[_Connection]) -> None:
        self._server = server
        self._connections = connections

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop taking connections and checks: idle connections close now, busy ones once
        their check is answered (Envoy fails closed on checks it can no longer send)."""
        self._server.close()
        for connection in list(self._connections):
            connection.close_when_idle()


async def start(authorizer: HttpAuthorizer, host: str, port: int) -> AuthorizerServer:
    """Listen on ``host:port`` (shared with other workers through SO_REUSEPORT)."""
    loop = asyncio.get_running_loop()
    connections: set[_Connection] = set()
    server = await loop.create_server(
        lambda: _Connection(authorizer, connections), host, port, reuse_port=True
    )
    return AuthorizerServer(server, connections)
