"""One real stack (Envoy binary, the service, the mock upstream) per test session."""

from __future__ import annotations

import http.client
import json
import select
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from extproc.stack import ROOT, Ports, Stack, running
from tests.redis_server import RedisServer

EXAMPLE_POLICY = ROOT / "policies" / "example.yaml"
ADMIN_KEY = "sk-demo-admin"
RESTRICTED_KEY = "sk-demo-restricted"
MCP_INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}
"""An MCP client's first message, for tests that speak MCP without the SDK."""


@dataclass
class Http:
    """Raw HTTP against the gateway, for what SDKs would refuse to send."""

    port: int

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def upload(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """POST a large body the way curl does: stop sending once the server has answered.

        Envoy answers 413 mid-upload and closes; a client that keeps writing would get a
        connection reset instead of the answer.
        """
        head = [f"POST {path} HTTP/1.1", "host: gateway", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            view = memoryview(body)
            while view:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                try:
                    sent = sock.send(view[: 256 * 1024])
                except (BrokenPipeError, ConnectionResetError):
                    break
                view = view[sent:]
            response = http.client.HTTPResponse(sock)
            response.begin()
            return response.status, response.read()

    def post_json(
        self, path: str, payload: Any, key: str | None = ADMIN_KEY, **headers: str
    ) -> tuple[int, dict[str, str], Any]:
        all_headers = {"content-type": "application/json", **headers}
        if key is not None:
            all_headers["authorization"] = f"Bearer {key}"
        status, resp_headers, raw = self.request(
            "POST", path, json.dumps(payload).encode(), all_headers
        )
        return status, resp_headers, json.loads(raw) if raw else None


@dataclass
class Mock:
    """The mock upstream's record of what actually reached it."""

    port: int

    def requests(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_mock/requests") as resp:
            return list(json.load(resp))

    def last(self) -> dict[str, Any]:
        seen = self.requests()
        assert seen, "no request reached the upstream"
        return seen[-1]

    def clear(self) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/_mock/requests", method="DELETE"
        )
        urllib.request.urlopen(req).close()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A private Redis for one module's stack (budget counters read directly)."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("stack")
    with running(Stack(policy=EXAMPLE_POLICY, ports=Ports.free(), log_dir=logs)) as s:
        yield s


@pytest.fixture(scope="session")
def gateway_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.ports.gateway}"


@pytest.fixture
def raw(stack: Stack) -> Http:
    """Plain HTTP to the gateway of ``stack`` (a module's own ``stack`` overrides it)."""
    return Http(stack.ports.gateway)


@pytest.fixture
def mock(stack: Stack) -> Mock:
    """The OpenAI mock (the "openai" cluster's primary and the default route)."""
    m = Mock(stack.ports.mock)
    m.clear()
    return m


@pytest.fixture
def mock_anthropic(stack: Stack) -> Mock:
    """The Anthropic mock (the "anthropic" cluster)."""
    m = Mock(stack.ports.mock_anthropic)
    m.clear()
    return m


def policy_copy(tmp: Path, text: str | None = None) -> Path:
    path = tmp / "policy.yaml"
    path.write_text(text if text is not None else EXAMPLE_POLICY.read_text())
    return path
