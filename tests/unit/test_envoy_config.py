"""Envoy clusters and canary routes rendered from the policy's upstreams."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.envoy_config import RenderError, differences, render
from extproc.policy.loader import PolicyError, parse_policy
from extproc.policy.schema import Policy
from extproc.stack import GATEWAY_CONFIG, ROOT

EXAMPLE = ROOT / "policies" / "example.yaml"


def gateway() -> dict[str, Any]:
    return dict(yaml.safe_load(GATEWAY_CONFIG.read_text()))


def policy(text: str) -> Policy:
    return parse_policy("teams: { t: {} }\n" + text)


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return list(manager["route_config"]["virtual_hosts"][0]["routes"])


def test_shipped_gateway_config_is_the_example_policys_rendering() -> None:
    """envoy/gateway.yaml keeps its comments, but its upstream parts are the policy's."""
    example = parse_policy(EXAMPLE.read_text())
    assert differences(example, gateway()) == []
    assert render(example, gateway()) == gateway()


def test_cli_check_reports_a_drifted_config(tmp_path: Path) -> None:
    drifted = tmp_path / "gateway.yaml"
    drifted.write_text(GATEWAY_CONFIG.read_text().replace("port_value: 8098", "port_value: 8096"))
    check = [sys.executable, "-m", "extproc", "envoy-config", str(EXAMPLE), "--check"]
    ok = subprocess.run(check, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*check, "--base", str(drifted)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "cluster openai_secondary: differs" in bad.stderr
    assert "cluster anthropic: differs" in bad.stderr


def test_without_upstreams_the_base_is_untouched() -> None:
    assert render(policy(""), gateway()) == gateway()


def test_endpoint_kinds() -> None:
    rendered = clusters(
        render(
            policy(
                "upstreams:\n"
                '  api: { url: "https://api.example.com" }\n'
                '  vllm: { url: "http://vllm.internal:8000", connect_timeout_ms: 250 }\n'
                '  local: { url: "http://10.0.0.5:11434" }\n'
            ),
            gateway(),
        )
    )
    api = rendered["api"]
    assert api["type"] == "STRICT_DNS"
    endpoint = api["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {
        "address": "api.example.com",
        "port_value": 443,
    }
    assert endpoint["hostname"] == "api.example.com"  # Host header and served_by
    tls = api["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.example.com"
    sans = tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert sans == [{"san_type": "DNS", "matcher": {"exact": "api.example.com"}}]
    assert rendered["vllm"]["connect_timeout"] == "0.25s"
    assert "transport_socket" not in rendered["vllm"]
    local = rendered["local"]
    assert local["type"] == "STATIC"
    local_endpoint = local["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert local_endpoint["hostname"] == "local"  # a bare address is reported by name
    assert {"outlier_detection", "circuit_breakers"} <= set(local)


def test_rerendering_replaces_the_previous_rendering_and_keeps_hand_written_clusters() -> None:
    moved = policy(
        "upstreams:\n"
        '  only: { url: "http://127.0.0.1:9000" }\n'
        "  canary: { split: { only: 1 } }\n"
        "models:\n  m: { backend: { cluster: only } }\n"
    )
    rendered = render(moved, gateway())
    names = set(clusters(rendered))
    # The example's upstreams are gone.
    assert names == {"extproc", "extproc_authz", "llm_default", "only"}
    route_names = [r.get("name") for r in routes(rendered)]
    assert "split:openai-canary" not in route_names
    assert route_names.index("split:canary") == route_names.index("catalogue") - 1
    assert render(moved, rendered) == rendered


SPLIT_AB = (
    "upstreams:\n"
    '  a: { url: "http://127.0.0.1:9000" }\n'
    '  b: { url: "http://127.0.0.1:9001" }\n'
    "  ab: { split: { a: 3, b: 1 } }\n"
)
"""Two upstreams and a split between them, 3 to 1."""


def test_split_route_is_the_catalogue_route_with_weights() -> None:
    rendered = render(policy(SPLIT_AB), gateway())
    split = next(r for r in routes(rendered) if r.get("name") == "split:ab")
    catalogue = next(r for r in routes(rendered) if r.get("name") == "catalogue")
    assert split["match"]["headers"] == [
        {"name": "x-gateway-cluster", "string_match": {"exact": "ab"}},
        {"name": "x-gateway-mcp", "present_match": True, "invert_match": True},
    ]
    assert split["route"]["weighted_clusters"]["clusters"] == [
        {"name": "a", "weight": 3},
        {"name": "b", "weight": 1},
    ]
    assert split["route"]["timeout"] == catalogue["route"]["timeout"]
    assert "retry_priority" not in split["route"]["retry_policy"]
    assert split["response_headers_to_add"] == catalogue["response_headers_to_add"]


def test_a_split_no_mcp_server_names_gets_no_mcp_route() -> None:
    """Its MCP route would never be taken: the split's model route is all it needs."""
    names = [r.get("name") for r in routes(render(policy(SPLIT_AB), gateway()))]
    assert "split:ab" in names and not any(str(n).startswith("split-mcp:") for n in names)


def test_an_mcp_server_on_a_split_upstream_is_retried_as_mcp() -> None:
    """MCP's route names its backend by cluster_header, and a split is no cluster: the
    split's MCP calls get a weighted route of MCP's kind before it (they took the split's
    model route, retried on a 5xx after which a tool call may have run)."""
    mcp_on_ab = "mcp:\n  servers:\n    tools: { cluster: ab, path: /mcp/tools }\n"
    rendered = render(policy(SPLIT_AB + mcp_on_ab), gateway())
    names = [r.get("name") for r in routes(rendered)]
    assert names.index("split-mcp:ab") == names.index("mcp") - 1
    split_mcp = routes(rendered)[names.index("split-mcp:ab")]
    mcp = routes(rendered)[names.index("mcp")]
    assert split_mcp["match"]["headers"] == [
        {"name": "x-gateway-cluster", "string_match": {"exact": "ab"}},
        {"name": "x-gateway-mcp", "present_match": True},
    ]
    assert (
        split_mcp["route"]["retry_policy"]["retry_on"] == mcp["route"]["retry_policy"]["retry_on"]
    )
    assert split_mcp["route"]["weighted_clusters"]["clusters"] == [
        {"name": "a", "weight": 3},
        {"name": "b", "weight": 1},
    ]
    assert "cluster_header" not in split_mcp["route"]


def test_split_needs_the_catalogue_route() -> None:
    base = gateway()
    for route in routes(base):
        route.pop("name", None)
    with pytest.raises(RenderError, match="catalogue"):
        render(policy('upstreams:\n  a: { url: "http://h:1" }\n  s: { split: { a: 1 } }\n'), base)


def test_render_does_not_change_its_input() -> None:
    base = gateway()
    before = copy.deepcopy(base)
    render(policy('upstreams:\n  a: { url: "http://h:1" }\n'), base)
    assert base == before


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('upstreams:\n  a: { url: "http://h:1", failover: [b] }\n', "exactly one of"),
        ("upstreams:\n  a: {}\n", "exactly one of"),
        ('upstreams:\n  a: { url: "http://h:1/v1" }\n', "upstreams.a.url"),
        ('upstreams:\n  a: { url: "ftp://h" }\n', "upstreams.a.url"),
        ("upstreams:\n  a: { failover: [nowhere] }\n", "'nowhere' is not an upstream with a url"),
        (
            'upstreams:\n  a: { url: "http://h:1" }\n  b: { failover: [a] }\n'
            "  c: { split: { b: 1 } }\n",
            "'b' is not an upstream with a url",
        ),
        (
            'upstreams:\n  a: { url: "http://h:1" }\nmodels:\n  m: { backend: { cluster: typo } }\n',
            "models.m.backend.cluster: 'typo' is not one of the policy's upstreams",
        ),
        (
            'upstreams:\n  a: { url: "http://h:1" }\n'
            "mcp:\n  servers:\n    s: { cluster: typo, path: /mcp }\n",
            "mcp.servers.s.cluster: 'typo' is not one of the policy's upstreams",
        ),
    ],
)
def test_invalid_upstreams_are_named(text: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as caught:
        policy(text)
    assert fragment in str(caught.value)


def test_without_upstreams_backend_clusters_are_not_checked() -> None:
    """A mesh keeps its clusters itself: the policy cannot know their names."""
    assert policy("models:\n  m: { backend: { cluster: elsewhere } }\n").models["m"].backend
