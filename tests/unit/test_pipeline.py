"""The pipeline as a pure function of (policy, phase): decisions, not protobufs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.meter import Meter
from extproc.decisions import Decision, Forward, Reply
from extproc.dialects.openai_chat import DIALECT as CHAT
from extproc.exchange import Exchange
from extproc.pipeline import (
    finish_request_body,
    hour_cache,
    on_request_headers,
    prepare_request_body,
)
from extproc.routing import ResponseTranslation
from tests.unit.policies import make_policy, sha

POLICY = make_policy()


def clock() -> datetime:
    return datetime(2026, 6, 1, tzinfo=UTC)


def headers(
    path: str, key: str | None = "sk-admin", method: str = "POST", **extra: str
) -> dict[str, str]:
    h = {":path": path, ":method": method, ":authority": "gw", "content-type": "application/json"}
    if key:
        h["authorization"] = f"Bearer {key}"
    h.update(extra)
    return h


def start(path: str, key: str | None = "sk-admin", **kw: str) -> tuple[Exchange, Forward | Reply]:
    ex = Exchange(policy=POLICY)
    return ex, on_request_headers(ex, headers(path, key, **kw), None, False, clock)


def test_headers_phase_sets_identity_and_scrubs_credentials_and_spoofs() -> None:
    _, decision = start("/v1/chat/completions", **{"x-gateway-team": "evil", "x-api-key": "k"})
    assert isinstance(decision, Forward)
    assert dict(decision.set_headers) == {
        "x-gateway-team": "platform",
        "x-gateway-user": "alice",
        "x-gateway-key-id": "admin",
    }
    assert set(decision.remove_headers) == {"authorization", "x-api-key", "x-gateway-team"}
    assert not decision.skip_request_body


def test_an_underscore_spelling_of_a_trusted_header_is_scrubbed() -> None:
    """Servers that read ``_`` as ``-`` would take it for the gateway's own header."""
    _, decision = start("/v1/chat/completions", **{"x_gateway_team": "evil", "x-gateway_user": "a"})
    assert isinstance(decision, Forward)
    assert {"x_gateway_team", "x-gateway_user"} <= set(decision.remove_headers)


def test_missing_key_replies_401_in_dialect() -> None:
    _, openai_reply = start("/v1/chat/completions", key=None)
    _, anthropic_reply = start("/v1/messages", key=None)
    assert isinstance(openai_reply, Reply) and isinstance(anthropic_reply, Reply)
    assert openai_reply.status == anthropic_reply.status == 401
    assert orjson.loads(openai_reply.body)["error"]["type"] == "invalid_request_error"
    assert orjson.loads(anthropic_reply.body)["error"]["type"] == "authentication_error"


def test_models_listing_is_answered_at_headers_phase() -> None:
    _, decision = start("/v1/models", key="sk-bob", method="GET")
    assert isinstance(decision, Reply) and decision.status == 200
    assert [m["id"] for m in orjson.loads(decision.body)["data"]] == ["gpt-4o-mini"]


@pytest.mark.parametrize(
    ("unknown_paths", "expected"),
    [("reject", Reply), ("passthrough", Forward)],
)
def test_unknown_paths_follow_policy(unknown_paths: str, expected: type) -> None:
    policy = make_policy(settings={"unknown_paths": unknown_paths})
    ex = Exchange(policy=policy)
    decision = on_request_headers(ex, headers("/v1/audio/speech"), None, False, clock)
    assert isinstance(decision, expected)
    if isinstance(decision, Forward):
        assert decision.skip_request_body
        assert "authorization" in decision.remove_headers
    else:
        assert decision.status == 404


def test_bodyless_post_is_400() -> None:
    ex = Exchange(policy=POLICY)
    decision = on_request_headers(ex, headers("/v1/chat/completions"), None, True, clock)
    assert isinstance(decision, Reply) and decision.status == 400


async def on_request_body(ex: Exchange, raw: bytes) -> Decision:
    rejected = prepare_request_body(ex, raw)
    if rejected is not None:
        return rejected
    return await finish_request_body(ex, Meter(MemoryStore()), clock)


def chat(model: str, text: str = "hi") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}]})


async def test_body_phase_routes_and_rewrites_alias() -> None:
    ex, _ = start("/v1/chat/completions")
    decision = await on_request_body(ex, chat("mini"))
    assert isinstance(decision, Forward)
    assert decision.set_headers == (("x-gateway-model", "gpt-4o-mini"),)
    assert decision.clear_route_cache
    assert decision.body is not None and orjson.loads(decision.body)["model"] == "gpt-4o-mini"


async def test_body_untouched_when_model_is_canonical() -> None:
    ex, _ = start("/v1/chat/completions")
    decision = await on_request_body(ex, chat("gpt-4o"))
    assert isinstance(decision, Forward) and decision.body is None


