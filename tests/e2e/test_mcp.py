"""MCP through real Envoy and the service: the official SDK client, the demo server."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import httpx2
import pytest
from mcp import Client, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from extproc.mcp.demo_server import ANSWER_CONTROL
from extproc.mcp.jsonrpc import ErrorCode
from extproc.stack import Stack
from tests.e2e.conftest import ADMIN_KEY, MCP_INITIALIZE, RESTRICTED_KEY, Http
from tests.e2e.test_accounting import ext_proc_messages

pytestmark = pytest.mark.e2e

ALL_TOOLS = {
    "github.search_issues",
    "github.get_issue",
    "github.create_issue",
    "jira.create_issue",
    "jira.search",
    "weather.get",
}


def calls(stack: Stack) -> list[dict[str, Any]]:
    """What the demo server itself received (its own record, not the gateway's)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.mcp_demo}/calls") as resp:
        return [c for c in json.load(resp) if c["method"] == "tools/call"]


def clear(stack: Stack) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.ports.mcp_demo}/calls", method="DELETE"
    )
    urllib.request.urlopen(request).close()


def http(key: str) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(headers={"authorization": f"Bearer {key}"}, timeout=30)


def url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.ports.gateway}/mcp"


async def test_tools_list_differs_by_key_exactly_as_the_policy_says(stack: Stack) -> None:
    async with http(ADMIN_KEY) as h, Client(streamable_http_client(url(stack), http_client=h)) as c:
        admin = {t.name for t in (await c.list_tools()).tools}
    async with (
        http(RESTRICTED_KEY) as h,
        Client(streamable_http_client(url(stack), http_client=h)) as c,
    ):
        restricted = {t.name for t in (await c.list_tools()).tools}
        prompts = [p.name for p in (await c.list_prompts()).prompts]
    assert admin == ALL_TOOLS
    assert restricted == {"github.search_issues", "github.get_issue", "weather.get"}
    assert restricted < admin and prompts == ["triage_issue"]


async def test_allowed_call_succeeds_and_a_forbidden_one_never_arrives(stack: Stack) -> None:
    clear(stack)
    async with (
        http(RESTRICTED_KEY) as h,
        streamable_http_client(url(stack), http_client=h) as (read, write),
        ClientSession(read, write) as session,  # the classic handshake; SSE answers
    ):
        await session.initialize()
        ok = await session.call_tool("weather.get", {"city": "Oslo"})
        assert ok.structured_content == {"city": "Oslo", "forecast": "sunny", "celsius": 21}
        with pytest.raises(MCPError) as refused:
            await session.call_tool("jira.create_issue", {"project": "OPS", "summary": "x"})
    assert refused.value.code == ErrorCode.FORBIDDEN
    assert "forbidden by gateway policy" in refused.value.message
    assert [c["name"] for c in calls(stack)] == ["weather.get"]  # the server never saw jira


async def test_pii_in_tool_arguments_is_rewritten_before_the_server(stack: Stack) -> None:
    clear(stack)
    async with http(ADMIN_KEY) as h, Client(streamable_http_client(url(stack), http_client=h)) as c:
        await c.call_tool(
            "jira.create_issue", {"project": "OPS", "summary": "mail bob@example.com"}
        )
    (arrived,) = calls(stack)
    assert arrived["arguments"]["summary"] == "mail <EMAIL_ADDRESS>"
    assert arrived["headers"]["x-gateway-team"] == "platform"


async def test_a_tool_result_with_an_injected_instruction_is_blocked(stack: Stack) -> None:
    async with http(ADMIN_KEY) as h, Client(streamable_http_client(url(stack), http_client=h)) as c:
        fine = await c.call_tool("github.get_issue", {"number": 21})
        assert "Dark mode" in fine.content[0].text  # type: ignore[union-attr]
        with pytest.raises(MCPError) as blocked:
            await c.call_tool("github.get_issue", {"number": 13})
    assert blocked.value.code == ErrorCode.GUARDRAIL_BLOCKED
    assert "instructions aimed at the model" in blocked.value.message


