"""Envoy's clusters and canary routes, rendered from the policy's ``upstreams``.

The catalogue says which cluster serves a model; ``upstreams`` says what that cluster
is. Rendering both from one file means a new backend is a policy change only, and an
Envoy config can be checked against the policy it serves (``extproc envoy-config
--check``). Everything else in Envoy's config (listeners, filters, the extproc cluster)
is the base file's: the renderer owns only what it marks, so a re-render replaces its
own output and leaves hand-written clusters alone.

Plain dictionaries, not typed Envoy dataclasses: the output is a handful of fields, and
every rendered config is validated by the real Envoy binary (``envoy --mode validate``)
in the tests, which checks more than a schema can.
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any
from urllib.parse import urlsplit

import yaml

from extproc.policy.schema import Policy, Upstream
from extproc.routing import HEADER_CLUSTER, HEADER_MCP

CATALOGUE_ROUTE = "catalogue"
"""The base's ``cluster_header`` route; canary routes are rendered just before it."""
MCP_ROUTE = "mcp"
"""The base's route for MCP requests (``x-gateway-mcp``); their canary routes go before it."""

MARKER = {"filter_metadata": {"extproc": {"from_policy": True}}}
"""Metadata on every cluster and route the renderer writes: what a re-render replaces."""

OUTLIER_DETECTION = {
    # A backend that keeps failing is ejected for a while, so traffic goes straight to
    # the fail-over target instead of paying a retry on every request.
    "consecutive_5xx": 5,
    "consecutive_gateway_failure": 3,
    "interval": "5s",
    "base_ejection_time": "30s",
    "max_ejection_percent": 100,
}
RETRY_BUDGET = {
    # Retries may add at most a fifth of the active requests (at least 3 at once).
    "thresholds": [
        {"retry_budget": {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 3}}
    ]
}
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class RenderError(ValueError):
    """The base config lacks what the policy's upstreams need."""