@pytest.mark.parametrize(
    ("key", "model", "status", "code", "message"),
    [
        pytest.param(
            "sk-bob",
            "gpt-4o",
            403,
            "model_not_allowed",
            "Your team 'apps' may not use the model 'gpt-4o'.",
            id="forbidden",
        ),
        pytest.param(
            "sk-bob",
            "claude-3-5-haiku",
            403,
            "model_not_allowed",
            # Not the team's doing: it said the team, sending people to the wrong owner.
            "The user 'bob' may not use the model 'claude-3-5-haiku' (team 'apps' may).",
            id="user-narrower-than-team",
        ),
        pytest.param("sk-admin", "gpt-5", 404, "model_not_found", None, id="unknown"),
    ],
)
async def test_body_phase_rbac(
    key: str, model: str, status: int, code: str, message: str | None
) -> None:
    ex, _ = start("/v1/chat/completions", key=key)
    decision = await on_request_body(ex, chat(model))
    assert isinstance(decision, Reply) and decision.status == status
    error = orjson.loads(decision.body)["error"]
    assert error["code"] == code
    assert message is None or error["message"] == message


async def test_a_key_narrower_than_its_team_is_named_in_the_refusal() -> None:
    keys = {
        "narrow": {"sha256": sha("sk-narrow"), "team": "apps", "models": {"deny": ["claude-*"]}}
    }
    ex = Exchange(policy=make_policy(keys=keys))
    on_request_headers(ex, headers("/v1/chat/completions", "sk-narrow"), None, False, clock)
    decision = await on_request_body(ex, chat("claude-3-5-haiku"))
    assert isinstance(decision, Reply) and decision.status == 403
    message = orjson.loads(decision.body)["error"]["message"]
    assert message == "This key may not use the model 'claude-3-5-haiku' (team 'apps' may)."


async def test_body_errors_use_anthropic_envelope_on_messages() -> None:
    ex, _ = start("/v1/messages")
    decision = await on_request_body(ex, b"{nope")
    assert isinstance(decision, Reply) and decision.status == 400
    body = orjson.loads(decision.body)
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "4bf92f3577b34da6a3ce929d0e0e4736",
            id="valid",
        ),
        pytest.param(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", None, id="all-zero"
        ),
        pytest.param("00-xyz-00f067aa0ba902b7-01", None, id="malformed"),
        pytest.param(
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None, id="uppercase"
        ),
        pytest.param(
            "00-0x4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01", None, id="0x-prefix"
        ),
        pytest.param(
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None, id="version-ff"
        ),
        pytest.param(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None, id="zero-parent"
        ),
        pytest.param(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            None,
            id="extra-field-in-version-00",
        ),
        pytest.param(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "4bf92f3577b34da6a3ce929d0e0e4736",
            id="later-version-may-extend",
        ),
        pytest.param(None, None, id="absent"),
    ],
)
def test_trace_id_from_traceparent(header: str | None, expected: str | None) -> None:
    from extproc.pipeline import trace_id

    assert trace_id(header) == expected


def test_an_answer_that_may_need_translating_back_is_asked_for() -> None:
    """A caller with no budget, no audit and no output rule: nothing else reads the answer,
    but a Claude model's answer to an OpenAI chat request must be translated back (Envoy
    takes the response phases only as asked at the request headers)."""
    policy = make_policy(
        models={
            "gpt-4o-mini": {"owned_by": "openai", "backend": {"cluster": "openai"}},
            "claude-3-5-haiku": {
                "owned_by": "anthropic",
                "backend": {"cluster": "anthropic", "provider": "anthropic"},
            },
        }
    )
    decisions = {}
    for key, path in [("sk-admin", "/v1/chat/completions"), ("sk-bob", "/v1/chat/completions")]:
        ex = Exchange(policy=policy)
        decisions[key] = on_request_headers(ex, headers(path, key), None, False, clock)
    admin, bob = decisions["sk-admin"], decisions["sk-bob"]
    assert isinstance(admin, Forward) and admin.process_response  # may use Claude
    assert isinstance(bob, Forward) and not bob.process_response  # gpt-4o-mini only


@pytest.mark.parametrize("path", ["/v1//chat/completions", "/v1/./chat/completions", "/x/.."])
def test_a_path_with_an_empty_or_dot_segment_is_refused(path: str) -> None:
    """Behind an Envoy that does not normalise paths (a mesh's), such a path passed for
    an unknown one: with unknown_paths: passthrough, forwarded with identity alone."""
    _, decision = start(path)
    assert isinstance(decision, Reply) and decision.status == 400
    assert orjson.loads(decision.body)["error"]["code"] == "invalid_path"


def responses(**fields: object) -> bytes:
    return orjson.dumps({"model": "gpt-4o-mini", "input": "hi", **fields})