async def failed_call(stack: Stack, answer: str, tool: str, arguments: dict[str, Any]) -> MCPError:
    """The error a call of ``tool`` raises when the demo server answers it as ``answer``
    asks (x-demo-answer), in a session of the admin key."""
    clear(stack)
    async with (
        http(ADMIN_KEY) as h,
        streamable_http_client(url(stack), http_client=h) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        h.headers[ANSWER_CONTROL.decode()] = answer
        with pytest.raises(MCPError) as failed:
            await session.call_tool(tool, arguments)
    return failed.value


async def test_an_answer_the_gateway_cannot_check_fails_the_call_with_its_reason(
    stack: Stack,
) -> None:
    """The server answers a call with a body that says JSON and is not: unchecked, it
    cannot pass (fail closed). The HTTP 502 carries a JSON-RPC error, so the SDK raises
    it as the call's own failure with the gateway's reason, not "Server returned an error
    response"."""
    failed = await failed_call(stack, "unreadable", "weather.get", {"city": "Oslo"})
    assert failed.code == ErrorCode.GATEWAY_ERROR
    assert "could not be checked by the gateway" in failed.message
    assert failed.error.data == {"type": "upstream_answer_unreadable"}
    assert [c["name"] for c in calls(stack)] == ["weather.get"]  # the call itself went


async def test_a_tool_call_the_server_answers_503_is_not_sent_again(stack: Stack) -> None:
    """The call may have run before its server (or a proxy before it) answered 503: on
    the model calls' route Envoy sent it twice more, so jira.create_issue ran three times.
    MCP has its own route (x-gateway-mcp), retrying only what never reached the server."""
    await failed_call(stack, "unavailable", "jira.create_issue", {"project": "OPS", "summary": "x"})
    arrived = calls(stack)
    assert [c["name"] for c in arrived] == ["jira.create_issue"]  # once, not three times
    assert arrived[0]["headers"]["x-gateway-mcp"] == "demo"


async def test_a_json_rpc_error_sent_with_an_error_status_is_guarded(stack: Stack) -> None:
    """The SDK hands a 4xx answer's JSON-RPC error to its caller as the call's outcome:
    Envoy sends its body to the service (asked for at the answer's headers, whatever the
    status), whose output rule replaces the injected instruction with its own error."""
    refused = await failed_call(stack, "refused", "weather.get", {"city": "Oslo"})
    assert refused.code == ErrorCode.GUARDRAIL_BLOCKED
    assert "instructions aimed at the model" in refused.message
    assert "ignore all previous" not in refused.message


def test_a_body_past_the_buffer_gets_json_rpcs_error_from_envoy(stack: Stack) -> None:
    """Envoy answers a body over its 8 MiB buffer itself; on an MCP path its local reply
    is a JSON-RPC error (an integer code, as JSON-RPC requires), and nothing is sent on."""
    clear(stack)
    arguments = {"city": "x" * (9 * 1024 * 1024)}
    call = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "weather.get"}}
    body = json.dumps({**call, "params": {**call["params"], "arguments": arguments}})
    status, raw = Http(stack.ports.gateway).upload(
        "/mcp",
        body.encode(),
        {
            "authorization": f"Bearer {ADMIN_KEY}",
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
        },
    )
    assert status == 413
    assert b'"code":-32014,' in raw.replace(b" ", b"")
    answer = json.loads(raw)
    assert answer["jsonrpc"] == "2.0" and answer["id"] is None
    assert answer["error"]["data"] == {"type": "request_too_large"}
    assert "8 MiB" in answer["error"]["message"]
    assert calls(stack) == []


def test_team_without_mcp_access_reaches_no_server(stack: Stack) -> None:
    status, _, body = Http(stack.ports.gateway).post_json(
        "/mcp", MCP_INITIALIZE, key="sk-demo-capped", accept="application/json, text/event-stream"
    )
    assert status == 403
    # Refused on the headers, before the body (and its id) is read: JSON-RPC's null id.
    assert body == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {
            "code": ErrorCode.FORBIDDEN,
            "message": "Your team 'capped' may not use the MCP server 'demo'.",
            "data": {"server": "demo"},
        },
    }


