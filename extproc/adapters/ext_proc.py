"""The ext_proc adapter: Envoy's ``Process`` stream in, core decisions out.

One gRPC stream carries one HTTP exchange. The loop pins the current policy snapshot,
dispatches each phase to the pipeline and answers in the same phase. It fails closed: an
unexpected exception becomes a 500 in the caller's dialect, never a silent pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf.json_format import MessageToDict

from extproc import answer, pipeline
from extproc.accounting import EXCHANGE_NAMESPACE
from extproc.adapters.envoy_proto import common_response, header_map, immediate_response
from extproc.budgets.meter import Meter
from extproc.decisions import Decision, Forward
from extproc.errors import GatewayError
from extproc.exchange import Clock, Exchange, utc_now
from extproc.mcp.sessions import SessionBinder
from extproc.policy.store import PolicyStore
from extproc.telemetry.observer import Observer, null_observer
from extproc.ticket import TicketSigner, signing_key

log = logging.getLogger(__name__)

ANSWER_HEADERS_NAMESPACE = "extproc.answer_headers"
"""Dynamic metadata Envoy's route config turns into answer headers (envoy/gateway.yaml)."""

# A mode override replaces the whole processing mode, so each names every phase it keeps.
_SKIP_BODY = ProcessingMode(
    request_body_mode=ProcessingMode.NONE, response_header_mode=ProcessingMode.SKIP
)
_ANSWER_ONLY = ProcessingMode(
    request_body_mode=ProcessingMode.NONE, response_header_mode=ProcessingMode.SEND
)
_WITH_RESPONSE_HEADERS = ProcessingMode(
    request_body_mode=ProcessingMode.BUFFERED, response_header_mode=ProcessingMode.SEND
)
_STREAM_RESPONSE_BODY = ProcessingMode(
    response_header_mode=ProcessingMode.SEND, response_body_mode=ProcessingMode.STREAMED
)
# A body wanted whole is asked for as BUFFERED_PARTIAL: Envoy sends it whole, or, past its
# buffer limit, what it holds with end_of_stream false, which the core answers with a 502.
# Plain BUFFERED can hang instead: an answer that passes the limit while Envoy still
# waits for the reply to its response headers is held with watermarks, the upstream is
# paused, and BUFFERED never releases it (Envoy 1.40; BUFFERED_PARTIAL moves what is held
# into its own queue, which resumes the upstream).
_BUFFER_RESPONSE_BODY = ProcessingMode(
    response_header_mode=ProcessingMode.SEND, response_body_mode=ProcessingMode.BUFFERED_PARTIAL
)


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self,
        policies: PolicyStore,
        meter: Meter,
        observer: Observer | None = None,
        clock: Clock = utc_now,
        tickets: TicketSigner | None = None,
    ) -> None:
        self._policies = policies
        self._meter = meter
        self._observer = observer or null_observer()
        self._clock = clock
        self._finishing: set[asyncio.Task[None]] = set()
        self._tickets = tickets or TicketSigner(signing_key(None))
        """Signs the tickets of requests whose answers Envoy accounts for (ticket.py)."""
        self._sessions = SessionBinder(self._tickets)
        """Binds MCP sessions to their caller with the same keys (mcp/sessions.py)."""
        self.streams = 0
        """Streams open now (shutdown waits for them before closing the access-log streams)."""

    async def Process(
        self, requests: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        exchange = Exchange(
            policy=self._policies.current,
            observe_response=self._observer.wants_responses,
            mcp_sessions=self._sessions,
        )
        self.streams += 1
        try:
            async for request in requests:
                phase = request.WhichOneof("request") or "unknown"
                started = time.perf_counter()
                try:
                    response = await self._phase(exchange, request)
                except Exception:
                    log.exception("unexpected error in %s phase", phase)
                    yield _failed(exchange)
                    return
                finally:
                    elapsed = time.perf_counter() - started
                    exchange.durations[phase] = exchange.durations.get(phase, 0.0) + elapsed
                    self._observer.phase(phase, elapsed)
                handing = phase == "request_body" and _hands_to_envoy(exchange, response)
                if handing:
                    # Envoy copies it into the access-log record that settles the exchange
                    # (issued last, so that the record it holds has every duration).
                    try:
                        issued = self._tickets.issue(exchange)
                    except Exception:
                        log.exception("issuing the ticket of request %s", exchange.request_id)
                        yield _failed(exchange)
                        return
                    response.dynamic_metadata.update({EXCHANGE_NAMESPACE: {"ticket": issued.text}})
                yield response
                if handing:
                    self._tickets.keep(issued)
                # Sent: from here the record reports it (a stream cut before this point
                # is settled and reported by the stream, as one never handed over; cut
                # right after Envoy took the answer, whichever of the stream and the
                # record settles second finds the reservation's token used and reports
                # nothing more).
                exchange.handed_to_envoy = exchange.handed_to_envoy or handing
        finally:
            self.streams -= 1
            self._finish(exchange)

    def _finish(self, exchange: Exchange) -> None:
        """Account and report the exchange once its stream is over.

        A reservation still open means the client went away, the upstream failed or
        Envoy closed the stream early: it is settled from what is known, in a task of its
        own because this one may be being cancelled (``drain()`` waits for those). A large
        kept answer is accounted that way too, its parse in a worker thread.
        """
        if not exchange.method or exchange.handed_to_envoy:
            return  # no request; or the access log will report it (accounting.py)
        unsettled = exchange.reservation is not None and not exchange.reservation.settled
        if unsettled or answer.keeps_large_answer(exchange):
            task = asyncio.create_task(self._settle_and_report(exchange))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
            return
        answer.account(exchange)
        self._observer.finish(exchange)

    async def drain(self) -> None:
        """Wait for settlements still running (called on shutdown, after streams end)."""
        while self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    async def _settle_and_report(self, exchange: Exchange) -> None:
        if await self._settle(exchange):
            self._observer.finish(exchange)

    async def _settle(self, exchange: Exchange) -> bool:
        """Settle ``exchange``; ``False`` if it was settled and reported from its ticket
        already (cut right after Envoy took the answer, whose access-log record came
        first)."""
        try:
            return await answer.settle(exchange, self._meter)
        except Exception:
            log.exception("settling request %s failed", exchange.request_id)
            return True

    async def _phase(
        self, exchange: Exchange, request: pb.ProcessingRequest
    ) -> pb.ProcessingResponse:
        phase = request.WhichOneof("request")
        if phase == "request_headers":
            decision = pipeline.on_request_headers(
                exchange,
                header_map(request.request_headers),
                _metadata(request),
                request.request_headers.end_of_stream,
                self._clock,
                _peer(request),
            )
            return _answer(decision, phase)
        if phase == "request_body":
            # Finished even if Envoy resets the stream meanwhile: a reservation the store
            # takes after the caller left is then on the exchange, for _finish to settle.
            try:
                decision = await pipeline.completed(self._request_body(exchange, request))
            except asyncio.CancelledError:
                # Envoy had no answer for the body yet, so nothing went upstream: the
                # reservation is given back whole (answer.used).
                exchange.error_code = exchange.error_code or "request_abandoned"
                raise
            return _answer(decision, phase)
        if phase == "response_headers":
            headers = request.response_headers
            decision = answer.on_response_headers(
                exchange, header_map(headers), headers.end_of_stream
            )
            if headers.end_of_stream:
                await pipeline.completed(self._settle(exchange))
            return _answer(decision, phase)
        if phase == "response_body":
            end = request.response_body.end_of_stream
            decision = await answer.read_response_body(exchange, request.response_body.body, end)
            if end:
                # Finished even if the caller leaves meanwhile: the store may apply the
                # settlement anyway, and a second one would find its token used and
                # report nothing, leaving the exchange without an audit record.
                await pipeline.completed(self._settle(exchange))
            return _answer(decision, phase)
        return _continue(phase)

    async def _request_body(self, exchange: Exchange, request: pb.ProcessingRequest) -> Decision:
        rejected = await pipeline.read_request_body(exchange, request.request_body.body)
        if rejected is not None:
            return rejected
        return await pipeline.finish_request_body(exchange, self._meter, self._clock)


def _failed(exchange: Exchange) -> pb.ProcessingResponse:
    """The 500 for a phase that failed unexpectedly, in the caller's dialect."""
    error = GatewayError("The gateway failed to process the request.")
    return immediate_response(exchange.reject(error))


def _hands_to_envoy(exchange: Exchange, response: pb.ProcessingResponse) -> bool:
    """Whether ``response`` lets a request go up whose answer Envoy accounts for."""
    return exchange.accounted_by_envoy and response.HasField("request_body")


def _answer(decision: Decision, phase: str) -> pb.ProcessingResponse:
    if not isinstance(decision, Forward):
        return immediate_response(decision)
    # Only a request body is rewritten with its length: Envoy takes none from the reply to
    # an answer's body (STREAMED, BUFFERED_PARTIAL), whose response headers dropped it.
    common = common_response(decision, body_length=phase == "request_body")
    if phase == "request_headers":
        response = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
        if decision.skip_request_body:
            response.mode_override.CopyFrom(
                _ANSWER_ONLY if decision.process_response else _SKIP_BODY
            )
        elif decision.process_response:
            response.mode_override.CopyFrom(_WITH_RESPONSE_HEADERS)
        return response
    if phase == "response_headers":
        response = pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common))
        if decision.response_body == "streamed":
            response.mode_override.CopyFrom(_STREAM_RESPONSE_BODY)
        elif decision.response_body == "buffered":
            response.mode_override.CopyFrom(_BUFFER_RESPONSE_BODY)
        return response
    if phase == "response_body":
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))
    response = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
    if decision.answer_headers:
        response.dynamic_metadata.update({ANSWER_HEADERS_NAMESPACE: dict(decision.answer_headers)})
    return response


def _continue(phase: str | None) -> pb.ProcessingResponse:
    """An empty answer for a phase no stage handles (Envoy's config should not send it)."""
    if phase == "request_trailers":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


PEER_ATTRIBUTE = "connection.uri_san_peer_certificate"
"""Requested in the filter's ``request_attributes``: the verified client cert's SPIFFE id."""


def _peer(request: pb.ProcessingRequest) -> str | None:
    for struct in request.attributes.values():
        value = struct.fields.get(PEER_ATTRIBUTE)
        if value is not None and value.string_value:
            return str(value.string_value)
    return None


def _metadata(request: pb.ProcessingRequest) -> Mapping[str, Any] | None:
    """Forwarded dynamic metadata (e.g. jwt_authn claims), converted only when present."""
    namespaces = request.metadata_context.filter_metadata
    if not namespaces:
        return None
    return {name: MessageToDict(struct) for name, struct in namespaces.items()}
