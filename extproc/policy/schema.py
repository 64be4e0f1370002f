"""The policy file format: pydantic models, validated strictly.

A policy is data written by a platform team. Every model forbids unknown fields, so a
typo (``allwo:``) is an error with its path rather than a rule silently ignored, and
cross-references (a key's team, a model alias) are checked before the policy can go live.
The JSON Schema shipped in ``policies/policy.schema.json`` is generated from these models.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from extproc.guardrails.config import GuardrailRule, GuardrailSettings, guardrail_problems
from extproc.mcp.config import McpAccess, McpConfig

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$"
_HEADER_SAFE = re.compile(_NAME)
NAME_PATTERN = _HEADER_SAFE
"""What a team, user or key id may be (they travel in headers)."""

Name = Annotated[str, Field(pattern=_NAME, description="Letters, digits and . _ : @ / -")]


def _lower_hex(value: str) -> str:
    return value.lower()


Sha256Hex = Annotated[
    str,
    Field(pattern=r"^[0-9a-fA-F]{64}$", description="SHA-256 of the key, 64 hex digits"),
    AfterValidator(_lower_hex),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelAccess(_Strict):
    """Which catalogue models a team, user or key may call.

    Patterns are shell-style globs (``gpt-4o*``, ``claude-*``) matched against the
    catalogue's canonical model names; ``deny`` wins over ``allow``.
    """

    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)


class Limit(_Strict):
    """One budget: at most ``limit`` of ``unit`` per ``window`` for the scope it sits in.

    Tokens and cost are reserved before the call (prompt tokens plus the output cap) and
    reconciled with the provider's reported usage after it.
    """

    unit: Literal["requests", "input_tokens", "output_tokens", "total_tokens", "usd"]
    window: Literal["minute", "hour", "day", "month"] = Field(
        description="minute/hour/day windows start on the UTC boundary; month is the "
        "calendar month in UTC."
    )
    limit: Decimal = Field(gt=0, description="A whole number, or US dollars for unit usd.")
    per_model: bool = Field(
        default=False, description="Keep a separate counter for each model (or each tool)."
    )
    models: list[str] | None = Field(
        default=None, description="Globs: only these models count against this limit."
    )
    tools: list[str] | None = Field(
        default=None,
        description="Globs over MCP tool names (`jira.*`): a requests limit on tool calls "
        "instead of model calls, counted per MCP server.",
    )
    alerts: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=list,
        description="Percentages of the limit (e.g. [50, 80, 100]) that raise one alert "
        "each per window when what settled exchanges used crosses them (reservations in "
        "flight do not count): logged, and POSTed to settings.budgets.alert_webhook if set.",
    )

    @model_validator(mode="after")
    def _whole_units(self) -> Limit:
        if self.unit != "usd" and self.limit != self.limit.to_integral_value():
            raise ValueError(f"limit for {self.unit} must be a whole number")
        if self.unit == "usd" and self.limit.as_tuple().exponent < -6:  # type: ignore[operator]
            raise ValueError("usd limits have at most 6 decimal places (micro-dollars)")
        if self.tools is not None and (self.unit != "requests" or self.models is not None):
            raise ValueError("a tools limit counts requests (unit: requests) and takes no models")
        return self


def _distinct_counters(limits: list[Limit]) -> list[Limit]:
    """Two limits of one scope that count the same thing share one counter: only the
    tighter would hold, and the other's alerts would never fire while ``extproc usage``
    showed its remaining. Refused, naming the pair."""
    seen: dict[tuple[object, ...], int] = {}
    for i, limit in enumerate(limits):
        # What it counts: its globs as a set (their order names no other counter). A
        # per-model limit narrowed by globs may overlap one that is not: the tighter holds
        # for the models both count, on purpose (extproc.budgets.meter).
        globs = frozenset(limit.tools or limit.models or ())
        counted = (limit.unit, limit.window, limit.per_model, limit.tools is not None, globs)
        if counted in seen:
            raise ValueError(
                f"limits {seen[counted]} and {i} count the same {limit.unit} per "
                f"{limit.window}: keep one (the tighter holds; merge their alerts)"
            )
        seen[counted] = i
    return limits


Limits = Annotated[list[Limit], AfterValidator(_distinct_counters)]


class Team(_Strict):
    description: str = ""
    models: ModelAccess = Field(
        default_factory=ModelAccess,
        description="Models the team may use. A team without rules may use none.",
    )
    limits: Limits = Field(default_factory=list)
    mcp: McpAccess | None = Field(
        default=None,
        description="MCP servers, tools, resources and prompts the team may use; a team "
        "without an mcp entry reaches no MCP server.",
    )


class User(_Strict):
    team: Name
    models: ModelAccess | None = Field(
        default=None, description="Further restricts the team's models for this user."
    )
    limits: Limits = Field(default_factory=list)
    mcp: McpAccess | None = Field(default=None, description="Narrows the team's MCP access.")


class Key(_Strict):
    sha256: Sha256Hex
    team: Name
    user: Name | None = None
    description: str = ""
    expires_at: datetime | None = Field(
        default=None, description="RFC 3339 time with a UTC offset; the key is refused after."
    )
    disabled: bool = False
    models: ModelAccess | None = Field(
        default=None, description="Further restricts the team's (and user's) models."
    )
    limits: Limits = Field(default_factory=list)
    mcp: McpAccess | None = Field(default=None, description="Narrows the team's MCP access.")

    @model_validator(mode="after")
    def _aware_expiry(self) -> Key:
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValueError("expires_at needs a UTC offset, e.g. 2027-01-01T00:00:00Z")
        return self


PerMillion = Annotated[Decimal, Field(ge=0, decimal_places=6)]


class Pricing(_Strict):
    """US dollars per million tokens (which is the same number as micro-dollars per token)."""

    input: PerMillion
    output: PerMillion
    cached_input: PerMillion | None = Field(
        default=None,
        description="Price of prompt tokens served from the provider's cache; "
        "defaults to the input price.",
    )
    cache_write: PerMillion | None = Field(
        default=None,
        description="Price of prompt tokens written to the provider's cache (Anthropic "
        "bills 1.25 times the input price for its 5-minute cache); defaults to the input "
        "price.",
    )
    cache_write_1h: PerMillion | None = Field(
        default=None,
        description="Price of prompt tokens written to Anthropic's 1-hour cache "
        "(cache_control ttl 1h, reported as cache_creation.ephemeral_1h_input_tokens); "
        "defaults to twice the input price, as Anthropic bills them.",
    )


class Upstream(_Strict):
    """An Envoy cluster rendered from the policy by ``extproc envoy-config``.

    Exactly one of ``url`` (one endpoint), ``failover`` (an aggregate cluster that tries
    these upstreams in order: 5xx, 429 and connect failures move on to the next) or
    ``split`` (a weighted route across upstreams, for canaries). Retries, outlier
    ejection and the retry budget stay Envoy's; this only saves writing the same
    cluster twice, once here and once in Envoy's config.
    """

    url: str | None = Field(
        default=None,
        pattern=r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?/?$",
        description="http(s)://host[:port] of an endpoint, no path. https verifies the "
        "server's certificate against the system's CAs and sends the host as SNI; a DNS "
        "name is re-resolved as it changes.",
    )
    failover: list[Name] = Field(
        default_factory=list,
        description="Upstreams (each with a url) tried in this order: an aggregate cluster.",
    )
    split: dict[Name, Annotated[int, Field(gt=0)]] = Field(
        default_factory=dict,
        description="Upstreams (each with a url) and their relative weights: a weighted route.",
    )
    connect_timeout_ms: int = Field(
        default=1000,
        gt=0,
        le=60_000,
        description="Envoy's connect timeout to the url; failover and split upstreams use "
        "their members' own.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Upstream:
        kinds = [bool(self.url), bool(self.failover), bool(self.split)]
        if sum(kinds) != 1:
            raise ValueError("set exactly one of url, failover or split")
        if not self.url and "connect_timeout_ms" in self.model_fields_set:
            # Envoy connects through the members' clusters, each with its own timeout.
            raise ValueError("connect_timeout_ms applies to an upstream with a url only")
        port = self.url.rpartition("]")[2].rpartition(":")[2].rstrip("/") if self.url else ""
        if port.isdigit() and not 1 <= int(port) <= 65535:
            raise ValueError(f"url: port {port} is not between 1 and 65535")
        return self


class Backend(_Strict):
    """Where a catalogue model is served, and how the gateway talks to it.

    The gateway routes with Envoy's ``cluster_header``: ``cluster`` names an Envoy cluster,
    typically an aggregate cluster whose children are the primary and its fail-over
    targets (retries, outlier detection and priorities stay Envoy's job).
    """

    cluster: Name
    provider: Literal["openai", "anthropic"] = Field(
        default="openai",
        description="The API the backend speaks: OpenAI-compatible (OpenAI, vLLM, Ollama, "
        "TGI, Azure) or Anthropic's.",
    )
    model: str | None = Field(
        default=None, description="The model name upstream; defaults to the catalogue name."
    )
    credential_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the provider key. The key itself never "
        "appears in the policy; the gateway sends it the way the provider expects.",
    )
    credential_file: str | None = Field(
        default=None,
        description="File holding the provider key (read again when it or the policy file "
        "changes).",
    )

    @model_validator(mode="after")
    def _one_credential(self) -> Backend:
        if self.credential_env and self.credential_file:
            raise ValueError("set credential_env or credential_file, not both")
        return self


class Model(_Strict):
    aliases: list[Name] = Field(default_factory=list)
    owned_by: str = "system"
    description: str = ""
    tokenizer: Literal["o200k", "cl100k", "estimate"] | None = Field(
        default=None,
        description="How prompt tokens are counted before the call: exact BPE for OpenAI "
        "models, a byte-based estimate otherwise. Default: guessed from the model name "
        "(the backend's model when it names one).",
    )
    pricing: Pricing | None = None
    max_output_tokens: int | None = Field(
        default=None,
        gt=0,
        le=10_000_000,
        description="The most output the model gives a request that sets no cap, reserved "
        "for it (default: settings.budgets.default_max_output_tokens). With the model's "
        "real maximum, requests in flight together cannot overrun a budget.",
    )
    backend: Backend | None = Field(
        default=None, description="Where the model is served; without one, Envoy's default route."
    )


class Budgets(_Strict):
    global_limits: Limits = Field(
        default_factory=list, description="Limits on all traffic through the gateway."
    )
    default_max_output_tokens: int = Field(
        default=4096,
        gt=0,
        description="Output tokens reserved for a request that sets no max tokens, unless "
        "its model says otherwise (models.*.max_output_tokens). It is not written into the "
        "request (an answer longer than this is settled at its length), except as the "
        "max_tokens Anthropic requires of a request translated from OpenAI's API.",
    )
    alert_webhook: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="URL that receives budget alerts as JSON POSTs (retried; off the "
        "request path).",
    )
    on_store_error: Literal["fail_closed", "fail_open"] = Field(
        default="fail_closed",
        description="Redis unreachable: answer 503 (fail_closed), or admit and count locally "
        "until Redis is back (fail_open).",
    )


class JwtSettings(_Strict):
    """How to read a caller's identity from JWT claims validated by Envoy's jwt_authn.

    jwt_authn must be configured with ``payload_in_metadata: <payload_key>``; ext_proc
    must forward the ``metadata_namespace`` (``metadata_options.forwarding_namespaces``).
    """

    metadata_namespace: str = "envoy.filters.http.jwt_authn"
    payload_key: str = "jwt_payload"
    user_claim: str = "sub"
    team_claim: str = Field(
        default="team",
        description="Claim naming the team; a list claim (e.g. groups) uses its first known team.",
    )


class Workload(_Strict):
    """A mesh workload (by its SPIFFE id) that may call without a key, as a team member."""

    team: Name
    user: Name | None = Field(
        default=None,
        description="Label for the workload in audit and headers; defaults "
        "to none (the team is the principal).",
    )


class WorkloadIdentity(_Strict):
    trust_xfcc: bool = Field(
        default=False,
        description="Also read the SPIFFE id from x-forwarded-client-cert. Only safe behind "
        "an Envoy that sanitises that header (Istio sidecars do: SANITIZE_SET); otherwise "
        "only the peer certificate Envoy verified is used.",
    )


class AuditSettings(_Strict):
    record_bodies: bool = Field(
        default=False,
        description="Add prompts and non-streamed answers to audit records, after a "
        "redaction of every structured PII entity and secret. Off: no text is recorded.",
    )


class Settings(_Strict):
    accounting: Literal["service", "envoy"] = Field(
        default="service",
        description="Where answers are read for budgets, metrics and audit. Either way "
        "Envoy lifts the usage (json_to_metadata / sse_to_metadata) of an answer needed only "
        "to account for it, and the exchange is settled from its signed ticket. service: "
        "Envoy reports the answer to the service before its end (a Lua filter, one HTTP "
        "request to the authorizer's port), settled before the caller has it. envoy: its "
        "gRPC access log hands it over once the answer ends, settled a moment later. "
        "Answers the service must rewrite or check (translation, output guardrails, MCP) "
        "are always read by the service, through ext_proc. Behind the HTTP authorizer both "
        "need envoy/gateway.yaml's lifting filters and access log (service: also its "
        "report filter).",
    )
    unknown_paths: Literal["reject", "passthrough"] = Field(
        default="reject",
        description="Requests to paths no dialect serves: answer 404, or forward untouched "
        "(identity is still required).",
    )
    jwt: JwtSettings | None = None
    workload_identity: WorkloadIdentity = Field(default_factory=WorkloadIdentity)
    budgets: Budgets = Field(default_factory=Budgets)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    guardrails: GuardrailSettings = Field(default_factory=GuardrailSettings)


class Policy(_Strict):
    """The whole policy file."""

    version: Literal[1] = 1
    settings: Settings = Field(default_factory=Settings)
    teams: dict[Name, Team] = Field(default_factory=dict)
    users: dict[Name, User] = Field(default_factory=dict)
    keys: dict[Name, Key] = Field(default_factory=dict)
    models: dict[Name, Model] = Field(default_factory=dict)
    mcp: McpConfig = Field(
        default_factory=McpConfig,
        description="MCP servers behind the gateway (name, Envoy cluster, path).",
    )
    guardrails: list[GuardrailRule] = Field(
        default_factory=list,
        description="Checks on prompts (input) and answers (output), in order: PII and "
        "secrets (rewrite or block), prompt injection, content policy.",
    )
    upstreams: dict[Name, Upstream] = Field(
        default_factory=dict,
        description="Envoy clusters for the catalogue's backends and MCP servers, rendered "
        "into Envoy's config by `extproc envoy-config` (and by `extproc up`). Left empty, "
        "the clusters are Envoy's own business (a mesh, a hand-written config).",
    )
    workloads: dict[Annotated[str, Field(pattern=r"^spiffe://[^\s]+$")], Workload] = Field(
        default_factory=dict,
        description="SPIFFE ids of mesh workloads mapped to teams (mTLS identity).",
    )

    @model_validator(mode="after")
    def _references(self) -> Policy:
        problems: list[str] = []
        for spiffe, workload in self.workloads.items():
            if workload.team not in self.teams:
                problems.append(f"workloads.{spiffe}.team: unknown team {workload.team!r}")
        for name, user in self.users.items():
            if user.team not in self.teams:
                problems.append(f"users.{name}.team: unknown team {user.team!r}")
        seen_hashes: dict[str, str] = {}
        for key_id, key in self.keys.items():
            if key.team not in self.teams:
                problems.append(f"keys.{key_id}.team: unknown team {key.team!r}")
            declared = self.users.get(key.user) if key.user else None
            if declared is not None and declared.team != key.team:
                problems.append(
                    f"keys.{key_id}.user: user {key.user!r} belongs to team "
                    f"{declared.team!r}, not {key.team!r}"
                )
            if key.sha256 in seen_hashes:
                problems.append(
                    f"keys.{key_id}.sha256: same hash as keys.{seen_hashes[key.sha256]}"
                )
            seen_hashes[key.sha256] = key_id
        owners: dict[str, str] = {name: name for name in self.models}
        for name, model in self.models.items():
            for alias in model.aliases:
                if alias in owners:
                    problems.append(
                        f"models.{name}.aliases: {alias!r} already names models.{owners[alias]}"
                    )
                owners[alias] = name
        problems.extend(self._unpriced_models())
        problems.extend(self._upstream_references())
        problems.extend(guardrail_problems(self.guardrails, self.settings.guardrails))
        problems.extend(self._scope_references())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _scope_references(self) -> list[str]:
        """A rule scoped to a team or key the policy does not have, or to a model by one of
        its aliases (requests are judged by the catalogue name an alias resolves to), would
        match nobody: a typo would silently switch it off."""
        problems: list[str] = []
        aliases = {alias: name for name, model in self.models.items() for alias in model.aliases}
        for index, rule in enumerate(self.guardrails):
            where = f"guardrails.{index}.scope"
            problems += [
                f"{where}.teams: unknown team {team!r}"
                for team in rule.scope.teams
                if team not in self.teams
            ]
            problems += [
                f"{where}.keys: unknown key {key!r}"
                for key in rule.scope.keys
                if key not in self.keys
            ]
            problems += [
                f"{where}.models: {glob!r} is an alias of models.{aliases[glob]}; scopes match "
                "the catalogue's names"
                for glob in rule.scope.models
                if glob in aliases
            ]
        return problems

    def _upstream_references(self) -> list[str]:
        """With upstreams declared, every cluster the policy names must be one of them."""
        if not self.upstreams:
            return []
        problems: list[str] = []
        for name, upstream in self.upstreams.items():
            for member in [*upstream.failover, *upstream.split]:
                target = self.upstreams.get(member)
                if target is None or not target.url:
                    problems.append(f"upstreams.{name}: {member!r} is not an upstream with a url")
        clusters = {
            f"models.{name}.backend.cluster": model.backend.cluster
            for name, model in self.models.items()
            if model.backend is not None
        }
        clusters.update(
            {
                f"mcp.servers.{name}.cluster": server.cluster
                for name, server in self.mcp.servers.items()
            }
        )
        for where, cluster in clusters.items():
            if cluster not in self.upstreams:
                problems.append(f"{where}: {cluster!r} is not one of the policy's upstreams")
        return problems

    def _unpriced_models(self) -> list[str]:
        """A dollar budget is only enforceable if every model it can count has a price."""
        limits = [
            *self.settings.budgets.global_limits,
            *(limit for team in self.teams.values() for limit in team.limits),
            *(limit for user in self.users.values() for limit in user.limits),
            *(limit for key in self.keys.values() for limit in key.limits),
        ]
        if not any(limit.unit == "usd" for limit in limits):
            return []
        return [
            f"models.{name}.pricing: required because a usd limit is configured"
            for name, model in self.models.items()
            if model.pricing is None
        ]


def header_safe(value: str) -> bool:
    """Whether ``value`` may be sent as an identity header without escaping."""
    return bool(_HEADER_SAFE.match(value))
