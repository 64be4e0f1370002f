"""One span per exchange, continuing the caller's trace, with gen_ai attributes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
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


class _StuckCollector(SpanExporter):
    """An exporter whose collector accepts and never answers (as OTLP's would wait)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(30)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.release.set()


async def test_closing_waits_for_a_stuck_collector_no_longer_than_asked() -> None:
    """The flush ran on the loop's default executor, whose thread the end of the event
    loop waits for: a dead collector held the process's exit for the exporter's timeout
    past the documented bound."""
    collector = _StuckCollector()
    tracing = Tracing(collector)
    tracing.record({"request_id": "r", "model": "m"}, None, time.time_ns(), time.time_ns())
    loop = asyncio.get_running_loop()
    started = loop.time()
    stuck = asyncio.Event()
    loop.call_later(0.05, stuck.set)
    await stuck.wait()  # the batch is in the exporter's hands by now
    assert await tracing.close(0.2) is False
    assert loop.time() - started < 5
    # Still stuck, in a daemon thread: the interpreter's exit does not wait for it.
    flushing = [t for t in threading.enumerate() if t.name == "trace-flush"]
    assert flushing and all(t.daemon and t.is_alive() for t in flushing)
    collector.release.set()


def test_the_service_name_comes_from_the_environment_when_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def service_name() -> object:
        exporter = InMemorySpanExporter()
        tracing = Tracing(exporter)
        tracing.record({"request_id": "r", "model": "m"}, None, 1, 2)
        tracing.shutdown()
        (span,) = exporter.get_finished_spans()
        return span.resource.attributes["service.name"]

    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert service_name() == "extproc"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ai-gateway-prod")
    assert service_name() == "ai-gateway-prod"
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=gw-eu,deployment.environment=prod")
    assert service_name() == "gw-eu"


def _span_of(record: dict[str, object]) -> ReadableSpan:
    exporter = InMemorySpanExporter()
    tracing = Tracing(exporter)
    tracing.record(record, None, 1, 2)
    tracing.shutdown()
    (span,) = exporter.get_finished_spans()
    return span


def test_spans_are_named_by_the_operation_and_mcp_calls_claim_no_llm_system() -> None:
    embeddings = _span_of({"dialect": "openai.embeddings", "model": "text-embedding-3-small"})
    assert embeddings.name == "embeddings text-embedding-3-small"  # was "chat ..."
    attributes = dict(embeddings.attributes or {})
    assert attributes["gen_ai.operation.name"] == "embeddings"
    assert attributes["gen_ai.system"] == "openai"
    claude = dict(_span_of({"dialect": "anthropic.messages", "model": "c"}).attributes or {})
    assert (claude["gen_ai.system"], claude["gen_ai.operation.name"]) == ("anthropic", "chat")
    mcp = _span_of({"method": "POST", "path": "/mcp", "status": 200})
    assert mcp.name == "POST /mcp"
    assert "gen_ai.system" not in dict(mcp.attributes or {})  # was "openai"
