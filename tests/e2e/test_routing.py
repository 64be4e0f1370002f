"""Routing through real Envoy: catalogue backends, provider keys, fail-over, translation."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from extproc.stack import Ports, Stack, running
from tests.e2e.conftest import ADMIN_KEY, EXAMPLE_POLICY, Mock

pytestmark = pytest.mark.e2e

PROVIDER_KEY_ENV = "EXTPROC_TEST_OPENAI_KEY"
PROVIDER_KEY = "sk-provider-secret-0123456789"


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    tmp = tmp_path_factory.mktemp("routing")
    policy = tmp / "policy.yaml"
    text = EXAMPLE_POLICY.read_text().replace(
        "    backend: { cluster: openai }\n",
        f"    backend: {{ cluster: openai, credential_env: {PROVIDER_KEY_ENV} }}\n",
        1,  # gpt-4o
    )
    # A backend that exists only in the policy: the stack renders its cluster.
    text = text.replace(
        "upstreams:\n", 'upstreams:\n  policy_only: { url: "http://127.0.0.1:8098" }\n', 1
    )
    text += (
        "  gpt-4o-elsewhere:\n    pricing: { input: 1, output: 1 }\n"
        "    backend: { cluster: policy_only, model: moved }\n"
    )
    # A canary model: Envoy's weighted route sends a tenth of it to the secondary.
    text += (
        "  gpt-4o-canary:\n    pricing: { input: 2.5, output: 10 }\n"
        "    backend: { cluster: openai-canary }\n"
    )
    policy.write_text(text)
    os.environ[PROVIDER_KEY_ENV] = PROVIDER_KEY
    audit = tmp / "audit.jsonl"
    stack = Stack(
        policy=policy, ports=Ports.free(), log_dir=tmp, serve_args=("--audit-file", str(audit))
    )
    with running(stack):
        yield stack, audit


@pytest.fixture
def mocks(routed: tuple[Stack, Path]) -> tuple[Mock, Mock]:
    stack, _ = routed
    primary, secondary = Mock(stack.ports.mock), Mock(stack.ports.mock_anthropic)
    primary.clear()
    secondary.clear()
    return primary, secondary


def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{stack.ports.gateway}/v1", api_key=ADMIN_KEY, max_retries=0
    )


def audit_of(audit: Path, request_id: str | None) -> dict[str, object]:
    """This request's audit record (written once its exchange is over)."""
    assert request_id, "the gateway answers with x-request-id"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        written = audit.read_text() if audit.exists() else ""  # the writer batches records
        for line in written.splitlines():
            record = json.loads(line)
            if record["request_id"] == request_id:
                return dict(record)
        time.sleep(0.05)
    raise AssertionError(f"no audit record for request {request_id}")


def test_alias_goes_to_its_backend_under_the_upstream_name(
    routed: tuple[Stack, Path], mocks: tuple[Mock, Mock]
) -> None:
    stack, audit = routed
    primary, secondary = mocks
    reply = oai(stack).chat.completions.create(
        model="mini", messages=[{"role": "user", "content": "x"}]
    )
    seen = primary.last()
    assert json.loads(seen["body"])["model"] == "gpt-4o-mini-2024-07-18"
    assert seen["headers"]["x-gateway-cluster"] == "openai"
    assert secondary.requests() == []
    assert audit_of(audit, reply._request_id)["served_by"] == "openai_primary"


def test_forged_routing_headers_do_not_route(
    routed: tuple[Stack, Path], mocks: tuple[Mock, Mock]
) -> None:
    """Envoy routes by two headers the service sets (the cluster, and whether the call is
    MCP's, which takes a route that never retries): a client's copies are dropped, so a
    chat call goes to its model's backend, by its model's route, whatever it sends."""
    stack, _ = routed
    primary, secondary = mocks
    oai(stack).chat.completions.create(
        model="mini",
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"x-gateway-mcp": "demo", "x-gateway-cluster": "anthropic"},
    )
    seen = primary.last()
    assert seen["headers"]["x-gateway-cluster"] == "openai"
    assert "x-gateway-mcp" not in seen["headers"]
    assert secondary.requests() == []


def test_a_backend_added_to_the_policy_alone_serves(
    routed: tuple[Stack, Path], mocks: tuple[Mock, Mock]
) -> None:
    stack, audit = routed
    primary, secondary = mocks
    reply = oai(stack).chat.completions.create(
        model="gpt-4o-elsewhere", messages=[{"role": "user", "content": "moved"}]
    )
    assert json.loads(secondary.last()["body"])["model"] == "moved"
    assert primary.requests() == []
    assert audit_of(audit, reply._request_id)["served_by"] == "policy_only"


def test_provider_key_upstream_never_the_gateway_key_and_never_logged(
    routed: tuple[Stack, Path], mocks: tuple[Mock, Mock]
) -> None:
    stack, audit = routed
    primary, _ = mocks
    reply = oai(stack).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "k"}]
    )
    audit_of(audit, reply._request_id)  # written: the check below reads all of it
    headers = primary.last()["headers"]
    assert headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert ADMIN_KEY not in json.dumps(primary.last())
    for log in ("extproc", "envoy"):
        assert PROVIDER_KEY not in stack.logs(log)
    assert PROVIDER_KEY not in audit.read_text()


