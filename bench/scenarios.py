"""The scenarios: what runs in the path of the same 1 KB chat request, and why.

Each scenario is data: which processes serve the request, which policy file (in
``bench/policies/``) the service loads, whether budgets live in Redis, and what answer the
upstream sends. Stages the policy cannot express yet are listed in ``pending`` and shown as
"not yet implemented" in the results, never simulated; when guardrails or audit land, add
them to the policy file and drop them from ``pending``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from bench import payloads

POLICIES = Path(__file__).resolve().parent / "policies"
NOT_YET = ("guardrails (input/output)", "audit log sinks")
"""Not configured by the bench policies. The telemetry observer (Prometheus metrics) is not
policy-driven: it runs in every gateway scenario, and it asks for the response phases."""


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
    pending: tuple[str, ...] = ()

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
        "the shipped gateway config without the ext_proc filter: what Envoy costs",
        Route.ENVOY,
    ),
    Scenario(
        "2",
        "+ service, headers only",
        "the fixed cost of the ext_proc hop: one gRPC stream, request headers only "
        "(identify the key, scrub headers, skip the body); a path no dialect serves, "
        "unknown_paths: passthrough",
        Route.GATEWAY,
        POLICIES / "s2-headers-only.yaml",
        path=payloads.PASSTHROUGH_PREFIX + payloads.CHAT_PATH,
    ),
    Scenario(
        "3",
        "+ identity, RBAC",
        "identity on the headers, then the buffered body: parse the chat request, check "
        "the model (no budgets, response not processed)",
        Route.GATEWAY,
        POLICIES / "s3-identity-rbac.yaml",
    ),
    Scenario(
        "4",
        "+ budget on Redis",
        "scenario 3 plus one team budget in Redis: count prompt tokens (BPE), reserve, "
        "read the response's usage, settle",
        Route.GATEWAY,
        POLICIES / "s4-budgets-redis.yaml",
        redis=True,
    ),
    Scenario(
        "5",
        "full policy",
        "identity, RBAC, five budgets (key, user, team x2, global) on Redis",
        Route.GATEWAY,
        POLICIES / "s5-full.yaml",
        redis=True,
        pending=NOT_YET,
    ),
    Scenario(
        "6",
        "full policy, SSE x50",
        "scenario 5 on a streamed answer of 50 content chunks (plus role, finish and usage "
        "events), usage read from the SSE stream",
        Route.GATEWAY,
        POLICIES / "s5-full.yaml",
        redis=True,
        stream=True,
        pending=NOT_YET,
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
