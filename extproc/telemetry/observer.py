"""Where an adapter reports phases and finished exchanges: metrics and audit in one call."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from extproc.exchange import Exchange
from extproc.telemetry.audit import AuditLog
from extproc.telemetry.metrics import Metrics
from extproc.telemetry.record import exchange_record
from extproc.telemetry.tracing import Tracing


class Observer:
    def __init__(
        self,
        metrics: Metrics | None,
        audit: AuditLog,
        recent: int = 1000,
        tracing: Tracing | None = None,
    ) -> None:
        self.metrics = metrics
        self.audit = audit
        self.tracing = tracing
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        """The latest records, for the admin API's ListAuditEvents."""

    @property
    def wants_responses(self) -> bool:
        """Every answer's status and usage are needed, not only metered ones'.

        Only the audit log asks for that: each answer observed costs two more gRPC
        messages per request (the benchmark's largest cost). Metrics count the answers
        the service sees anyway (metered callers); others are counted as ``forwarded``.
        """
        return self.audit.enabled

    def phase(self, name: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.phase.labels(name).observe(seconds)

    def finish(self, exchange: Exchange) -> None:
        """Report one exchange that is over; called exactly once per exchange."""
        self.report(exchange_record(exchange), exchange.traceparent, exchange.started_ns)

    def report(self, record: dict[str, Any], traceparent: str | None, started_ns: int) -> None:
        """Report a finished exchange by its record (also one settled from its ticket, in a
        process that never held the exchange)."""
        if self.metrics is not None:
            self.metrics.observe(record)
        self.audit.submit(record)
        self.recent.append(record)
        if self.tracing is not None:
            self.tracing.record(record, traceparent, started_ns, time.time_ns())


def null_observer() -> Observer:
    """For tests and tools that run the adapters without telemetry."""
    return Observer(None, AuditLog(()))
