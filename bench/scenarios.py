"""The scenarios: what runs in the path of the same 1 KB chat request, and why.

Each scenario is data: which processes serve the request, which policy file (in
``bench/policies/``) the service loads, whether budgets live in Redis, and what answer the
upstream sends, and how the service accounts for answers (scenarios 7 and 8 are 5 and 6
with ``accounting: envoy``, generated from the same policy file).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import yaml

from bench import payloads

POLICIES = Path(__file__).resolve().parent / "policies"
GENERATED = Path(__file__).resolve().parent / ".logs" / "policies"


def with_accounting_envoy(policy: Path) -> Path:
    """``policy`` with ``settings.accounting: envoy``: one policy file, two ways to account."""
    data = yaml.safe_load(policy.read_text())
    data.setdefault("settings", {})["accounting"] = "envoy"
    GENERATED.mkdir(parents=True, exist_ok=True)
    out = GENERATED / f"{policy.stem}-accounting-envoy.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


class Route(StrEnum):
    """How the request travels."""

    UPSTREAM = "upstream"
    """Straight to the upstream: the floor every other scenario stands on."""
    ENVOY = "envoy"
    """Through the gateway Envoy without its ext_proc filter."""
    GATEWAY = "gateway"
    """Through Envoy and the ext_proc service."""


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    title: str
    measures: str
    route: Route
    policy: Path | None = None
    redis: bool = False
    stream: bool = False
    path: str = payloads.CHAT_PATH
    audit: bool = False
    """Run the service with an audit log (a JSON-lines file in the run's log directory)."""

    @property
    def service(self) -> bool:
        return self.route is Route.GATEWAY

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {payloads.BENCH_KEY}"}
        if self.stream:
            headers[payloads.ANSWER_HEADER] = "sse"
        return headers

    @property
    def body(self) -> bytes:
        return payloads.chat_request(stream=self.stream)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "0",
        "upstream direct",
        "the client and the upstream alone (Envoy direct_response): the floor",
        Route.UPSTREAM,
    ),
    Scenario(
        "1",
        "Envoy only",
        "the shipped gateway config without the filters that call the service: what Envoy costs",
        Route.ENVOY,
    ),
    Scenario(
        "2",
        "+ service, headers only",
        "the fixed cost of the service hop: one HTTP authorizer call that identifies the "
        "key and scrubs headers; a path no dialect serves, unknown_paths: passthrough",
        Route.GATEWAY,
        POLICIES / "s2-headers-only.yaml",
        path=payloads.PASSTHROUGH_PREFIX + payloads.CHAT_PATH,
    ),
    Scenario(
        "3",
        "+ identity, RBAC",
        "identity, then the buffered body: parse the chat request, check the model (no "
        "budgets, no audit: nothing reads the answer); decided by the HTTP authorizer in "
        "one call",
        Route.GATEWAY,
        POLICIES / "s3-identity-rbac.yaml",
    ),
    Scenario(
        "4",
        "+ budget on Redis",
        "scenario 3 plus one team budget in Redis: count prompt tokens (BPE), reserve, "
        "settle from the usage Envoy lifts and reports before the answer's end "
        "(accounting: service)",
        Route.GATEWAY,
        POLICIES / "s4-budgets-redis.yaml",
        redis=True,
    ),
    Scenario(
        "5",
        "full policy",
        "identity, RBAC, five budgets (key, user, team x2, global) on Redis, the PII and "
        "secrets guardrails on the prompt (which holds nothing they find: the path every "
        "clean prompt takes; a finding costs more), audit log (file) and metrics; accounting: "
        "service (the default): the HTTP authorizer decides the request in one call, "
        "Envoy lifts the answer's usage and its Lua filter reports it to the service "
        "before the answer's end",
        Route.GATEWAY,
        POLICIES / "s5-full.yaml",
        redis=True,
        audit=True,
    ),
    Scenario(
        "6",
        "full policy, SSE x50",
        "scenario 5 on a streamed answer of 50 content chunks (plus role, finish and usage "
        "events), usage lifted by sse_to_metadata; Envoy's Lua filter adds "
        "stream_options.include_usage",
        Route.GATEWAY,
        POLICIES / "s5-full.yaml",
        redis=True,
        stream=True,
        audit=True,
    ),
    Scenario(
        "7",
        "full policy, accounting: envoy",
        "scenario 5 with accounting: envoy: the HTTP authorizer decides the request in one "
        "call (no ext_proc stream); Envoy lifts the answer's usage (json_to_metadata) and "
        "its gRPC access log hands it to the service",
        Route.GATEWAY,
        with_accounting_envoy(POLICIES / "s5-full.yaml"),
        redis=True,
        audit=True,
    ),
    Scenario(
        "8",
        "full policy, accounting: envoy, SSE x50",
        "scenario 7 on the streamed answer of scenario 6 (usage lifted by sse_to_metadata); "
        "the authorizer decides it and Envoy's Lua filter adds stream_options.include_usage",
        Route.GATEWAY,
        with_accounting_envoy(POLICIES / "s5-full.yaml"),
        redis=True,
        stream=True,
        audit=True,
    ),
)


def by_key(keys: str | None) -> tuple[Scenario, ...]:
    """The scenarios named in a comma-separated list (all of them for ``None``)."""
    if not keys:
        return SCENARIOS
    wanted = [k.strip() for k in keys.split(",") if k.strip()]
    unknown = set(wanted) - {s.key for s in SCENARIOS}
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return tuple(s for s in SCENARIOS if s.key in wanted)
