"""Optional OpenTelemetry spans: one per exchange, exported over OTLP, off by default.

The span continues the caller's W3C trace (``traceparent``), carries the gen_ai semantic
convention attributes (system, request and response model, token usage) and the gateway's
own (team, status, guardrail and budget decisions), and is exported by a batch processor
on its own thread, never on the request path. Without ``--otlp-endpoint`` nothing of this
runs; Envoy still forwards ``traceparent`` upstream and the audit record keeps the trace id.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from extproc import __version__
from extproc.telemetry.threads import resolve_from_thread

_PROPAGATOR = TraceContextTextMapPropagator()
EXPORT_SECONDS = 2.0
"""How long the OTLP exporter waits for the collector per batch (its default is 10 s)."""
_NANOS = 1_000_000_000


class Tracing:
    """Turns finished exchanges' audit records into spans."""

    def __init__(self, exporter: SpanExporter, service_name: str = "extproc") -> None:
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the service, as in any
        # OpenTelemetry SDK; ``service_name`` only when they do not.
        resource = Resource.create({"service.version": __version__})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": service_name}))
        # Not on exit: an exporter stuck on a dead collector would hold the exit up for its
        # timeout; close() bounds the flush.
        self._provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer: Tracer = self._provider.get_tracer("extproc")

    @classmethod
    def otlp(cls, endpoint: str) -> Tracing:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return cls(OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_SECONDS))

    def record(
        self, record: dict[str, Any], traceparent: str | None, start_ns: int, end_ns: int
    ) -> None:
        parent: Context | None = None
        if traceparent:
            parent = _PROPAGATOR.extract({"traceparent": traceparent})
        model = record.get("model")
        operation = _OPERATIONS.get(record.get("dialect") or "")
        span = self._tracer.start_span(
            f"{operation} {model}"
            if operation and model
            else f"{record.get('method')} {record.get('path')}",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=start_ns,
            attributes=_attributes(record),
        )
        status = record.get("status") or 0
        if status >= 500 or record.get("error"):
            span.set_status(Status(StatusCode.ERROR, record.get("error") or str(status)))
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        """Flush what is batched, however long the exporter takes."""
        self._provider.shutdown()

    async def close(self, seconds: float) -> bool:
        """Flush what is batched (on SIGTERM), waiting ``seconds`` at most: the flush runs
        in a daemon thread of its own, which the event loop's end does not wait for (its
        default executor's threads it would, for as long as a dead collector holds one).
        Whether it finished in time."""
        loop = asyncio.get_running_loop()
        flushed = loop.create_future()

        def flush() -> None:
            try:
                self._provider.shutdown()
            finally:
                resolve_from_thread(loop, flushed)

        threading.Thread(target=flush, name="trace-flush", daemon=True).start()
        try:
            await asyncio.wait_for(flushed, seconds)
        except TimeoutError:
            return False
        return True


_OPERATIONS = {
    "openai.chat": "chat",
    "openai.responses": "chat",
    "anthropic.messages": "chat",
    "openai.completions": "text_completion",
    "openai.embeddings": "embeddings",
}
"""The GenAI semantic conventions' operation of each dialect: spans are named by it."""


def _attributes(record: dict[str, Any]) -> dict[str, Any]:
    dialect = record.get("dialect") or ""
    values = {
        # An LLM API's exchange only (an MCP call, an unknown path: none).
        "gen_ai.system": dialect.partition(".")[0] if dialect in _OPERATIONS else None,
        "gen_ai.operation.name": _OPERATIONS.get(dialect),
        "gen_ai.request.model": record.get("model_requested"),
        "gen_ai.response.model": record.get("model"),
        "gen_ai.usage.input_tokens": record.get("input_tokens"),
        "gen_ai.usage.output_tokens": record.get("output_tokens"),
        "http.request.method": record.get("method"),
        "url.path": record.get("path"),
        "http.response.status_code": record.get("status"),
        "extproc.request_id": record.get("request_id"),
        "extproc.team": record.get("team"),
        "extproc.key_id": record.get("key_id"),
        "extproc.backend": record.get("backend"),
        "extproc.cost_micro_usd": record.get("cost_micro_usd"),
        "extproc.budget": record.get("budget"),
        "extproc.error": record.get("error"),
        "extproc.guardrails": [
            f"{v['rule']}={v['action']}" for v in record.get("guardrails") or []
        ],
    }
    return {k: v for k, v in values.items() if v not in (None, [], "")}