def test_primary_failing_with_503_fails_over_to_the_secondary(
    routed: tuple[Stack, Path], mocks: tuple[Mock, Mock]
) -> None:
    stack, audit = routed
    primary, secondary = mocks
    reply = oai(stack).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "fail over"}],
        extra_headers={"x-mock-fail": "openai"},
    )
    assert reply.choices[0].message.content == "fail over"
    assert len(primary.requests()) == 1 and len(secondary.requests()) == 1
    record = audit_of(audit, reply._request_id)
    assert record["served_by"] == "openai_secondary"
    assert record["status"] == 200 and record["output_tokens"] == 2


def test_anthropic_sdk_passthrough_to_the_anthropic_backend(
    routed: tuple[Stack, Path], mocks: tuple[Mock, Mock]
) -> None:
    stack, _ = routed
    primary, secondary = mocks
    claude = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{stack.ports.gateway}", api_key=ADMIN_KEY, max_retries=0
    )
    msg = claude.messages.create(
        model="claude-3-5-haiku", max_tokens=50, messages=[{"role": "user", "content": "native"}]
    )
    assert msg.content[0].text == "native"  # type: ignore[union-attr]
    assert json.loads(secondary.last()["body"])["model"] == "claude-3-5-haiku-20241022"
    assert primary.requests() == []


def test_openai_sdk_calls_claude_through_translation(
    routed: tuple[Stack, Path], mocks: tuple[Mock, Mock]
) -> None:
    stack, audit = routed
    _, secondary = mocks
    client = oai(stack)
    reply = client.chat.completions.create(
        model="claude-3-5-haiku",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "translated hello"},
        ],
        max_tokens=40,
        temperature=0.2,
        stop=["END"],
    )
    assert reply.choices[0].message.content == "translated hello"
    assert reply.model == "claude-3-5-haiku"
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    upstream = secondary.last()
    assert upstream["path"] == "/v1/messages"
    sent = json.loads(upstream["body"])
    assert sent["system"] == "be brief" and sent["max_tokens"] == 40
    assert sent["stop_sequences"] == ["END"] and sent["model"] == "claude-3-5-haiku-20241022"
    assert upstream["headers"]["anthropic-version"] == "2023-06-01"
    assert audit_of(audit, reply._request_id)["output_tokens"] == 2

    stream = client.chat.completions.create(
        model="claude-3-5-haiku",
        messages=[{"role": "user", "content": "streamed through translation"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "streamed through translation"
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_a_request_refused_by_its_translation_is_charged_nothing(
    routed: tuple[Stack, Path], mocks: tuple[Mock, Mock]
) -> None:
    """Translation runs once the budget is reserved (the global $500 a day): a request it
    refuses never goes upstream, and its reservation is given back whole."""
    stack, audit = routed
    _, secondary = mocks
    with pytest.raises(openai.BadRequestError) as refused:
        oai(stack).chat.completions.create(
            model="claude-3-5-haiku",
            messages=[{"role": "user", "content": "too hot for Claude " * 20}],
            temperature=1.5,
        )
    assert refused.value.code == "unsupported_value"
    assert secondary.requests() == []
    record = audit_of(audit, refused.value.response.headers.get("x-request-id"))
    assert record["status"] == 400 and record["budget"] == "reserved"
    assert (record["input_tokens"], record["output_tokens"], record["cost_micro_usd"]) == (0, 0, 0)


def test_tool_calls_and_results_are_translated(
    routed: tuple[Stack, Path], mocks: tuple[Mock, Mock]
) -> None:
    stack, _ = routed
    _, secondary = mocks
    oai(stack).chat.completions.create(
        model="claude-3-5-haiku",
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "user", "content": "thanks"},
        ],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
    )
    sent = json.loads(secondary.last()["body"])
    assert sent["tools"][0]["name"] == "weather"
    tool_use = sent["messages"][1]["content"][0]
    assert tool_use == {
        "type": "tool_use",
        "id": "call_1",
        "name": "weather",
        "input": {"city": "Paris"},
    }
    assert sent["messages"][2]["content"][0]["type"] == "tool_result"


def test_upstream_error_is_mapped_to_the_openai_envelope(routed: tuple[Stack, Path]) -> None:
    stack, _ = routed
    with pytest.raises(openai.RateLimitError) as caught:
        oai(stack).chat.completions.create(
            model="claude-3-5-haiku",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-status": "429"},
        )
    # In OpenAI's envelope: an Anthropic body passed through would have no "code".
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.body["type"] == "rate_limit_error"  # type: ignore[index]


def test_canary_backend_splits_traffic_by_weight(
    routed: tuple[Stack, Path], mocks: tuple[Mock, Mock]
) -> None:
    stack, _ = routed
    primary, secondary = mocks
    client = oai(stack)
    # Envoy picks a weighted cluster at random: with 200 requests at 90/10, the chance that
    # the canary gets none is 0.9**200, about 1e-9 (with 60 it was 0.2 %, and it happened).
    for i in range(200):
        client.chat.completions.create(
            model="gpt-4o-canary", messages=[{"role": "user", "content": f"c{i}"}]
        )
    to_primary, to_secondary = len(primary.requests()), len(secondary.requests())
    assert to_primary + to_secondary == 200
    assert to_primary > to_secondary >= 1  # 90/10: both serve, the primary most


def test_closed_primary_port_fails_over(
    routed: tuple[Stack, Path], mocks: tuple[Mock, Mock]
) -> None:
    stack, _ = routed
    _, secondary = mocks
    stack.processes["mock"].terminate()
    stack.processes["mock"].wait(timeout=10)
    reply = oai(stack).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "primary is gone"}]
    )
    assert reply.choices[0].message.content == "primary is gone"
    assert json.loads(secondary.last()["body"])["model"] == "gpt-4o"
