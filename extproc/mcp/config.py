"""The policy's MCP vocabulary: which MCP servers exist, and who may use what on them.

Two models are meant to be embedded in the policy file (``extproc/policy/schema.py``):

- :class:`McpConfig` at the top level (``mcp: {servers: {...}}``): each MCP server the
  gateway fronts, by name, with the Envoy cluster that serves it and the path clients use.
- :class:`McpAccess` inside team, user and key entries (``mcp: {...}``): allow/deny globs
  over tool names, resource URIs and prompt names, plus an optional server filter.

The semantics copy model access so a policy author learns them once: deny wins over allow;
a team without an ``allow`` list for a category may use nothing in it; a user's or key's
rules only narrow what the team (and user) already grant. Tool, resource and prompt
catalogues live on the MCP servers and change without the policy changing, so globs are
compiled to regular expressions (:mod:`extproc.mcp.access`) rather than expanded against a
finite list at load time as models are.

This module deliberately imports nothing from :mod:`extproc.policy`: the policy schema
imports it, and a cycle would make either unusable on its own.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$"

ServerName = Annotated[str, Field(pattern=_NAME, description="Letters, digits and . _ : @ / -")]

Glob = Annotated[
    str,
    Field(
        min_length=1,
        max_length=512,
        description="Shell-style glob: * matches any run of characters (including / and .), "
        "? one character, [abc] a set.",
    ),
]


class _Strict(BaseModel):
    # Same contract as the rest of the policy: a typo is an error, never an ignored rule.
    model_config = ConfigDict(extra="forbid", frozen=True)


class McpGlobs(_Strict):
    """Allow and deny globs for one category (tools, resources, prompts or servers).

    ``deny`` wins over ``allow``. In a user's or key's entry an empty ``allow`` keeps
    everything inherited and only applies ``deny``.
    """

    allow: list[Glob] = Field(default_factory=list)
    deny: list[Glob] = Field(default_factory=list)


class McpAccess(_Strict):
    """What a team, user or key may use on the gateway's MCP servers.

    Globs match tool names (``github.*``, ``jira.create_issue``), resource URIs
    (``docs://*``) and prompt names as the servers announce them. A category left out of
    a team's entry grants nothing; left out of a user's or key's entry it inherits the
    team's (and user's) rules unchanged.
    """

    servers: McpGlobs | None = Field(
        default=None,
        description="MCP servers (names under mcp.servers) this principal may reach at all. "
        "Omitted: every server for a team, the inherited set for a user or key.",
    )
    tools: McpGlobs | None = Field(
        default=None, description="Tools that may be called (tools/call) and listed."
    )
    resources: McpGlobs | None = Field(
        default=None,
        description="Resources that may be read or subscribed to, by URI; resource "
        "templates are listed when their URI template matches.",
    )
    prompts: McpGlobs | None = Field(
        default=None, description="Prompts that may be fetched (prompts/get) and listed."
    )


class McpServer(_Strict):
    """One MCP server behind the gateway, spoken to over Streamable HTTP.

    Requests to ``path`` on the gateway are read as MCP (JSON-RPC over HTTP POST) and
    routed to ``cluster``; the path is forwarded unchanged (an Envoy route may rewrite it
    if the server listens elsewhere).
    """

    cluster: ServerName = Field(description="The Envoy cluster that serves this MCP server.")
    path: str = Field(
        pattern=r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$",
        max_length=256,
        description="The MCP endpoint's path on the gateway, e.g. /mcp or /mcp/github.",
    )
    description: str = ""
    unknown_methods: Literal["reject", "forward"] = Field(
        default="reject",
        description="JSON-RPC methods the gateway does not know (neither MCP's nor "
        "notifications): answer 'method not found' (reject, the default: nothing the "
        "policy cannot judge reaches the server) or forward them.",
    )


class McpConfig(_Strict):
    """The policy's top-level ``mcp:`` section."""

    servers: dict[ServerName, McpServer] = Field(
        default_factory=dict, description="MCP servers the gateway fronts, by name."
    )

    @model_validator(mode="after")
    def _distinct_paths(self) -> McpConfig:
        owners: dict[str, str] = {}
        problems: list[str] = []
        for name, server in self.servers.items():
            path = normal_path(server.path)
            if path in owners:
                problems.append(
                    f"mcp.servers.{name}.path: {server.path!r} is already "
                    f"mcp.servers.{owners[path]}'s path"
                )
            owners[path] = name
        if problems:
            raise ValueError("; ".join(problems))
        return self


def normal_path(path: str) -> str:
    """``/mcp/`` and ``/mcp`` are the same endpoint to a client."""
    return path.rstrip("/") or "/"
