"""The project's own admin gRPC API (``protos/extproc/admin/v1/admin.proto``).

Usage per budget (read from the live budget store, so it also works for the in-process
store) and the most recent audit records this instance wrote. Every call must carry the
admin token as ``authorization: Bearer <token>`` metadata; the service keeps only the
token's SHA-256 and compares digests in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from datetime import UTC, datetime
from typing import Any

import grpc
import orjson

from extproc.admin.v1 import admin_pb2 as pb
from extproc.admin.v1 import admin_pb2_grpc as pb_grpc
from extproc.budgets.report import usage_report
from extproc.budgets.store import BudgetStore, StoreUnavailable
from extproc.policy.store import PolicyStore

MAX_EVENTS = 1000


class AdminApi(pb_grpc.AdminServicer):
    def __init__(
        self,
        policies: PolicyStore,
        store: BudgetStore,
        recent: deque[dict[str, Any]],
        token: str,
    ) -> None:
        self._policies = policies
        self._store = store
        self._recent = recent
        # Stripped as a presented token is: a Secret file's trailing newline must not make
        # the API unusable.
        self._digest = hashlib.sha256(token.strip().encode()).digest()

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetUsageResponse:
        await self._authorize(context)
        try:
            lines = await usage_report(
                self._policies.current, self._store, datetime.now(UTC), request.team or None
            )
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"budget store unavailable: {exc}")
        return pb.GetUsageResponse(budgets=[pb.BudgetUsage(**line.as_dict()) for line in lines])

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAuditEventsResponse:
        await self._authorize(context)
        limit = min(request.limit or 100, MAX_EVENTS)
        events = []
        for record in reversed(self._recent):
            if (
                (request.team and record["team"] != request.team)
                or (request.key_id and record["key_id"] != request.key_id)
                or (request.model and record["model"] != request.model)
                or (request.status and record["status"] != request.status)
            ):
                continue
            events.append(
                pb.AuditEvent(
                    request_id=record["request_id"],
                    time=record["time"],
                    team=record["team"] or "",
                    key_id=record["key_id"] or "",
                    model=record["model"] or "",
                    status=record["status"] or 0,
                    record_json=orjson.dumps(record).decode(),
                )
            )
            if len(events) == limit:
                break
        return pb.ListAuditEventsResponse(events=events)

    async def _authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        presented = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self._digest):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid admin token is required")
