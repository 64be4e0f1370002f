"""The admin HTTP port: ``/healthz`` for readiness probes and ``/metrics`` for Prometheus.

Served from the same event loop as the gRPC server (single worker) or from the
supervising parent (``--workers N``); nothing here is on the request path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from extproc.policy.store import PolicyStore


class _PolicyCollector(Collector):
    """Reads the policy store's state at scrape time instead of mirroring it in gauges."""

    def __init__(self, policies: PolicyStore) -> None:
        self._policies = policies

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        info = GaugeMetricFamily(
            "extproc_policy_info", "The live policy version.", labels=["version"]
        )
        info.add_metric([self._policies.current.version], 1)
        yield info
        reloads = CounterMetricFamily(
            "extproc_policy_reloads", "Policy reloads by result.", labels=["result"]
        )
        reloads.add_metric(["ok"], self._policies.reloads_ok)
        reloads.add_metric(["rejected"], self._policies.reloads_failed)
        yield reloads


Readiness = Callable[[], Awaitable[dict[str, object]]]
"""Returns the serving state; its ``ready`` entry decides the status code of /healthz."""


async def start(
    host: str,
    port: int,
    policies: PolicyStore,
    readiness: Readiness,
    registry: CollectorRegistry,
) -> web.AppRunner:
    """Start serving ``registry`` (plus the policy's state); the caller owns the runner."""
    registry.register(_PolicyCollector(policies))

    async def healthz(_: web.Request) -> web.Response:
        state = await readiness()
        status = {
            **state,
            "policy_version": policies.current.version,
            "policy_path": str(policies.path),
        }
        return web.Response(
            body=orjson.dumps(status),
            status=200 if state.get("ready") else 503,
            content_type="application/json",
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner
