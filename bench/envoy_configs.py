"""Envoy configs for the benchmark, all derived from what ships (``envoy/gateway.yaml``).

* :func:`gateway` - the shipped gateway pointed at the benchmark upstream, optionally without
  the filters that call the service (``ext_authz`` and the ``ext_proc`` behind it; scenario 1:
  what Envoy alone costs) and with a ``/passthrough/``
  route that strips that prefix (scenario 2: a path no dialect serves, so the service sees
  only the request headers while the upstream still gets ``/v1/chat/completions``).
* :func:`upstream` - a second Envoy whose one listener answers every request itself with a
  ``direct_response``: the fixed JSON completion, or the 50-chunk SSE stream when the request
  carries ``x-bench-answer: sse``, once it has read the request's body, so that the
  connection stays open for the next request as a provider's does. Envoy answers in C++,
  so the upstream is never the bottleneck (see bench/README.md for the measurement that
  chose it over our aiohttp mock).

Only ports and the pieces named above change; everything else (access log, local replies,
buffer limits, timeouts, health checks) stays as shipped, so the scenarios differ only in
what they mean to measure.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import yaml

from bench import payloads
from extproc.stack import GATEWAY_CONFIG

SERVICE_FILTERS = ("envoy.filters.http.ext_authz", "ext-proc-when-handed-over")
"""The filters that call the service: the HTTP authorizer, and ext_proc behind it."""
UPSTREAM_CLUSTER = "llm_default"

Config = dict[str, Any]


def shipped_gateway() -> Config:
    loaded = yaml.safe_load(GATEWAY_CONFIG.read_text())
    assert isinstance(loaded, dict)
    return loaded


def gateway(upstream_port: int, *, ext_proc: bool = True, passthrough_route: bool = False) -> str:
    """The shipped gateway config, re-pointed and trimmed as described in the module doc."""
    config = copy.deepcopy(shipped_gateway())
    _point_cluster(config, UPSTREAM_CLUSTER, upstream_port)
    hcm = _connection_manager(config)
    routes: list[Config] = hcm["route_config"]["virtual_hosts"][0]["routes"]
    if not ext_proc:
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in SERVICE_FILTERS]
        for route in routes:
            per_filter = route.get("typed_per_filter_config", {})
            for name in SERVICE_FILTERS:
                per_filter.pop(name, None)
            if not per_filter:
                route.pop("typed_per_filter_config", None)
    if passthrough_route:
        catch_all = routes[-1]
        routes.insert(
            len(routes) - 1,
            {
                "match": {"prefix": payloads.PASSTHROUGH_PREFIX + "/"},
                "route": {**catch_all["route"], "prefix_rewrite": "/"},
            },
        )
    return yaml.safe_dump(config, sort_keys=False)


def upstream(port: int, admin_port: int) -> str:
    """A stand-alone Envoy answering chat completions with fixed bodies (direct_response)."""

    def answer(body: bytes, content_type: str) -> Config:
        return {
            # Bytes (base64), not a string: Envoy's YAML parser dropped the SSE body's last
            # line break from the string PyYAML wrote, so its final event was never ended.
            "direct_response": {
                "status": 200,
                "body": {"inline_bytes": base64.b64encode(body).decode()},
            },
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": content_type},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }

    sse_match = {
        "prefix": "/",
        "headers": [
            {"name": payloads.ANSWER_HEADER, "string_match": {"exact": "sse"}},
        ],
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "upstream",
        "codec_type": "AUTO",
        "route_config": {
            "name": "answers",
            "max_direct_response_body_size_bytes": 1024 * 1024,
            "virtual_hosts": [
                {
                    "name": "answers",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": sse_match,
                            **answer(payloads.sse_answer(), "text/event-stream"),
                        },
                        {
                            "match": {"prefix": "/"},
                            **answer(payloads.json_answer(), "application/json"),
                        },
                    ],
                }
            ],
        },
        "http_filters": [
            # A direct_response sent before the request's body has arrived ends the
            # connection ("connection: close"): without this the gateway opened a new
            # upstream connection for every request (socket, connect, close on the measured
            # core), which no keep-alive provider makes it do.
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": 1024 * 1024,
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    config = {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "upstream",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }
    return yaml.safe_dump(config, sort_keys=False)


def _connection_manager(config: Config) -> Config:
    listener = config["static_resources"]["listeners"][0]
    typed: Config = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def _point_cluster(config: Config, name: str, port: int) -> None:
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == name:
            for group in cluster["load_assignment"]["endpoints"]:
                for endpoint in group["lb_endpoints"]:
                    endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
            return
    raise KeyError(f"cluster {name!r} not in {GATEWAY_CONFIG}")
