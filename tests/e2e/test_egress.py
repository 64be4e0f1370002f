"""The egress configuration (envoy/egress.yaml) routes to the backend whose key was set.

Envoy runs the shipped egress config with its two provider clusters pointed at the local
mocks (plain HTTP instead of TLS to api.openai.com and api.anthropic.com). A caller that
names a provider by its host still reaches the backend the service chose for the model:
routed by the host alone, a Claude model asked of api.openai.com went to OpenAI carrying
Anthropic's key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from extproc.stack import ROOT, Ports, Stack, running
from tests.e2e.conftest import ADMIN_KEY, EXAMPLE_POLICY, Http, Mock

pytestmark = pytest.mark.e2e

ANTHROPIC_KEY = "sk-ant-egress-test"
OPENAI_KEY = "sk-openai-egress-test"


def egress_config_with_mocks(tmp: Path) -> Path:
    """envoy/egress.yaml with its provider clusters on the mocks' default ports (the
    stack maps them to the ports it chose), in plain HTTP/1.1."""
    config = yaml.safe_load((ROOT / "envoy" / "egress.yaml").read_text())
    ports = {"openai": Ports().mock, "anthropic": Ports().mock_anthropic}
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] in ports:
            cluster.pop("transport_socket")
            cluster.pop("typed_extension_protocol_options")
            [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            address = endpoint["endpoint"]["address"]["socket_address"]
            address.update(address="127.0.0.1", port_value=ports[cluster["name"]])
    path = tmp / "egress-mocks.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def egress(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("egress")
    policy = tmp / "policy.yaml"
    text = EXAMPLE_POLICY.read_text()
    text = text.replace(
        "backend: { cluster: anthropic, provider: anthropic, model: claude-3-5-haiku-20241022 }",
        "backend: { cluster: anthropic, provider: anthropic, model: claude-3-5-haiku-20241022,"
        " credential_env: EGRESS_TEST_ANTHROPIC_KEY }",
    )
    text = text.replace(
        "backend: { cluster: openai, model: gpt-4o-mini-2024-07-18 }",
        "backend: { cluster: openai, model: gpt-4o-mini-2024-07-18,"
        " credential_env: EGRESS_TEST_OPENAI_KEY }",
    )
    policy.write_text(text)
    stack = Stack(
        policy=policy,
        ports=Ports.free(),
        envoy_config=egress_config_with_mocks(tmp),
        log_dir=tmp,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EGRESS_TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
        patch.setenv("EGRESS_TEST_OPENAI_KEY", OPENAI_KEY)
        with running(stack):
            yield stack


def ask(egress: Stack, host: str, model: str) -> tuple[Mock, Mock, tuple[int, bytes]]:
    """Both upstreams, emptied, then one chat request naming ``host``: what it got."""
    openai, anthropic = Mock(egress.ports.mock), Mock(egress.ports.mock_anthropic)
    openai.clear()
    anthropic.clear()
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    headers = {"host": host, "authorization": f"Bearer {ADMIN_KEY}"}
    status, _, answer = Http(egress.ports.gateway).request(
        "POST", "/v1/chat/completions", json.dumps(body).encode(), headers
    )
    return openai, anthropic, (status, answer)


@pytest.mark.parametrize("host", ["api.openai.com", "127.0.0.1"])
def test_a_claude_model_goes_to_anthropic_with_its_key_whatever_host_is_named(
    egress: Stack, host: str
) -> None:
    openai, anthropic, (status, body) = ask(egress, host, "claude-3-5-haiku")
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] == "hi"  # translated back
    assert openai.requests() == []  # never OpenAI, least of all with Anthropic's key
    seen = anthropic.last()
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["x-api-key"] == ANTHROPIC_KEY


def test_an_openai_model_asked_of_api_openai_com_goes_there_with_its_own_key(
    egress: Stack,
) -> None:
    openai, anthropic, (status, body) = ask(egress, "api.openai.com", "gpt-4o-mini")
    assert status == 200, body
    assert anthropic.requests() == []
    assert openai.last()["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
