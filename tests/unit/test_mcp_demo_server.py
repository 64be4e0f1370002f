"""The demo MCP server driven by the official SDK client, directly and through a gateway.

The gateway here is the smallest proxy that uses :mod:`extproc.mcp` the way the request
pipeline does (parse → decide → answer or forward → rewrite the answer), so these tests
show the package against the real SDK's wire format in both answer modes (SSE and JSON),
with both client generations (the initialize handshake and the 2026-07-28 per-request
protocol). Envoy itself is exercised by the end-to-end tests.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import orjson
import pytest
import uvicorn
from mcp import Client, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from extproc.mcp.access import CompiledServer, McpPermissions, compile_access
from extproc.mcp.config import McpAccess
from extproc.mcp.demo_server import INJECTED_ISSUE, CallLog, demo_app
from extproc.mcp.enforce import Answer, decide
from extproc.mcp.jsonrpc import ErrorCode, JsonRpcError, parse_body
from extproc.mcp.stream import SseRewriter, answer_kind, list_filter, rewrite_json

ALL_TOOLS = {
    "github.search_issues",
    "github.get_issue",
    "github.create_issue",
    "jira.create_issue",
    "jira.search",
    "weather.get",
}
KEYS = {
    "sk-demo-admin": compile_access(
        McpAccess.model_validate(
            {"tools": {"allow": ["*"]}, "resources": {"allow": ["*"]}, "prompts": {"allow": ["*"]}}
        )
    ),
    "sk-demo-restricted": compile_access(
        McpAccess.model_validate(
            {
                "tools": {"allow": ["github.search_issues", "github.get_issue", "weather.*"]},
                "resources": {"allow": ["docs://*", "weather://*"]},
                "prompts": {"allow": ["triage_issue"]},
            }
        )
    ),
}
FORWARDED_HEADERS = (
    "content-type",
    "accept",
    "mcp-protocol-version",
    "mcp-session-id",
    "mcp-method",
    "mcp-name",
    "last-event-id",
)


Seen = list[SseRewriter | int]


def rewritten(seen: Seen) -> int:
    return sum(item if isinstance(item, int) else item.changed for item in seen)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(app: ASGIApp) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def mini_gateway(upstream: str, server: CompiledServer, seen: Seen) -> ASGIApp:
    """Identify the caller by key, then decide, answer or forward, and filter answers.

    ``seen`` collects, per forwarded answer, the SSE rewriter (its ``changed`` count is
    read after the exchange: the client may finish before the stream's generator does) or
    the number of JSON answers rewritten (0 or 1)."""
    client = httpx.AsyncClient(timeout=30)

    async def mcp(request: HttpRequest) -> Response:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        access: McpPermissions | None = KEYS.get(key)
        if access is None:
            return Response(b"unknown key", status_code=401)
        try:
            body = parse_body(await request.body())
        except JsonRpcError as error:
            return Response(error.answer, error.status, media_type="application/json")
        decision = decide(server, access, body)
        if isinstance(decision, Answer):
            return Response(decision.body, decision.status, media_type="application/json")
        headers = {h: v for h in FORWARDED_HEADERS if (v := request.headers.get(h)) is not None}
        upstream_request = client.build_request(
            "POST", upstream + server.path, headers=headers, content=await request.body()
        )
        answer = await client.send(upstream_request, stream=True)
        out_headers = {
            h: v
            for h in ("content-type", "mcp-session-id")
            if (v := answer.headers.get(h)) is not None
        }
        rewrite = list_filter(access)
        if answer_kind(answer.headers.get("content-type", "")) == "sse":
            rewriter = SseRewriter(decision.methods, rewrite)
            seen.append(rewriter)

            async def events() -> AsyncIterator[bytes]:
                async for chunk in answer.aiter_raw():
                    yield rewriter.feed(chunk)
                yield rewriter.finish()
                await answer.aclose()

            return StreamingResponse(events(), answer.status_code, headers=out_headers)
        raw = await answer.aread()
        changed = rewrite_json(raw, decision.methods, rewrite) if raw else None
        seen.append(int(changed is not None))
        return Response(
            changed if changed is not None else raw, answer.status_code, headers=out_headers
        )

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with client:
            yield

    return Starlette(routes=[Route(server.path, mcp, methods=["POST"])], lifespan=lifespan)


@pytest.fixture(params=[False, True], ids=["sse", "json"])
def demo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    log = tmp_path / "calls.jsonl"
    app, _ = demo_app("/mcp", json_response=request.param, calls=CallLog(log))
    with serve(app) as url:
        yield url, log


@pytest.fixture
def gateway(demo: tuple[str, Path]) -> Iterator[tuple[str, Seen]]:
    upstream, _ = demo
    seen: Seen = []
    with serve(
        mini_gateway(upstream, CompiledServer("demo", "mcp_demo", "/mcp", "reject"), seen)
    ) as url:
        yield url, seen


async def received(base: str) -> list[dict[str, Any]]:
    """What the demo server says it received (its side route, bypassing any gateway)."""
    async with httpx.AsyncClient() as http:
        calls: list[dict[str, Any]] = (await http.get(base + "/calls")).json()
    return calls


def sdk_http(key: str | None = None) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(headers={"authorization": f"Bearer {key}"} if key else {}, timeout=30)


async def test_sdk_session_lists_and_calls_and_the_server_logs_it(demo: tuple[str, Path]) -> None:
    base, log = demo
    async with (
        sdk_http() as http,
        streamable_http_client(base + "/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        tools = await session.list_tools()
        assert {t.name for t in tools.tools} == ALL_TOOLS  # dotted names are fine in the SDK
        result = await session.call_tool("weather.get", {"city": "Oslo"})
        assert result.structured_content == {"city": "Oslo", "forecast": "sunny", "celsius": 21}
        issue = await session.call_tool("github.get_issue", {"number": 13})
        assert INJECTED_ISSUE in issue.content[0].text  # type: ignore[union-attr]
    calls = [c for c in await received(base) if c["method"] == "tools/call"]
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("weather.get", {"city": "Oslo"}),
        ("github.get_issue", {"number": 13}),
    ]
    logged = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    assert [c for c in logged if c["method"] == "tools/call"] == calls
    async with httpx.AsyncClient() as plain:
        assert (await plain.delete(base + "/calls")).json() == []
        assert (await plain.get(base + "/healthz")).text == "ok"


async def test_modern_client_reads_resources_and_prompts(demo: tuple[str, Path]) -> None:
    base, _ = demo
    async with (
        sdk_http() as http,
        Client(streamable_http_client(base + "/mcp", http_client=http)) as client,
    ):
        resources = await client.list_resources()
        assert {str(r.uri) for r in resources.resources} == {
            "docs://demo/readme",
            "docs://demo/runbook",
            "secrets://demo/deploy-key",
        }
        templates = await client.list_resource_templates()
        assert [t.uri_template for t in templates.resource_templates] == ["weather://{city}/today"]
        readme = await client.read_resource("docs://demo/readme")
        assert "governance" in readme.contents[0].text  # type: ignore[union-attr]
        prompt = await client.get_prompt("triage_issue", {"issue": "it broke"})
        assert "it broke" in prompt.messages[0].content.text  # type: ignore[union-attr]
    names = [(c["method"], c["name"]) for c in await received(base) if c["name"]]
    assert names == [("resources/read", "docs://demo/readme"), ("prompts/get", "triage_issue")]


@pytest.mark.parametrize("modern", [False, True], ids=["handshake", "per-request"])
async def test_through_gateway_restricted_caller(
    demo: tuple[str, Path], gateway: tuple[str, Seen], modern: bool
) -> None:
    base, _ = demo
    url, seen = gateway
    async with (
        sdk_http("sk-demo-restricted") as http,
        Client(
            streamable_http_client(url + "/mcp", http_client=http),
            mode="auto" if modern else "legacy",
        ) as client,
    ):
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} == {
            "github.search_issues",
            "github.get_issue",
            "weather.get",
        }
        resources = await client.list_resources()
        assert {str(r.uri) for r in resources.resources} == {
            "docs://demo/readme",
            "docs://demo/runbook",
        }
        prompts = await client.list_prompts()
        assert [p.name for p in prompts.prompts] == ["triage_issue"]
        ok = await client.call_tool("github.search_issues", {"query": "dark"})
        assert "#21 Dark mode" in ok.content[0].text  # type: ignore[union-attr]
        with pytest.raises(MCPError) as refused:
            await client.call_tool("jira.create_issue", {"project": "OPS", "summary": "x"})
        assert refused.value.code == ErrorCode.FORBIDDEN
        assert refused.value.data["name"] == "jira.create_issue"
        assert "forbidden by gateway policy" in refused.value.message
        with pytest.raises(MCPError) as unreadable:
            await client.read_resource("secrets://demo/deploy-key")
        assert unreadable.value.code == ErrorCode.FORBIDDEN
    arrived = [(c["method"], c["name"]) for c in await received(base) if c["name"]]
    assert arrived == [("tools/call", "github.search_issues")]  # the refused ones never arrived
    assert rewritten(seen) == 3  # the three list answers were narrowed


async def test_through_gateway_admin_sees_everything(
    gateway: tuple[str, Seen],
) -> None:
    url, seen = gateway
    async with (
        sdk_http("sk-demo-admin") as http,
        Client(streamable_http_client(url + "/mcp", http_client=http)) as client,
    ):
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} == ALL_TOOLS
        created = await client.call_tool("jira.create_issue", {"project": "OPS", "summary": "x"})
        assert "OPS-101" in created.content[0].text  # type: ignore[union-attr]
    assert seen and rewritten(seen) == 0  # passed on byte for byte
