"""The benchmark's generated Envoy configs: accepted by Envoy, and an upstream that keeps
its connections open as a provider does (bench/envoy_configs.py)."""

from __future__ import annotations

import http.client
from pathlib import Path

import pytest

from bench import envoy_configs, payloads, services
from tests.e2e.test_envoy_configs import validate

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"ext_proc": False},
        {"passthrough_route": True},
    ],
    ids=["gateway", "envoy-alone", "passthrough"],
)
def test_envoy_accepts_the_bench_gateway(tmp_path: Path, variant: dict[str, bool]) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(envoy_configs.gateway(services.free_port(), **variant))
    result = validate(config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_accepts_the_bench_upstream(tmp_path: Path) -> None:
    config = tmp_path / "upstream.yaml"
    config.write_text(envoy_configs.upstream(services.free_port(), services.free_port()))
    result = validate(config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bench_upstream_answers_requests_with_bodies_on_one_connection(tmp_path: Path) -> None:
    """A direct_response sent before the request body has arrived closes the connection;
    the gateway then paid a new upstream connection for every measured request."""
    upstream = services.upstream_envoy(tmp_path)
    with services.running(upstream):
        connection = http.client.HTTPConnection("127.0.0.1", services.port_of(upstream), timeout=5)
        try:
            sockets = []
            for answer in ("json", "sse"):
                headers = {"content-type": "application/json"}
                if answer == "sse":
                    headers[payloads.ANSWER_HEADER] = "sse"
                connection.request(
                    "POST", payloads.CHAT_PATH, body=payloads.chat_request(), headers=headers
                )
                response = connection.getresponse()
                body = response.read()
                assert response.status == 200
                assert response.getheader("connection") != "close"
                assert body == (
                    payloads.sse_answer() if answer == "sse" else payloads.json_answer()
                )
                sockets.append(connection.sock)  # None once http.client closed it
            assert sockets[0] is not None and sockets[0] is sockets[1]  # one connection
        finally:
            connection.close()
