"""Prometheus metrics, named after the OpenTelemetry gen_ai conventions where they exist.

Every exchange updates them from its audit record, so metrics and audit never disagree.
Labels stay low-cardinality: team and model (both bounded by the policy), dialect, status
class, rule and action; never a user or key. With ``--workers N`` the workers write to
``PROMETHEUS_MULTIPROC_DIR`` and the parent's ``/metrics`` adds them up.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
_PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per exchange as the provider reported them (gen_ai.client.token.usage).",
            ["gen_ai_token_type", "gen_ai_request_model", "team"],
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.cost = counter(
            "extproc_cost_micro_usd", "Spend in micro-dollars by team and model.", ["team", "model"]
        )
        self.requests = counter(
            "extproc_requests", "Exchanges by dialect and HTTP status.", ["dialect", "status"]
        )
        self.phase = Histogram(
            "extproc_phase_duration_seconds",
            "The service's own processing time per ext_proc / ext_authz phase.",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=registry,
        )
        self.guardrails = counter(
            "extproc_guardrail_verdicts",
            "Guardrail verdicts by rule and action.",
            ["rule", "action"],
        )
        self.budget_rejections = counter(
            "extproc_budget_rejections", "Requests refused by a budget, by team.", ["team"]
        )
        self.store_errors = counter(
            "extproc_budget_store_errors", "Requests that found the budget store down.", ["mode"]
        )
        self.budget_alerts = counter(
            "extproc_budget_alerts",
            "Budget alert webhook deliveries by outcome: sent, failed (after retries), "
            "dropped (queue full).",
            ["outcome"],
        )
        self.audit_dropped = counter(
            "extproc_audit_dropped",
            "Audit records lost, by reason: queue_full, sink_failed, sink_backlog, "
            "unserialisable, shutdown, closed (a record lost by two sinks counts twice).",
            ["reason"],
        )

    def observe(self, record: dict[str, Any]) -> None:
        """Count one finished exchange from its audit record."""
        team, model = record["team"] or "-", record["model"] or "-"
        self.requests.labels(record["dialect"] or "-", _status(record)).inc()
        if record["input_tokens"] is not None:
            self.token_usage.labels("input", model, team).observe(record["input_tokens"])
            self.token_usage.labels("output", model, team).observe(record["output_tokens"])
            self.cost.labels(team, model).inc(record["cost_micro_usd"])
        if record["error"] == "budget_exceeded":
            self.budget_rejections.labels(team).inc()
        elif record["error"] == "budget_store_unavailable":
            self.store_errors.labels("fail_closed").inc()
        for verdict in record["guardrails"]:
            self.guardrails.labels(verdict["rule"], verdict["action"]).inc()


def _status(record: dict[str, Any]) -> str:
    """The answer's status; ``no_answer`` for an exchange the service read whose caller
    got none (it left first, or the upstream never answered), ``forwarded`` for one it
    never read."""
    if record["status"]:
        return str(record["status"])
    return "forwarded" if record["input_tokens"] is None else "no_answer"
