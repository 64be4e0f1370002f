"""One span per exchange, continuing the caller's trace, with gen_ai attributes."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from extproc.adapters.ext_proc import ExternalProcessor
from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.meter import Meter
from extproc.policy.store import PolicyStore
from extproc.stack import ROOT
from extproc.telemetry.audit import AuditLog
from extproc.telemetry.observer import Observer
from extproc.telemetry.tracing import Tracing
from tests.unit.fake_envoy import exchange, request_body, request_headers

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


async def test_an_exchange_becomes_a_span_in_the_callers_trace() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(exporter)
    observer = Observer(None, AuditLog(()), tracing=tracing)
    processor = ExternalProcessor(
        PolicyStore(ROOT / "policies" / "example.yaml"), Meter(MemoryStore()), observer
    )
    headers = {"authorization": "Bearer sk-demo-admin", "traceparent": f"00-{TRACE}-{PARENT}-01"}
    await exchange(
        processor,
        [
            request_headers("/v1/chat/completions", headers),
            request_body({"model": "mini", "messages": [{"role": "user", "content": "hi"}]}),
        ],
    )
    await processor.drain()  # the reservation is settled, then the exchange reported
    tracing.shutdown()  # flushes the batch processor
    (span,) = exporter.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == TRACE
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.request.model"] == "mini"
    assert attributes["gen_ai.response.model"] == "gpt-4o-mini"
    assert attributes["extproc.team"] == "platform"
    assert "sk-demo-admin" not in str(attributes)
    assert span.name == "chat gpt-4o-mini"


async def test_no_traceparent_starts_a_new_trace() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(exporter)
    observer = Observer(None, AuditLog(()), tracing=tracing)
    processor = ExternalProcessor(
        PolicyStore(ROOT / "policies" / "example.yaml"), Meter(MemoryStore()), observer
    )
    await exchange(processor, [request_headers("/v1/chat/completions", {"x-api-key": "nope"})])
    tracing.shutdown()
    (span,) = exporter.get_finished_spans()
    assert span.parent is None
    assert dict(span.attributes or {})["http.response.status_code"] == 401


def test_the_otlp_exporter_can_be_built() -> None:
    """--otlp-endpoint once crashed the service at start: xds-protos's older copy of
    OpenTelemetry's protos had overwritten the one the exporter imports (Makefile)."""
    tracing = Tracing.otlp("http://127.0.0.1:4318/v1/traces")
    tracing.shutdown()
