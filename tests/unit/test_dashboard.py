"""Every metric the shipped Grafana dashboard queries is one the service exports."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry, generate_latest

from extproc.stack import ROOT
from extproc.telemetry.metrics import Metrics

DASHBOARDS = sorted((ROOT / "deploy" / "observability" / "grafana" / "dashboards").glob("*.json"))
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "or", "le", "and", "without"}


def exported_series() -> set[str]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.observe(
        {
            "team": "t",
            "model": "m",
            "dialect": "openai.chat",
            "status": 200,
            "input_tokens": 3,
            "output_tokens": 4,
            "cost_micro_usd": 5,
            "error": None,
            "guardrails": [{"rule": "r", "action": "rewritten"}],
        }
    )
    metrics.phase.labels("request_headers").observe(0.0001)
    metrics.budget_rejections.labels("t").inc()
    metrics.store_errors.labels("fail_closed").inc()
    metrics.audit_dropped.labels("queue_full").inc()
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