def render(policy: Policy, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the policy's upstreams as clusters and canary routes.

    Without upstreams in the policy the base comes back unchanged: its clusters are then
    kept by hand (or by a mesh), as before.
    """
    config = copy.deepcopy(base)
    if not policy.upstreams:
        return config
    resources = config.setdefault("static_resources", {})
    clusters = [c for c in resources.get("clusters", []) if not _rendered(c)]
    names = set(policy.upstreams)
    clusters = [c for c in clusters if c.get("name") not in names]
    for name, upstream in policy.upstreams.items():
        if upstream.url:
            clusters.append(_endpoint_cluster(name, upstream))
        elif upstream.failover:
            clusters.append(_failover_cluster(name, upstream))
    resources["clusters"] = clusters
    _render_split_routes(policy, config)
    return config


def _rendered(resource: dict[str, Any]) -> bool:
    return bool(resource.get("metadata", {}).get("filter_metadata", {}).get("extproc"))


def _endpoint_cluster(name: str, upstream: Upstream) -> dict[str, Any]:
    assert upstream.url is not None
    url = urlsplit(upstream.url)
    host = url.hostname or ""
    tls = url.scheme == "https"
    port = url.port or (443 if tls else 80)
    is_ip = _is_ip(host)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if is_ip else "STRICT_DNS",
        "connect_timeout": f"{upstream.connect_timeout_ms / 1000:g}s",
        "metadata": copy.deepcopy(MARKER),
        "outlier_detection": dict(OUTLIER_DETECTION),
        "circuit_breakers": copy.deepcopy(RETRY_BUDGET),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                # What x-gateway-served-by reports, and the Host header
                                # the route's auto_host_rewrite sends: the DNS name, or
                                # the upstream's name for a bare address.
                                "hostname": name if is_ip else host,
                                "address": {
                                    "socket_address": {"address": host, "port_value": port}
                                },
                            }
                        }
                    ]
                }
            ],
        },
    }
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
                ".UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": SYSTEM_CA_BUNDLE},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": host}}
                        ],
                    }
                },
            },
        }
    return cluster


def _failover_cluster(name: str, upstream: Upstream) -> dict[str, Any]:
    return {
        "name": name,
        "connect_timeout": f"{upstream.connect_timeout_ms / 1000:g}s",
        "metadata": copy.deepcopy(MARKER),
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": list(upstream.failover),
            },
        },
    }


def _render_split_routes(policy: Policy, config: dict[str, Any]) -> None:
    """A weighted route per ``split`` upstream, cloned from the catalogue route.

    The clone keeps the catalogue route's timeout, retries and response headers; it
    matches the one x-gateway-cluster value and drops the retry priority, which only
    means something for an aggregate cluster's priorities.
    """
    splits = {name: u for name, u in policy.upstreams.items() if u.split}
    for host in _virtual_hosts(config):
        routes = [r for r in host.get("routes", []) if not _rendered(r)]
        anchor = next((i for i, r in enumerate(routes) if r.get("name") == CATALOGUE_ROUTE), None)
        if anchor is None:
            host["routes"] = routes
            continue
        rendered = [_split_route(name, u, routes[anchor]) for name, u in splits.items()]
        routes = routes[:anchor] + rendered + routes[anchor:]
        # An MCP server on a split upstream: its own weighted route, cloned from MCP's
        # (no retry once a call may have reached the server), before the MCP route, whose
        # cluster_header would name the split, which is no cluster. Only for the splits
        # an MCP server names: the others get no MCP call to route.
        mcp = next((i for i, r in enumerate(routes) if r.get("name") == MCP_ROUTE), None)
        if mcp is not None:
            served = {server.cluster for server in policy.mcp.servers.values()}
            rendered_mcp = [
                _split_route(name, u, routes[mcp], mcp=True)
                for name, u in splits.items()
                if name in served
            ]
            routes = routes[:mcp] + rendered_mcp + routes[mcp:]
        host["routes"] = routes
        return
    if splits:
        raise RenderError(
            f"the base config has no route named {CATALOGUE_ROUTE!r} (the cluster_header "
            "route) to place the policy's split routes before"
        )


def _split_route(
    name: str, upstream: Upstream, template: dict[str, Any], *, mcp: bool = False
) -> dict[str, Any]:
    """``template`` (the catalogue route, or with ``mcp`` the MCP route) for the split
    upstream ``name``: the model calls to it, or the MCP calls (``x-gateway-mcp``)."""
    route = copy.deepcopy(template)
    route["name"] = f"split-mcp:{name}" if mcp else f"split:{name}"
    route["metadata"] = copy.deepcopy(MARKER)
    route["match"]["headers"] = [
        {"name": HEADER_CLUSTER, "string_match": {"exact": name}},
        {"name": HEADER_MCP, "present_match": True, **({} if mcp else {"invert_match": True})},
    ]
    action = route["route"]
    action.pop("cluster_header", None)
    action.get("retry_policy", {}).pop("retry_priority", None)
    action["weighted_clusters"] = {
        "clusters": [{"name": member, "weight": w} for member, w in upstream.split.items()]
    }
    return route


def has_catalogue_route(config: dict[str, Any]) -> bool:
    """Whether ``config`` routes by the catalogue (the standalone gateway does; a mesh
    sidecar's config, whose clusters are the mesh's, does not)."""
    return any(
        route.get("name") == CATALOGUE_ROUTE
        for host in _virtual_hosts(config)
        for route in host.get("routes", [])
    )


def _virtual_hosts(config: dict[str, Any]) -> list[dict[str, Any]]:
    hosts: list[dict[str, Any]] = []
    for listener in config.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                route_config = network_filter.get("typed_config", {}).get("route_config", {})
                hosts.extend(route_config.get("virtual_hosts", []))
    return hosts


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def render_text(policy: Policy, base_text: str, source: str) -> str:
    """The rendered config as YAML, headed by where it came from."""
    config = render(policy, yaml.safe_load(base_text))
    header = f"# Rendered by `extproc envoy-config` from {source}: edit the policy, not this.\n"
    return header + yaml.safe_dump(config, sort_keys=False, width=100)


def differences(policy: Policy, base: dict[str, Any]) -> list[str]:
    """Which clusters and routes of ``base`` the policy would render differently."""
    rendered = render(policy, base)
    problems: list[str] = []
    before = {c.get("name"): c for c in base.get("static_resources", {}).get("clusters", [])}
    after = {c.get("name"): c for c in rendered["static_resources"].get("clusters", [])}
    for name in sorted(set(before) | set(after), key=str):
        if before.get(name) != after.get(name):
            state = "missing" if name not in before else "stale" if name not in after else "differs"
            problems.append(f"cluster {name}: {state}")
    routes_before = [r for h in _virtual_hosts(base) for r in h.get("routes", [])]
    routes_after = [r for h in _virtual_hosts(rendered) for r in h.get("routes", [])]
    if routes_before != routes_after:
        problems.append("routes: the policy's split routes differ")
    return problems
