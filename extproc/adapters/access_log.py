"""The access-log adapter: Envoy's ``StreamAccessLogs`` in, finished answers out.

Envoy's gateway config sends one record per exchange the service handed to it
(``x-gateway-accounting: envoy``), per exchange whose caller left, and per exchange the
HTTP authorizer decided whose answer was not reported before its end, batched on a
long-lived stream; each becomes a :class:`~extproc.accounting.LoggedAnswer` that the
:class:`~extproc.accounting.Accountant` settles from the ticket it carries, whichever
process decided the request. A record carrying the mark of a report
(:mod:`extproc.adapters.answer_report`) was settled by that report.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from extproc.accounting import (
    ANSWERED,
    AUTHZ_NAMESPACE,
    EXCHANGE_NAMESPACE,
    HEADER_TICKET,
    Accountant,
    LoggedAnswer,
)
from extproc.adapters.envoy_proto import metadata_string
from extproc.routing import HEADER_SERVED_BY

log = logging.getLogger(__name__)

BATCHES_IN_FLIGHT = 4
"""Batches of one stream settled at once. One at a time, a stream's settlements waited on
each other's Redis round trips while Envoy's next batches piled up in gRPC's flow-control
window (measured at 16 connections under ``accounting: envoy``: the service's peak RSS
147-156 MB one at a time, 142 MB four at a time, for about 3 % less throughput in three
interleaved pairs, within this machine's noise). Envoy dropped no record either way."""
DRAIN_QUIET_SECONDS = 0.2
"""On shutdown a stream ends once no record has come for this long, so the records Envoy
had sent before are settled, not dropped with the stream."""
DRAIN_SECONDS = 2.0
"""At most this long, however busy the stream (Envoy sends later records to a new one)."""
USAGE_NAMESPACE = "extproc.usage"
"""Where envoy/gateway.yaml's json_to_metadata and sse_to_metadata put the usage fields."""
ANSWER_TOO_LARGE_DETAILS = "response_payload_too_large"
"""Envoy's response code details for an answer past its buffer limit while held whole."""


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Envoy keeps its log streams open for good; :meth:`close` ends them on shutdown, once
    the exchanges this process serves are over and each stream has been quiet for
    :data:`DRAIN_QUIET_SECONDS`, so a graceful stop does not wait for them (Envoy sends
    later records on a new stream, to whichever process then answers)."""

    def __init__(self, accountant: Accountant) -> None:
        self._accountant = accountant
        self._closing = asyncio.Event()

    def close(self) -> None:
        self._closing.set()

    async def StreamAccessLogs(
        self, messages: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        closing = asyncio.ensure_future(self._closing.wait())
        incoming = aiter(messages)
        settling: set[asyncio.Future[None]] = set()
        try:
            loop = asyncio.get_running_loop()
            draining_until: float | None = None
            while True:
                # Shutting down: what Envoy sent already waits in gRPC's buffers, and is
                # lost with the stream (Envoy counts it as sent): read on until the stream
                # is quiet for a moment, or DRAIN_SECONDS have passed however busy it is.
                if draining_until is None and closing.done():
                    draining_until = loop.time() + DRAIN_SECONDS
                if draining_until is not None and loop.time() >= draining_until:
                    break
                message = asyncio.ensure_future(anext(incoming))
                if draining_until is None:
                    await asyncio.wait({message, closing}, return_when=asyncio.FIRST_COMPLETED)
                    if not message.done():
                        draining_until = loop.time() + DRAIN_SECONDS
                if not message.done():
                    assert draining_until is not None
                    quiet = min(DRAIN_QUIET_SECONDS, max(draining_until - loop.time(), 0.0))
                    await asyncio.wait({message}, timeout=quiet)
                if not message.done():
                    # Its outcome no longer matters (it may end the stream as it goes).
                    message.add_done_callback(_discard)
                    message.cancel()
                    break
                try:
                    batch = message.result()
                except StopAsyncIteration:
                    break
                settlement = asyncio.ensure_future(self._settle(batch))
                settling.add(settlement)
                settlement.add_done_callback(settling.discard)
                if len(settling) >= BATCHES_IN_FLIGHT:
                    await asyncio.wait(settling, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if settling:  # the stream ends once its records are settled
                await asyncio.wait(settling)
        return als_pb2.StreamAccessLogsResponse()

    async def _settle(self, batch: als_pb2.StreamAccessLogsMessage) -> None:
        """Settle a batch's records together (their budget adjusts share one store call).
        Never raises: it runs beside the stream, which goes on reading."""
        try:
            await self.settle([a for e in batch.http_logs.log_entry if (a := logged_answer(e))])
        except Exception:
            log.exception(
                "settling a batch of %d access-log records failed", len(batch.http_logs.log_entry)
            )

    async def settle(self, logged: Sequence[LoggedAnswer]) -> None:
        outcomes = await asyncio.gather(
            *(self._accountant.settle(answer) for answer in logged), return_exceptions=True
        )
        for answer, outcome in zip(logged, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.error("accounting request %s failed: %r", answer.request_id, outcome)
            elif not outcome:
                log.debug("access-log record without a ticket: request %s", answer.request_id)


def _discard(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def logged_answer(entry: HTTPAccessLogEntry) -> LoggedAnswer | None:
    request_id = entry.request.request_id
    if not request_id:
        return None
    metadata = entry.common_properties.metadata.filter_metadata
    if metadata_string(metadata, EXCHANGE_NAMESPACE, ANSWERED):
        return None  # reported before its end, and settled then
    usage_struct = metadata.get(USAGE_NAMESPACE)
    usage = (
        {
            name: int(value.number_value)
            for name, value in usage_struct.fields.items()
            # An upstream's 1e999 reaches us as infinity, which no count is.
            if math.isfinite(value.number_value)
        }
        if usage_struct is not None
        else {}
    )
    response = entry.response
    too_large = response.response_code_details == ANSWER_TOO_LARGE_DETAILS
    return LoggedAnswer(
        ticket=metadata_string(metadata, AUTHZ_NAMESPACE, HEADER_TICKET)
        or metadata_string(metadata, EXCHANGE_NAMESPACE, "ticket"),
        request_id=request_id,
        status=response.response_code.value,
        usage=usage,
        served_by=response.response_headers.get(HEADER_SERVED_BY) or None,
        response_bytes=entry.common_properties.upstream_wire_bytes_received
        if too_large
        else response.response_body_bytes,
        too_large=too_large,
    )