PII_DETECTOR = {"kind": "pii", "entities": ["EMAIL_ADDRESS"]}


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        pytest.param({}, False, id="neither-metered-nor-guarded"),
        pytest.param(
            {
                "settings": {
                    "budgets": {
                        "global_limits": [{"unit": "total_tokens", "window": "day", "limit": 10**6}]
                    }
                }
            },
            True,
            id="metered",
        ),
        pytest.param(
            {
                "guardrails": [
                    {"name": "pii", "stage": "output", "mode": "mutate", "detector": PII_DETECTOR}
                ]
            },
            True,
            id="output-guarded",
        ),
        pytest.param(
            {
                "guardrails": [
                    {"name": "pii", "stage": "input", "mode": "mutate", "detector": PII_DETECTOR}
                ]
            },
            False,
            id="input-guarded-only",
        ),
    ],
)
async def test_a_background_response_is_refused_when_its_answer_must_be_seen(
    overrides: dict[str, object], refused: bool
) -> None:
    """Its answer says only "queued": the output, fetched later from a path no dialect
    serves, would be settled at an estimate and reach the caller unchecked."""
    ex = Exchange(policy=make_policy(**overrides))
    on_request_headers(ex, headers("/v1/responses"), None, False, clock)
    decision = await on_request_body(ex, responses(background=True))
    if not refused:
        assert isinstance(decision, Forward)
        return
    assert isinstance(decision, Reply) and decision.status == 400
    error = orjson.loads(decision.body)["error"]
    assert (error["code"], error["param"]) == ("unsupported_parameter", "background")
    foreground = Exchange(policy=make_policy(**overrides))
    on_request_headers(foreground, headers("/v1/responses"), None, False, clock)
    assert isinstance(await on_request_body(foreground, responses(background=False)), Forward)


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/responses", responses()), ("/v1/chat/completions", chat("gpt-4o-mini"))],
)
async def test_a_budget_affording_fewer_tokens_than_the_api_accepts_refuses(
    path: str, body: bytes
) -> None:
    """The Responses API refuses a max_output_tokens below 16: writing 10 there turned a
    429 with retry-after into the provider's 400 about a parameter the caller never sent.
    Chat accepts any cap."""

    def budget(limit: int) -> dict[str, Any]:
        limits = [{"unit": "total_tokens", "window": "day", "limit": limit}]
        return {"settings": {"budgets": {"global_limits": limits}}}

    probe = Exchange(policy=make_policy(**budget(10**6)))  # metered: the prompt is counted
    on_request_headers(probe, headers(path), None, False, clock)
    assert prepare_request_body(probe, body) is None and probe.input_tokens > 0
    ex = Exchange(policy=make_policy(**budget(probe.input_tokens + 10)))
    on_request_headers(ex, headers(path), None, False, clock)
    decision = await on_request_body(ex, body)
    if path == "/v1/responses":
        assert isinstance(decision, Reply) and decision.status == 429
    else:
        assert isinstance(decision, Forward) and decision.body is not None
        assert orjson.loads(decision.body)["max_completion_tokens"] == 10


def test_the_hour_cache_is_reserved_for_only_when_the_request_goes_to_claude() -> None:
    """A chat request's parts keep their cache_control when translated for Claude; sent to
    an OpenAI model it asks for nothing, and its prompt is not reserved at 2x."""
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "x",
                        "cache_control": {"type": "ephemeral", "ttl": "1h"},
                    }
                ],
            }
        ],
    }
    request = CHAT.parse(body)
    exchange = Exchange(POLICY)
    assert not hour_cache(exchange, request)
    exchange.translation = ResponseTranslation(requested_model="m", include_usage=False)
    assert hour_cache(exchange, request)


@pytest.mark.parametrize(("ttl", "quarter_micro_usd"), [("5m", 5), ("1h", 8)])
async def test_a_request_asking_claude_for_the_hour_cache_is_reserved_at_its_price(
    ttl: str, quarter_micro_usd: int
) -> None:
    """Through the body phase, as the service reserves it: a 1,000-token output cap and a
    prompt priced at the cache write its cache_control asks for (1.25x, or 2x for 1h)."""
    policy = make_policy(
        teams={
            "platform": {"models": {"allow": ["*"]}, "limits": [
                {"unit": "usd", "window": "day", "limit": 100}
            ]},
            "apps": {},
        },
        models={"claude-3-5-haiku": {"pricing": {"input": 1, "cache_write": 1.25, "output": 15}}},
    )  # fmt: skip
    ex = Exchange(policy=policy)
    assert isinstance(on_request_headers(ex, headers("/v1/messages"), None, False, clock), Forward)
    text = "word " * 200
    block = {"type": "text", "text": text, "cache_control": {"type": "ephemeral", "ttl": ttl}}
    body = {"model": "claude-3-5-haiku", "max_tokens": 1_000, "messages": [
        {"role": "user", "content": [block]}
    ]}  # fmt: skip
    assert prepare_request_body(ex, orjson.dumps(body)) is None
    assert isinstance(await finish_request_body(ex, Meter(MemoryStore()), clock), Forward)
    assert ex.reservation is not None
    prompt = ex.reservation.reserved.input_tokens
    # $1.25 (5-minute write) or $2 (1-hour write, twice the input) a million prompt
    # tokens, in quarters of a micro-dollar a token; $15 a million output tokens.
    expected = -(-prompt * quarter_micro_usd // 4) + 1_000 * 15
    assert prompt > 100 and ex.reservation.reserved.micro_usd == expected