async def test_per_tool_rate_limit_refuses_with_a_json_rpc_error(stack: Stack) -> None:
    """The example policy allows the apps team 5 weather lookups a minute."""
    clear(stack)
    succeeded = 0
    async with (
        http(RESTRICTED_KEY) as h,
        Client(streamable_http_client(url(stack), http_client=h)) as c,
    ):
        with pytest.raises(MCPError) as limited:
            for _ in range(12):  # a minute boundary mid-loop allows at most 5 more
                await c.call_tool("weather.get", {"city": "Rome"})
                succeeded += 1
    assert limited.value.code == ErrorCode.RATE_LIMITED
    assert limited.value.data["retryAfter"] >= 1
    assert "5 requests per minute" in limited.value.message
    assert 1 <= succeeded <= 10
    assert len(calls(stack)) == succeeded  # the refused call never reached the server


@pytest.mark.parametrize(
    ("body", "code", "message_id"),
    [
        pytest.param(b"{not json", ErrorCode.PARSE_ERROR, None, id="not-json"),
        pytest.param(b"[]", ErrorCode.INVALID_REQUEST, None, id="empty-batch"),
        pytest.param(b'"ping"', ErrorCode.INVALID_REQUEST, None, id="not-an-object"),
        pytest.param(
            b'{"jsonrpc": "1.0", "id": 7, "method": "ping"}',
            ErrorCode.INVALID_REQUEST,
            7,
            id="not-json-rpc-2",
        ),
    ],
)
def test_an_unusable_body_gets_json_rpcs_own_error_and_never_reaches_the_server(
    stack: Stack, body: bytes, code: ErrorCode, message_id: int | None
) -> None:
    clear(stack)
    status, headers, raw = Http(stack.ports.gateway).request(
        "POST",
        "/mcp",
        body,
        {
            "authorization": f"Bearer {ADMIN_KEY}",
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
        },
    )
    assert status == 400, raw
    assert headers["content-type"] == "application/json"
    answer = json.loads(raw)
    assert answer["jsonrpc"] == "2.0" and answer["id"] == message_id
    assert answer["error"]["code"] == code
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.mcp_demo}/calls") as resp:
        assert json.load(resp) == []  # nothing reached the MCP server


def test_a_call_too_deep_to_forward_rewritten_is_refused_and_never_sent(stack: Stack) -> None:
    """Its email must be masked, but JSON nested past 255 levels cannot be written back:
    a JSON-RPC -32600 (HTTP 400) with the call's id, and nothing reaches the server."""
    clear(stack)
    deep = '{"n":' * 300 + "1" + "}" * 300
    body = (
        '{"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": '
        '"jira.create_issue", "arguments": {"summary": "mail bob@example.com", "x": ' + deep + "}}}"
    )
    status, _, raw = Http(stack.ports.gateway).request(
        "POST",
        "/mcp",
        body.encode(),
        {
            "authorization": f"Bearer {ADMIN_KEY}",
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
        },
    )
    assert status == 400, raw
    answer = json.loads(raw)
    assert answer["id"] == 9 and answer["error"]["code"] == ErrorCode.INVALID_REQUEST
    assert "255 levels" in answer["error"]["message"]
    assert calls(stack) == []


async def test_the_servers_own_stream_opens_through_the_gateway(stack: Stack) -> None:
    """A GET stream (the server's requests and notifications, and replayed answers) is
    read by the service like a POST's answer: Envoy sends the service its response
    headers too (two messages, not one), and the stream still opens and stays open."""
    headers = {"accept": "text/event-stream"}
    before = ext_proc_messages(stack)
    async with (
        http(RESTRICTED_KEY) as h,
        h.stream("GET", url(stack), headers=headers, timeout=5) as stream,
    ):
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert ext_proc_messages(stack) - before == 2


def test_an_http_method_mcp_does_not_use_is_refused_by_the_gateway(stack: Stack) -> None:
    """A PUT's body would go on unread (only a POST's calls are judged)."""
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "github.create_issue"},
        }
    ).encode()
    status, headers, raw = Http(stack.ports.gateway).request(
        "PUT",
        "/mcp",
        body,
        {"authorization": f"Bearer {RESTRICTED_KEY}", "content-type": "application/json"},
    )
    assert status == 405 and headers["allow"] == "DELETE, GET, POST"
    answer = json.loads(raw)
    assert answer["error"]["code"] == ErrorCode.INVALID_REQUEST
    assert "not used by MCP" in answer["error"]["message"]
