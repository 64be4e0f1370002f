"""The access-log adapter: Envoy's ``StreamAccessLogs`` in, finished answers out.

Envoy's gateway config sends one record per exchange the service handed to it
(``x-gateway-accounting: envoy``), batched on a long-lived stream; each becomes a
:class:`~extproc.accounting.LoggedAnswer` for :class:`~extproc.accounting.PendingAnswers`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from extproc.accounting import LoggedAnswer, PendingAnswers
from extproc.routing import HEADER_SERVED_BY

log = logging.getLogger(__name__)

USAGE_NAMESPACE = "extproc.usage"
"""Where envoy/gateway.yaml's json_to_metadata and sse_to_metadata put the usage fields."""


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, pending: PendingAnswers) -> None:
        self._pending = pending

    async def StreamAccessLogs(
        self, messages: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in messages:
            for entry in message.http_logs.log_entry:
                logged = logged_answer(entry)
                if logged is None:
                    continue
                try:
                    if not await self._pending.settle(logged):
                        log.debug("access-log record for unknown request %s", logged.request_id)
                except Exception:
                    log.exception("accounting request %s failed", logged.request_id)
        return als_pb2.StreamAccessLogsResponse()


def logged_answer(entry: HTTPAccessLogEntry) -> LoggedAnswer | None:
    request_id = entry.request.request_id
    if not request_id:
        return None
    usage_struct = entry.common_properties.metadata.filter_metadata.get(USAGE_NAMESPACE)
    usage = (
        {name: int(value.number_value) for name, value in usage_struct.fields.items()}
        if usage_struct is not None
        else {}
    )
    response = entry.response
    return LoggedAnswer(
        request_id=request_id,
        status=response.response_code.value,
        usage=usage,
        served_by=response.response_headers.get(HEADER_SERVED_BY) or None,
        response_bytes=response.response_body_bytes,
    )
