"""The ext_proc adapter: Envoy's ``Process`` stream in, core decisions out.

One gRPC stream carries one HTTP exchange. The loop pins the current policy snapshot,
dispatches each phase to the pipeline and answers in the same phase. It fails closed: an
unexpected exception becomes a 500 in the caller's dialect, never a silent pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf.json_format import MessageToDict

from extproc import pipeline
from extproc.adapters.envoy_proto import common_response, header_map, immediate_response
from extproc.decisions import Decision, Forward
from extproc.dialects.envelopes import render_error
from extproc.errors import GatewayError
from extproc.pipeline import Clock, Exchange
from extproc.policy.store import PolicyStore

log = logging.getLogger(__name__)

OFFLOAD_BODY_BYTES = 256 * 1024
"""Bodies above this are processed in a worker thread so one huge prompt never stalls
the event loop (and every other stream on it)."""

_SKIP_BODY = ProcessingMode(request_body_mode=ProcessingMode.NONE)


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, policies: PolicyStore, clock: Clock = pipeline.utc_now) -> None:
        self._policies = policies
        self._clock = clock

    async def Process(
        self, requests: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        exchange = Exchange(policy=self._policies.current)
        async for request in requests:
            try:
                yield await self._phase(exchange, request)
            except Exception:
                log.exception("unexpected error in %s phase", request.WhichOneof("request"))
                error = GatewayError("The gateway failed to process the request.")
                yield immediate_response(render_error(error, exchange.envelope))
                return

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
            )
            return _answer(decision, "request_headers")
        if phase == "request_body":
            body = request.request_body.body
            if len(body) > OFFLOAD_BODY_BYTES:
                decision = await asyncio.to_thread(pipeline.on_request_body, exchange, body)
            else:
                decision = pipeline.on_request_body(exchange, body)
            return _answer(decision, "request_body")
        return _continue(phase)


def _answer(decision: Decision, phase: str) -> pb.ProcessingResponse:
    if not isinstance(decision, Forward):
        return immediate_response(decision)
    common = common_response(decision)
    if phase == "request_headers":
        response = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
        if decision.skip_request_body:
            response.mode_override.CopyFrom(_SKIP_BODY)
        return response
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))


def _continue(phase: str | None) -> pb.ProcessingResponse:
    """An empty answer for a phase no stage handles (Envoy's config should not send it)."""
    if phase in ("response_headers",):
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    if phase == "response_body":
        return pb.ProcessingResponse(response_body=pb.BodyResponse())
    if phase == "request_trailers":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def _metadata(request: pb.ProcessingRequest) -> Mapping[str, Any] | None:
    """Forwarded dynamic metadata (e.g. jwt_authn claims), converted only when present."""
    namespaces = request.metadata_context.filter_metadata
    if not namespaces:
        return None
    return {name: MessageToDict(struct) for name, struct in namespaces.items()}
