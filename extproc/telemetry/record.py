"""The audit record of one exchange: who, what, how it ended, what it cost.

Built from the exchange's typed state once it is over. It never holds a gateway key (only
the key's id), a prompt or an answer, and guardrail verdicts carry entity types and counts,
never matched values: the record can be shipped anywhere.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from extproc.exchange import Exchange


def exchange_record(exchange: Exchange) -> dict[str, Any]:
    principal, request, model = exchange.principal, exchange.request, exchange.model
    used = exchange.used
    reservation = exchange.reservation
    if exchange.error_code == "budget_exceeded":
        budget = "rejected"
    elif reservation is None:
        budget = "none"
    else:
        budget = "clamped" if reservation.output_cap is not None else "reserved"
    return {
        "request_id": exchange.request_id,
        "trace_id": exchange.trace_id,
        "time": record_time(),
        "key_id": principal.key_id if principal else None,
        "identity": principal.source if principal else None,
        "user": principal.user if principal else None,
        "team": principal.team if principal else None,
        "method": exchange.method,
        "path": _bounded(exchange.path.partition("?")[0], MAX_PATH_CHARS),
        "dialect": request.dialect if request else None,
        "model_requested": request.model if request else None,
        "model": model.name if model else None,
        "backend": model.backend.cluster if model and model.backend else None,
        "served_by": exchange.served_by,
        "stream": request.stream if request else None,
        "status": exchange.status or None,
        "error": exchange.error_code,
        "input_tokens": used.input_tokens if used else None,
        "output_tokens": used.output_tokens if used else None,
        "cost_micro_usd": used.micro_usd if used else None,
        "usage_source": exchange.usage_source if used else None,
        "budget": budget,
        "guardrails": list(exchange.verdicts),
        "mcp": [
            {
                "server": c.server,
                "method": _bounded(c.method, MAX_NAME_CHARS),
                "name": _bounded(c.name, MAX_NAME_CHARS),
                "verdict": c.verdict.value,
            }
            for c in exchange.mcp_calls
        ]
        or None,
        "policy_version": exchange.policy.version,
        **({"prompt": exchange.recorded_prompt} if exchange.recorded_prompt is not None else {}),
        **({"answer": exchange.recorded_answer} if exchange.recorded_answer is not None else {}),
        "durations_ms": {p: round(s * 1000, 3) for p, s in exchange.durations.items()},
    }


MAX_PATH_CHARS = 2048
MAX_NAME_CHARS = 256
"""Caller-sent strings in a record are bounded: records are kept (the recent ones in
memory, the audit queue, the Redis stream), and a caller could otherwise pin megabytes
with each request."""


def _bounded(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[: limit - 1] + "…"


def record_time() -> str:
    """Now, as the record's ``time`` (UTC, milliseconds)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
