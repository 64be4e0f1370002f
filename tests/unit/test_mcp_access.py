"""MCP policy models and compiled permissions: globs, deny wins, narrowing, servers."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from extproc.mcp.access import NO_ACCESS, Kind, compile_access, compile_registry
from extproc.mcp.config import McpAccess, McpConfig

TEAM = {
    "tools": {"allow": ["github.*", "weather.get"], "deny": ["github.create_issue"]},
    "resources": {"allow": ["docs://*"]},
    "prompts": {"allow": ["triage_*"]},
}


def access(data: dict[str, Any] | None) -> McpAccess | None:
    return None if data is None else McpAccess.model_validate(data)


@pytest.mark.parametrize(
    ("team", "user", "key", "kind", "name", "allowed"),
    [
        pytest.param(TEAM, None, None, Kind.TOOL, "github.search_issues", True, id="team-glob"),
        pytest.param(TEAM, None, None, Kind.TOOL, "weather.get", True, id="team-exact"),
        pytest.param(
            TEAM, None, None, Kind.TOOL, "weather.get_forecast", False, id="exact-is-exact"
        ),
        pytest.param(TEAM, None, None, Kind.TOOL, "github.create_issue", False, id="deny-wins"),
        pytest.param(TEAM, None, None, Kind.TOOL, "jira.create_issue", False, id="not-allowed"),
        pytest.param(
            TEAM, None, None, Kind.TOOL, "GITHUB.search_issues", False, id="case-sensitive"
        ),
        pytest.param(
            TEAM,
            None,
            None,
            Kind.RESOURCE,
            "docs://demo/readme",
            True,
            id="uri-glob-crosses-slashes",
        ),
        pytest.param(
            TEAM, None, None, Kind.RESOURCE, "secrets://demo/key", False, id="uri-not-allowed"
        ),
        pytest.param(TEAM, None, None, Kind.PROMPT, "triage_issue", True, id="prompt-glob"),
        pytest.param(
            {"tools": {"allow": ["*"]}},
            None,
            None,
            Kind.PROMPT,
            "triage_issue",
            False,
            id="category-without-rules-grants-nothing",
        ),
        pytest.param({}, None, None, Kind.TOOL, "weather.get", False, id="empty-team-entry"),
        pytest.param(None, None, None, Kind.TOOL, "weather.get", False, id="no-team-entry"),
        pytest.param(
            {"tools": {"deny": ["x"]}},
            None,
            None,
            Kind.TOOL,
            "weather.get",
            False,
            id="team-deny-only-grants-nothing",
        ),
        pytest.param(
            TEAM,
            {"tools": {"deny": ["weather.*"]}},
            None,
            Kind.TOOL,
            "weather.get",
            False,
            id="user-deny-narrows",
        ),
        pytest.param(
            TEAM,
            {"tools": {"deny": ["weather.*"]}},
            None,
            Kind.TOOL,
            "github.search_issues",
            True,
            id="user-deny-only-keeps-rest",
        ),
        pytest.param(
            TEAM,
            {"tools": {"allow": ["*"]}},
            None,
            Kind.TOOL,
            "jira.search",
            False,
            id="user-cannot-widen",
        ),
        pytest.param(
            TEAM,
            {"tools": {"allow": ["*"]}},
            None,
            Kind.TOOL,
            "github.create_issue",
            False,
            id="user-cannot-undo-team-deny",
        ),
        pytest.param(
            TEAM,
            None,
            {"tools": {"allow": ["weather.*"]}},
            Kind.TOOL,
            "github.search_issues",
            False,
            id="key-allow-narrows",
        ),
        pytest.param(
            TEAM,
            None,
            {"tools": {"allow": ["weather.*"]}},
            Kind.TOOL,
            "weather.get",
            True,
            id="key-allow-keeps-overlap",
        ),
        pytest.param(
            TEAM,
            {"tools": {"allow": ["github.*"]}},
            {"tools": {"allow": ["weather.*"]}},
            Kind.TOOL,
            "weather.get",
            False,
            id="user-and-key-both-narrow",
        ),
        pytest.param(
            TEAM,
            None,
            {"resources": {"deny": ["docs://demo/*"]}},
            Kind.RESOURCE,
            "docs://demo/readme",
            False,
            id="key-denies-resource",
        ),
        pytest.param(
            TEAM,
            None,
            {"tools": {"deny": ["*"]}},
            Kind.PROMPT,
            "triage_issue",
            True,
            id="key-rule-touches-its-category-only",
        ),
    ],
)
def test_permissions(
    team: dict[str, Any] | None,
    user: dict[str, Any] | None,
    key: dict[str, Any] | None,
    kind: Kind,
    name: str,
    allowed: bool,
) -> None:
    permissions = compile_access(access(team), access(user), access(key))
    assert permissions.permits(kind, name) is allowed
    assert permissions.permits(kind, name) is allowed  # memoised answer is the same


@pytest.mark.parametrize(
    ("team", "key", "server", "allowed"),
    [
        pytest.param(None, None, "demo", False, id="no-mcp-entry-no-server"),
        pytest.param({}, None, "demo", True, id="entry-without-servers-rule-every-server"),
        pytest.param(
            {"servers": {"allow": ["demo"]}}, None, "github", False, id="team-servers-allow"
        ),
        pytest.param(
            {"servers": {"allow": ["*"], "deny": ["prod-*"]}},
            None,
            "prod-db",
            False,
            id="servers-deny-wins",
        ),
        pytest.param({}, {"servers": {"deny": ["demo"]}}, "demo", False, id="key-narrows-servers"),
        pytest.param(
            {"servers": {"allow": ["demo"]}},
            {"servers": {"allow": ["*"]}},
            "github",
            False,
            id="key-cannot-widen-servers",
        ),
    ],
)
def test_server_permissions(
    team: dict[str, Any] | None, key: dict[str, Any] | None, server: str, allowed: bool
) -> None:
    assert compile_access(access(team), access(key)).may_use_server(server) is allowed


def test_no_access_reaches_nothing() -> None:
    assert not NO_ACCESS.may_use_server("demo")
    assert not NO_ACCESS.permits(Kind.TOOL, "weather.get")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        pytest.param({"tools": {"alow": ["*"]}}, "alow", id="typo-is-an-error"),
        pytest.param({"tool": {"allow": ["*"]}}, "tool", id="unknown-category"),
        pytest.param({"tools": {"allow": [""]}}, "at least 1 character", id="empty-glob"),
    ],
)
def test_access_schema_is_strict(data: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        McpAccess.model_validate(data)


def test_config_and_registry() -> None:
    config = McpConfig.model_validate(
        {
            "servers": {
                "demo": {"cluster": "mcp_demo", "path": "/mcp"},
                "github": {
                    "cluster": "mcp_github",
                    "path": "/mcp/github/",
                    "unknown_methods": "forward",
                },
            }
        }
    )
    registry = compile_registry(config)
    assert registry.for_path("/mcp").name == "demo"  # type: ignore[union-attr]
    assert registry.for_path("/mcp/?x=1").name == "demo"  # type: ignore[union-attr]
    assert registry.for_path("/mcp/github").cluster == "mcp_github"  # type: ignore[union-attr]
    assert registry.for_path("/mcp/github").unknown_methods == "forward"  # type: ignore[union-attr]
    assert registry.for_path("/v1/chat/completions") is None
    assert compile_registry(None).for_path("/mcp") is None


@pytest.mark.parametrize(
    ("servers", "error"),
    [
        pytest.param(
            {"a": {"cluster": "c", "path": "/mcp"}, "b": {"cluster": "c", "path": "/mcp/"}},
            "already",
            id="same-path",
        ),
        pytest.param({"a": {"cluster": "c", "path": "mcp"}}, "pattern", id="relative-path"),
        pytest.param(
            {"a": {"cluster": "c", "path": "/mcp", "url": "x"}}, "url", id="unknown-field"
        ),
        pytest.param(
            {"a": {"cluster": "c", "path": "/mcp", "unknown_methods": "allow"}},
            "reject",
            id="bad-literal",
        ),
        pytest.param(
            {"bad name": {"cluster": "c", "path": "/mcp"}}, "pattern", id="bad-server-name"
        ),
    ],
)
def test_config_errors(servers: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        McpConfig.model_validate({"servers": servers})
