"""The ext_authz adapter: Envoy's ``Check`` in, the pipeline's decision out.

For meshes whose supported extension point is an external authorizer (Istio's
``AuthorizationPolicy`` with ``action: CUSTOM``). It runs the same identity, RBAC and
budget stages as ext_proc, through :func:`extproc.pipeline.authorize`; an allowed request
leaves with the trusted identity headers set (client copies removed) and the resolved
principal in dynamic metadata, which ext_proc, if it runs next, reads instead of
identifying the caller a second time. Body rewrites stay ext_proc's job.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct
from google.rpc import code_pb2, status_pb2

from extproc import pipeline
from extproc.budgets.meter import Meter
from extproc.decisions import Forward, Headers, Reply, removals_not_set
from extproc.errors import GatewayError
from extproc.exchange import Clock, Exchange, utc_now
from extproc.identity import VOUCHED_KEY, vouch
from extproc.policy.store import PolicyStore
from extproc.telemetry.observer import Observer, null_observer

log = logging.getLogger(__name__)

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_GRPC_CODE = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.NOT_FOUND,
    413: code_pb2.INVALID_ARGUMENT,
    429: code_pb2.RESOURCE_EXHAUSTED,
    503: code_pb2.UNAVAILABLE,
}


class Authorization(pb_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Denials are audited here (ext_proc never sees them); allowed requests by ext_proc."""

    def __init__(
        self,
        policies: PolicyStore,
        meter: Meter,
        observer: Observer | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._policies = policies
        self._meter = meter
        self._observer = observer or null_observer()
        self._clock = clock

    async def Check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        exchange = Exchange(policy=self._policies.current)
        started = time.perf_counter()
        try:
            http = request.attributes.request.http
            headers = {":path": http.path, ":method": http.method, **dict(http.headers)}
            body = http.raw_body or http.body.encode("utf-8")
            namespaces = request.attributes.metadata_context.filter_metadata
            metadata = {n: MessageToDict(s) for n, s in namespaces.items()} or None
            decision = await pipeline.authorize(
                exchange,
                headers,
                metadata,
                body or None,
                request.attributes.source.principal or None,
                self._meter,
                self._clock,
            )
        except Exception:
            log.exception("unexpected error in Check")
            error = GatewayError("The gateway failed to authorize the request.")
            decision = exchange.reject(error)
        elapsed = time.perf_counter() - started
        exchange.durations["ext_authz_check"] = elapsed
        self._observer.phase("ext_authz_check", elapsed)
        if isinstance(decision, Reply):
            self._observer.finish(exchange)
            return _denied(decision)
        return _allowed(decision, exchange)


def _options(headers: Headers) -> list[HeaderValueOption]:
    return [
        HeaderValueOption(header=HeaderValue(key=k, value=v), append_action=_OVERWRITE)
        for k, v in headers
    ]


def _allowed(decision: Forward, exchange: Exchange) -> pb.CheckResponse:
    response = pb.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=pb.OkHttpResponse(
            headers=_options(decision.set_headers),
            headers_to_remove=removals_not_set(decision.remove_headers, decision.set_headers),
        ),
    )
    if exchange.principal is not None:
        metadata = Struct()
        metadata.update({VOUCHED_KEY: vouch(exchange.principal)})
        response.dynamic_metadata.CopyFrom(metadata)
    return response


def _denied(reply: Reply) -> pb.CheckResponse:
    return pb.CheckResponse(
        status=status_pb2.Status(code=_GRPC_CODE.get(reply.status, code_pb2.PERMISSION_DENIED)),
        denied_response=pb.DeniedHttpResponse(
            status=HttpStatus(code=reply.status),
            headers=_options(reply.headers),
            body=reply.body.decode("utf-8"),
        ),
    )
