"""The admin HTTP port: ``/healthz`` for readiness probes and ``/metrics`` for Prometheus.

Served from the same event loop as the gRPC server (single worker) or from the
supervising parent (``--workers N``); nothing here is on the request path. GET and HEAD
on those two paths; anything else is a 404 or a 405, in JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from extproc import http_server
from extproc.decisions import Headers
from extproc.http_server import Request, Write, frame
from extproc.policy.store import PolicyStore

log = logging.getLogger(__name__)


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


def _error(message: str) -> bytes:
    return orjson.dumps({"error": message})


MAX_REQUEST_BYTES = 64 * 1024
"""A probe or a scrape is a request line and a few headers."""
KEEP_ALIVE_SECONDS = 75.0
"""Idle connections (and requests half-sent for that long) are closed after this."""
_METHODS = ("GET", "HEAD")
_JSON = ("content-type", "application/json")
_UNREADABLE = frame(400, (_JSON,), _error("unreadable or too large HTTP request"))
_FAILED = frame(500, (_JSON,), _error("internal error"))


async def start(
    host: str,
    port: int,
    policies: PolicyStore,
    readiness: Readiness,
    registry: CollectorRegistry,
) -> http_server.Server:
    """Start serving ``registry`` (plus the policy's state); the caller closes the server."""
    registry.register(_PolicyCollector(policies))

    async def healthz() -> tuple[int, str, bytes]:
        state = await readiness()
        status = {
            **state,
            "policy_version": policies.current.version,
            "policy_path": str(policies.path),
        }
        return 200 if state.get("ready") else 503, "application/json", orjson.dumps(status)

    async def metrics() -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)

    routes = {"/healthz": healthz, "/metrics": metrics}

    async def respond(request: Request, write: Write) -> None:
        """The server leaves a HEAD answer's body out."""
        route = routes.get(request.headers.get(":path", "").partition("?")[0])
        headers: Headers = ()
        if route is None:
            status, content_type, body = 404, _JSON[1], _error("not found")
        elif request.headers[":method"] not in _METHODS:
            status, content_type, body = 405, _JSON[1], _error("use GET or HEAD")
            headers = (("allow", ", ".join(_METHODS)),)
        else:
            try:
                status, content_type, body = await route()
            except Exception:
                log.exception("answering %s failed", request.headers.get(":path"))
                write(_FAILED)
                return
        write(frame(status, (("content-type", content_type), *headers), body))

    server = http_server.Server(
        respond,
        unreadable=_UNREADABLE,
        failed=_FAILED,
        max_request_bytes=MAX_REQUEST_BYTES,
        idle_seconds=KEEP_ALIVE_SECONDS,
    )
    await server.start(host, port, reuse_port=False)
    return server
