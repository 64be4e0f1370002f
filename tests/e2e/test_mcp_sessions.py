"""MCP sessions through real Envoy and the service: bound to the caller that opened them."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx2
import orjson
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from extproc.mcp.jsonrpc import ErrorCode
from extproc.stack import ROOT, Ports, Stack, running
from tests.e2e.conftest import ADMIN_KEY, EXAMPLE_POLICY, MCP_INITIALIZE, RESTRICTED_KEY
from tests.redis_server import free_port

pytestmark = pytest.mark.e2e

PATH = "/mcp/stateful"
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def _await_health(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "the stateful demo server exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("the stateful demo server did not start")


@pytest.fixture(scope="module")
def stateful(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The example policy with a second MCP server: the demo, opening sessions."""
    tmp: Path = tmp_path_factory.mktemp("mcp-sessions")
    port = free_port()
    argv = [sys.executable, "-m", "extproc", "mcp-demo", "--port", str(port), "--path", PATH]
    server = subprocess.Popen(
        [*argv, "--stateful"],
        cwd=ROOT,
        stdout=(tmp / "stateful-demo.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        _await_health(port, server)
        text = EXAMPLE_POLICY.read_text()
        text = text.replace(
            "upstreams:\n", f'upstreams:\n  mcp_stateful: {{ url: "http://127.0.0.1:{port}" }}\n', 1
        )
        text = text.replace(
            "mcp:\n  servers:\n",
            f"mcp:\n  servers:\n    stateful: {{ cluster: mcp_stateful, path: {PATH} }}\n",
            1,
        )
        policy = tmp / "policy.yaml"
        policy.write_text(text)
        with running(Stack(policy=policy, ports=Ports.free(), log_dir=tmp)) as stack:
            yield stack
    finally:
        server.terminate()
        server.wait(10)


def _url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.ports.gateway}{PATH}"


async def _post(
    stack: Stack, key: str, message: dict[str, object], session: str | None = None
) -> httpx2.Response:
    headers = {**HEADERS, "authorization": f"Bearer {key}"}
    if session is not None:
        headers["mcp-session-id"] = session
    async with httpx2.AsyncClient(timeout=30) as client:
        return await client.post(_url(stack), content=orjson.dumps(message), headers=headers)


async def test_the_sdk_client_keeps_its_session_through_the_gateway(stateful: Stack) -> None:
    """The client gets the server's session id tagged for it and sends it back; the
    server gets its own id: a session works as it would without the gateway."""
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(_url(stateful), http_client=http)) as client,
    ):
        tools = {tool.name for tool in (await client.list_tools()).tools}
        forecast = await client.call_tool("weather.get", {"city": "Oslo"})
    assert "weather.get" in tools
    assert forecast.structured_content == {"city": "Oslo", "forecast": "sunny", "celsius": 21}


async def test_a_session_is_refused_to_any_other_caller(stateful: Stack) -> None:
    """Another key presenting the id (seen in a log, a trace) is told the session does
    not exist, as the spec says a server answers one it does not know; so is the opener
    presenting the server's id without its tag."""
    opened = await _post(stateful, ADMIN_KEY, MCP_INITIALIZE)
    assert opened.status_code == 200
    session = opened.headers["mcp-session-id"]
    server_id, _, tag = session.rpartition(".")
    assert server_id and len(tag) == 22
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}

    own = await _post(stateful, ADMIN_KEY, listing, session)
    assert own.status_code == 200

    other = await _post(stateful, RESTRICTED_KEY, listing, session)
    assert other.status_code == 404
    assert orjson.loads(other.content)["error"]["code"] == ErrorCode.SESSION_NOT_FOUND

    untagged = await _post(stateful, ADMIN_KEY, listing, server_id)
    assert untagged.status_code == 404
