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

RECENT_BODY_CHARS = 16 * 1024 * 1024
"""What the recent records' recorded bodies may hold, in characters."""
_BODIES = ("prompt", "answer")


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
        self._recent_body_chars: deque[int] = deque(maxlen=recent)
        """The recorded bodies' length in each of them, to bound what they hold."""

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
        self._keep(record)
        if self.tracing is not None:
            self.tracing.record(record, traceparent, started_ns, time.time_ns())

    def _keep(self, record: dict[str, Any]) -> None:
        """Keep ``record`` among the recent ones. With recorded bodies, the oldest go first
        once their texts pass :data:`RECENT_BODY_CHARS` (a thousand long prompts held
        gigabytes); the newest is always kept."""
        body = sum(len(t.get("text", "")) for f in _BODIES for t in record.get(f) or ())
        self.recent.append(record)
        self._recent_body_chars.append(body)
        held = sum(self._recent_body_chars) if body else 0
        while held > RECENT_BODY_CHARS and len(self.recent) > 1:
            self.recent.popleft()
            held -= self._recent_body_chars.popleft()


def null_observer() -> Observer:
    """For tests and tools that run the adapters without telemetry."""
    return Observer(None, AuditLog(()))
