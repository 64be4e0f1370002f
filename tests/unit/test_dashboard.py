"""Every metric the shipped Grafana dashboard queries is one the service exports."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry, generate_latest

from extproc.stack import ROOT
from extproc.telemetry.metrics import Metrics

DASHBOARDS = sorted((ROOT / "deploy" / "observability" / "grafana" / "dashboards").glob("*.json"))
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "or", "le", "and", "without"}


ANSWERED: dict[str, object] = {
    "team": "t",
    "model": "m",
    "dialect": "openai.chat",
    "status": 200,
    "input_tokens": 3,
    "output_tokens": 4,
    "cost_micro_usd": 5,
    "error": None,
    "guardrails": [],
}
"""One exchange's audit record, as much of it as the metrics read."""


def exported_series() -> set[str]:
    """The series the service exports, produced the way the service produces them."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    answered = {**ANSWERED, "guardrails": [{"rule": "r", "action": "rewritten"}]}
    refused = {**answered, "status": 429, "input_tokens": None, "guardrails": []}
    metrics.observe(answered)
    metrics.observe({**refused, "error": "budget_exceeded"})
    metrics.observe({**refused, "status": 503, "error": "budget_store_unavailable"})
    metrics.phase.labels("request_headers").observe(0.0001)
    metrics.audit_dropped.labels("queue_full").inc()
    metrics.budget_alerts.labels("sent").inc()
    assert registry.get_sample_value("extproc_budget_rejections_total", {"team": "t"}) == 1
    assert (
        registry.get_sample_value("extproc_budget_store_errors_total", {"mode": "fail_closed"}) == 1
    )
    text = generate_latest(registry).decode()
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")
    }


def queried_series(dashboard: dict[str, object]) -> set[str]:
    names: set[str] = set()
    for panel in dashboard["panels"]:  # type: ignore[attr-defined]
        for target in panel["targets"]:
            expr = re.sub(r"\{[^}]*\}|\([a-z_, ]*\)|\[[^\]]*\]", " ", target["expr"])
            names |= {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if "_" in w}
    return names - PROMQL_WORDS


def test_there_is_a_dashboard() -> None:
    assert DASHBOARDS


def test_dashboard_queries_only_exported_metrics() -> None:
    exported = exported_series()
    for path in DASHBOARDS:
        queried = queried_series(json.loads(path.read_text()))
        assert queried, path
        assert queried <= exported, f"{path.name}: not exported: {sorted(queried - exported)}"


def test_an_exchange_whose_caller_got_no_answer_is_not_counted_as_forwarded() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    read = {**ANSWERED, "status": 0}  # the caller left before the answer
    metrics.observe(read)
    metrics.observe({**read, "input_tokens": None})  # never read: only forwarded

    def count(status: str) -> float | None:
        labels = {"dialect": "openai.chat", "status": status}
        return registry.get_sample_value("extproc_requests_total", labels)

    assert (count("no_answer"), count("forwarded")) == (1, 1)
