"""Enforcement: forward or answer, ids preserved, batches all or nothing, list filtering."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.mcp.access import CompiledServer, Kind, canonical_uri, compile_access, unclear_uri
from extproc.mcp.config import McpAccess
from extproc.mcp.enforce import (
    Answer,
    Forward,
    McpCall,
    Verdict,
    decide,
    filter_list_response,
    refuse,
)
from extproc.mcp.jsonrpc import ErrorCode, JsonRpcError, parse_body

DEMO = CompiledServer("demo", "mcp_demo", "/mcp", "reject")
LENIENT = CompiledServer("lenient", "mcp_lenient", "/lenient", "forward")
RESTRICTED = compile_access(
    McpAccess.model_validate(
        {
            "tools": {"allow": ["github.search_issues", "weather.*"]},
            "resources": {"allow": ["docs://*", "weather://*"]},
            "prompts": {"allow": ["triage_issue"]},
        }
    )
)
KEPT_OFF = compile_access(
    McpAccess.model_validate({"servers": {"allow": ["other"]}, "tools": {"allow": ["*"]}})
)


def req(id_: Any, method: str, **params: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params:
        message["params"] = params
    return message


def note(method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, **({"params": params} if params else {})}


def run(document: Any, server: CompiledServer = DEMO, access: Any = RESTRICTED) -> Forward | Answer:
    return decide(server, access, parse_body(orjson.dumps(document)))


@pytest.mark.parametrize(
    ("message", "call"),
    [
        pytest.param(
            req(1, "tools/call", name="weather.get", arguments={"city": "Oslo"}),
            McpCall("demo", "tools/call", Kind.TOOL, "weather.get", 1, Verdict.ALLOW),
            id="allowed-tool",
        ),
        pytest.param(
            req("r", "resources/read", uri="docs://demo/readme"),
            McpCall(
                "demo", "resources/read", Kind.RESOURCE, "docs://demo/readme", "r", Verdict.ALLOW
            ),
            id="allowed-resource",
        ),
        pytest.param(
            req(2, "resources/subscribe", uri="weather://oslo/today"),
            McpCall(
                "demo",
                "resources/subscribe",
                Kind.RESOURCE,
                "weather://oslo/today",
                2,
                Verdict.ALLOW,
            ),
            id="allowed-subscribe",
        ),
        pytest.param(
            req(3, "prompts/get", name="triage_issue", arguments={"issue": "x"}),
            McpCall("demo", "prompts/get", Kind.PROMPT, "triage_issue", 3, Verdict.ALLOW),
            id="allowed-prompt",
        ),
        pytest.param(
            req(
                4,
                "completion/complete",
                ref={"type": "ref/prompt", "name": "triage_issue"},
                argument={"name": "issue", "value": "a"},
            ),
            McpCall("demo", "completion/complete", Kind.PROMPT, "triage_issue", 4, Verdict.ALLOW),
            id="allowed-completion",
        ),
        pytest.param(
            req(5, "tools/list"),
            McpCall("demo", "tools/list", None, None, 5, Verdict.ALLOW),
            id="list",
        ),
        pytest.param(
            req(
                6,
                "initialize",
                protocolVersion="2025-11-25",
                capabilities={},
                clientInfo={"name": "c", "version": "1"},
            ),
            McpCall("demo", "initialize", None, None, 6, Verdict.ALLOW),
            id="initialize",
        ),
        pytest.param(
            req(7, "server/discover"),
            McpCall("demo", "server/discover", None, None, 7, Verdict.ALLOW),
            id="discover",
        ),
        pytest.param(
            note("notifications/initialized"),
            McpCall("demo", "notifications/initialized", None, None, None, Verdict.ALLOW),
            id="notification",
        ),
        pytest.param(
            {"jsonrpc": "2.0", "id": 9, "result": {"roots": []}},
            McpCall("demo", None, None, None, 9, Verdict.ALLOW),
            id="client-response",
        ),
    ],
)
def test_forwarded(message: dict[str, Any], call: McpCall) -> None:
    decision = run(message)
    assert isinstance(decision, Forward)
    assert decision.calls == (call,)
    if "method" in message and "id" in message:
        assert decision.methods == {message["id"]: message["method"]}


@pytest.mark.parametrize(
    ("message", "code", "verdict", "status", "data"),
    [
        pytest.param(
            req(11, "tools/call", name="jira.create_issue", arguments={}),
            ErrorCode.FORBIDDEN,
            Verdict.DENY,
            200,
            {"method": "tools/call", "kind": "tool", "name": "jira.create_issue", "server": "demo"},
            id="forbidden-tool",
        ),
        pytest.param(
            req("s-1", "tools/call", name="github.create_issue"),
            ErrorCode.FORBIDDEN,
            Verdict.DENY,
            200,
            {
                "method": "tools/call",
                "kind": "tool",
                "name": "github.create_issue",
                "server": "demo",
            },
            id="forbidden-tool-string-id",
        ),
        pytest.param(
            req(12, "resources/read", uri="secrets://demo/deploy-key"),
            ErrorCode.FORBIDDEN,
            Verdict.DENY,
            200,
            {
                "method": "resources/read",
                "kind": "resource",
                "name": "secrets://demo/deploy-key",
                "server": "demo",
            },
            id="forbidden-resource",
        ),
        pytest.param(
            req(13, "prompts/get", name="release_notes"),
            ErrorCode.FORBIDDEN,
            Verdict.DENY,
            200,
            {"method": "prompts/get", "kind": "prompt", "name": "release_notes", "server": "demo"},
            id="forbidden-prompt",
        ),
        pytest.param(
            req(14, "completion/complete", ref={"type": "ref/resource", "uri": "secrets://{name}"}),
            ErrorCode.FORBIDDEN,
            Verdict.DENY,
            200,
            {
                "method": "completion/complete",
                "kind": "resource",
                "name": "secrets://{name}",
                "server": "demo",
            },
            id="completion-on-forbidden-template",
        ),
        pytest.param(
            req(15, "tools/call", arguments={}),
            ErrorCode.INVALID_PARAMS,
            Verdict.INVALID,
            400,
            {"method": "tools/call"},
            id="tool-without-name",
        ),
        pytest.param(
            req(16, "tools/call", name=7),
            ErrorCode.INVALID_PARAMS,
            Verdict.INVALID,
            400,
            {"method": "tools/call"},
            id="tool-name-not-string",
        ),
        pytest.param(
            req(17, "completion/complete", ref={"type": "ref/other"}),
            ErrorCode.INVALID_PARAMS,
            Verdict.INVALID,
            400,
            {"method": "completion/complete"},
            id="completion-unknown-ref",
        ),
        pytest.param(
            req(18, "admin/shutdown"),
            ErrorCode.METHOD_NOT_FOUND,
            Verdict.UNKNOWN_METHOD,
            200,
            {"method": "admin/shutdown"},
            id="unknown-method",
        ),
        pytest.param(
            req(19, "tools/list"),
            ErrorCode.FORBIDDEN,
            Verdict.DENY,
            200,
            {"server": "demo"},
            id="server-kept-off",
        ),
    ],
)
def test_answered_by_gateway(
    message: dict[str, Any], code: ErrorCode, verdict: Verdict, status: int, data: dict[str, Any]
) -> None:
    access = KEPT_OFF if message["id"] == 19 else RESTRICTED
    decision = run(message, access=access)
    assert isinstance(decision, Answer)
    assert decision.status == status
    answer = orjson.loads(decision.body)
    assert answer["id"] == message["id"]  # the SDK matches the answer to its request by id
    assert answer["error"]["code"] == code
    assert answer["error"].get("data") == data
    assert decision.calls[0].verdict is verdict
    assert decision.calls[0].id == message["id"]


def test_long_names_are_shortened_in_errors_but_not_in_audit() -> None:
    uri = "secrets://" + "x" * 1000
    decision = run(req(1, "resources/read", uri=uri))
    assert isinstance(decision, Answer)
    error = orjson.loads(decision.body)["error"]
    assert len(error["data"]["name"]) == 256
    assert len(error["message"]) < 400
    assert decision.calls[0].name == uri


def test_forbidden_message_names_method_and_item() -> None:
    decision = run(req(1, "tools/call", name="jira.create_issue"))
    assert isinstance(decision, Answer)
    assert orjson.loads(decision.body)["error"]["message"] == (
        "tools/call of tool 'jira.create_issue' is forbidden by gateway policy"
    )


@pytest.mark.parametrize(
    ("message", "code", "status"),
    [
        pytest.param(
            note("tools/call", name="weather.get"),
            ErrorCode.INVALID_REQUEST,
            400,
            id="call-as-notification",
        ),
        pytest.param(note("tools/list"), ErrorCode.INVALID_REQUEST, 400, id="list-as-notification"),
        pytest.param(
            note("vendor/poke"), ErrorCode.METHOD_NOT_FOUND, 404, id="unknown-notification"
        ),
        pytest.param(
            [note("notifications/initialized")],
            ErrorCode.FORBIDDEN,
            403,
            id="server-kept-off-notification",
        ),
    ],
)
def test_refused_notifications_answer_without_id(
    message: Any, code: ErrorCode, status: int
) -> None:
    decision = run(message, access=KEPT_OFF if isinstance(message, list) else RESTRICTED)
    assert isinstance(decision, Answer)
    assert decision.status == status
    answer = orjson.loads(decision.body)
    assert answer["id"] is None
    assert answer["error"]["code"] == code


def test_unknown_methods_forwarded_when_the_server_allows() -> None:
    assert isinstance(run(req(1, "vendor/stats"), server=LENIENT), Forward)
    assert isinstance(run(note("vendor/poke"), server=LENIENT), Forward)
    assert isinstance(run(req(2, "tools/call", name="jira.search"), server=LENIENT), Answer)


def test_allowed_batch_is_forwarded_with_every_method() -> None:
    decision = run(
        [
            req(1, "tools/list"),
            req(2, "tools/call", name="weather.get", arguments={"city": "Oslo"}),
            req(3, "tools/call", name="github.search_issues", arguments={"query": "x"}),
            note("notifications/cancelled", requestId=0),
        ]
    )
    assert isinstance(decision, Forward)
    assert decision.methods == {1: "tools/list", 2: "tools/call", 3: "tools/call"}
    assert decision.tools == (("demo", "weather.get"), ("demo", "github.search_issues"))


def test_batch_with_a_forbidden_call_is_answered_whole() -> None:
    decision = run(
        [
            req(1, "tools/call", name="weather.get"),
            req(2, "tools/call", name="jira.create_issue"),
            note("notifications/progress"),
            req("three", "tools/list"),
        ]
    )
    assert isinstance(decision, Answer)
    assert decision.status == 200
    answers = orjson.loads(decision.body)
    assert [(a["id"], a["error"]["code"]) for a in answers] == [
        (1, ErrorCode.BATCH_REJECTED),
        (2, ErrorCode.FORBIDDEN),
        ("three", ErrorCode.BATCH_REJECTED),
    ]
    assert [c.verdict for c in decision.calls] == [
        Verdict.BATCH_REJECTED,
        Verdict.DENY,
        Verdict.ALLOW,
        Verdict.BATCH_REJECTED,
    ]


def test_a_batch_refused_for_a_notification_says_why() -> None:
    """A tools/call without an id is refused, and being a notification it is answered
    with nothing: the ping beside it, not run, carries the reason."""
    decision = run([note("tools/call", name="weather.get"), req(1, "ping")])
    assert isinstance(decision, Answer) and decision.status == 400
    [answer] = orjson.loads(decision.body)
    assert answer["error"]["code"] == ErrorCode.BATCH_REJECTED
    assert "tools/call must be sent as a request with an id" in answer["error"]["message"]


def test_batch_with_an_invalid_element_is_400() -> None:
    decision = run([req(1, "tools/list"), {"jsonrpc": "2.0", "id": 2}])
    assert isinstance(decision, Answer)
    assert decision.status == 400
    answers = orjson.loads(decision.body)
    assert [(a["id"], a["error"]["code"]) for a in answers] == [
        (1, ErrorCode.BATCH_REJECTED),
        (2, ErrorCode.INVALID_REQUEST),
    ]


def test_refuse_answers_every_request_for_budgets_and_guardrails() -> None:
    body = parse_body(orjson.dumps(req(42, "tools/call", name="weather.get")))
    answer = refuse(
        DEMO,
        body,
        ErrorCode.RATE_LIMITED,
        "Rate limit for weather.get reached; retry in 12 s.",
        data={"retryAfter": 12},
    )
    assert answer.status == 200
    assert orjson.loads(answer.body) == {
        "jsonrpc": "2.0",
        "id": 42,
        "error": {
            "code": -32011,
            "message": "Rate limit for weather.get reached; retry in 12 s.",
            "data": {"retryAfter": 12, "server": "demo"},
        },
    }
    assert answer.calls == (
        McpCall("demo", "tools/call", Kind.TOOL, "weather.get", 42, Verdict.RATE_LIMITED),
    )


def test_refuse_by_guardrail_is_recorded_as_such() -> None:
    body = parse_body(orjson.dumps([req(1, "tools/call", name="a"), note("notifications/x")]))
    answer = refuse(DEMO, body, ErrorCode.GUARDRAIL_BLOCKED, "Blocked by guardrail 'pii'.")
    assert [a["error"]["code"] for a in orjson.loads(answer.body)] == [-32012]
    assert {c.verdict for c in answer.calls} == {Verdict.GUARDRAIL_BLOCKED}


TOOLS = [
    {"name": n, "inputSchema": {"type": "object"}}
    for n in ("github.search_issues", "github.create_issue", "jira.search", "weather.get")
]
RESOURCES = [{"uri": u, "name": u} for u in ("docs://demo/readme", "secrets://demo/deploy-key")]
TEMPLATES = [{"uriTemplate": u, "name": u} for u in ("weather://{city}/today", "secrets://{name}")]
PROMPTS = [{"name": n} for n in ("triage_issue", "release_notes")]


@pytest.mark.parametrize(
    ("result", "key", "kept"),
    [
        pytest.param(
            {"tools": TOOLS}, "tools", ["github.search_issues", "weather.get"], id="tools"
        ),
        pytest.param({"resources": RESOURCES}, "resources", ["docs://demo/readme"], id="resources"),
        pytest.param(
            {"resourceTemplates": TEMPLATES},
            "resourceTemplates",
            ["weather://{city}/today"],
            id="templates",
        ),
        pytest.param({"prompts": PROMPTS}, "prompts", ["triage_issue"], id="prompts"),
        pytest.param(
            {"tools": TOOLS, "nextCursor": "c2"},
            "tools",
            ["github.search_issues", "weather.get"],
            id="with-a-cursor",
        ),
        pytest.param(
            {"resources": [], "tools": TOOLS},  # every list is narrowed, not only the first
            "tools",
            ["github.search_issues", "weather.get"],
            id="two-lists",
        ),
        pytest.param(
            {"tools": [*TOOLS, {"title": "nameless"}, "junk"]},
            "tools",
            ["github.search_issues", "weather.get"],
            id="unjudgeable-items-hidden",
        ),
    ],
)
def test_list_filtering(result: dict[str, Any], key: str, kept: list[str]) -> None:
    """By the result's shape, whatever the request's method (an answer replayed on a
    resumed stream has none; a server may answer the wrong id)."""
    body = {"jsonrpc": "2.0", "id": 1, "result": result}
    filtered = filter_list_response(body, RESTRICTED)
    field = {
        "tools": "name",
        "prompts": "name",
        "resources": "uri",
        "resourceTemplates": "uriTemplate",
    }[key]
    assert [item[field] for item in filtered["result"][key]] == kept
    assert filtered["id"] == 1
    assert body["result"] is result and len(result[key]) > len(kept)  # the input is not mutated
    if "nextCursor" in result:
        assert filtered["result"]["nextCursor"] == "c2"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"jsonrpc": "2.0", "id": 1, "result": {"tools": TOOLS[:1]}}, id="all-visible"),
        pytest.param({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}, id="not-a-list"),
        pytest.param({"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "x"}}, id="error"),
        pytest.param(
            {"jsonrpc": "2.0", "id": 1, "result": {"tools": "nope"}}, id="malformed-result"
        ),
        pytest.param(
            {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}, id="notification"
        ),
    ],
)
def test_list_filtering_returns_the_same_object_when_nothing_is_hidden(
    body: dict[str, Any],
) -> None:
    assert filter_list_response(body, RESTRICTED) is body


def test_filtered_list_is_marked_private_for_client_caches() -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"tools": TOOLS, "cacheScope": "public", "ttlMs": 60000},
    }
    filtered = filter_list_response(body, RESTRICTED)
    assert filtered["result"]["cacheScope"] == "private"
    assert filtered["result"]["ttlMs"] == 60000


@pytest.mark.parametrize(
    "message",
    [
        {**req(1, "ping"), "Method": "tools/call", "params": {"name": "github.create_issue"}},
        req(2, "tools/call", name="weather.get", Name="github.create_issue"),
        req(3, "tools/call", name="weather.get", **{"name\x00": "github.create_issue"}),
        req(4, "tools/call", name="weather.get", **{"nAme": "github.create_issue"}),
        {**req(5, "ping"), "metHod": "tools/call"},
        req(6, "resources/read", uri="docs://readme", URI="secrets://deploy-key"),
        req(
            7,
            "completion/complete",
            ref={"type": "ref/prompt", "name": "triage_issue", "Name": "x"},
        ),
        {**req(8, "tools/list"), "param\u017f": {"name": "github.create_issue"}},
        req(
            10,
            "subscriptions/listen",
            notifications={"resourceSubscriptions": [], "ResourceSubscriptions": ["secrets://x"]},
        ),
        req(11, "subscriptions/listen", Notifications={"resourceSubscriptions": ["secrets://x"]}),
        req(
            12,
            "tools/call",
            name="weather.get",
            InputResponses={"e1": {"action": "accept", "content": {"mail": "a@b.c"}}},
        ),
    ],
    ids=[
        "method",
        "name",
        "nul",
        "mixed-case",
        "method-case",
        "uri",
        "ref",
        "long-s",
        "subscriptions",
        "notifications",
        "input-responses",  # the client's answers (2026-07-28), which input rules read
    ],
)
def test_a_member_a_server_could_read_as_another_is_refused(message: dict[str, Any]) -> None:
    """Go's encoding/json matches member names regardless of case (and some decoders drop
    NULs): the gateway would judge one member and the server act on the other."""
    with pytest.raises(JsonRpcError) as refused:
        run(message)
    assert refused.value.status == 400
    answer = orjson.loads(refused.value.answer)
    assert answer["error"]["code"] == ErrorCode.INVALID_REQUEST
    assert answer["id"] == message["id"]
    in_a_batch = run([req(9, "tools/list"), message])  # the whole batch is refused
    assert isinstance(in_a_batch, Answer) and in_a_batch.status == 400


@pytest.mark.parametrize(
    "uri",
    [
        "docs://../secrets/deploy-key",
        "file:///srv/docs/../../etc/passwd",
        "docs://demo/%2e%2e/secrets",
        "docs://demo/..%2Fsecrets",
        "docs://demo\\..\\secrets",
        " secrets://demo/deploy-key",  # a URL parser strips it
        "docs://demo/re\tadme",
        "docs://demo/a%252fb",  # escaped twice
        "https:internal.corp/x",  # https://internal.corp/x to a URL parser
    ],
)
def test_a_resource_uri_a_server_may_resolve_elsewhere_is_refused(uri: str) -> None:
    """``docs://*`` matches ``docs://../secrets/deploy-key`` as text; a server that
    resolves paths reads the secret. Refused, not judged, and never sent."""
    decision = run(req(1, "resources/read", uri=uri))
    assert isinstance(decision, Answer) and decision.status == 400
    assert orjson.loads(decision.body)["error"]["code"] == ErrorCode.INVALID_PARAMS


@pytest.mark.parametrize(
    "uri",
    [
        "weather://m%6Fscow/today",
        "weather://%6d%6f%73%63%6f%77/today",
        "https://INTERNAL.corp/x",
        "https://internal.corp:443/x",
    ],
)
def test_a_resource_uri_is_judged_as_a_server_reads_it(uri: str) -> None:
    """Servers decode escapes and read a URL's host in any case, with or without its
    default port: each of these is the denied resource to them (the SDK's template
    decodes m%6Fscow to moscow)."""
    access = compile_access(
        McpAccess.model_validate(
            {
                "resources": {
                    "allow": ["weather://*", "https://*"],
                    "deny": ["weather://moscow/*", "https://internal.corp/*"],
                }
            }
        )
    )
    assert not access.permits(Kind.RESOURCE, uri)
    assert access.permits(Kind.RESOURCE, "weather://oslo/today")
    assert access.permits(Kind.RESOURCE, "weather://oslo/today?mail=jane%40example.com")


def test_ordinary_escapes_and_urls_without_a_path_are_read_as_servers_read_them() -> None:
    """An escaped space is an ordinary name (filesystem servers list them), and a URL's
    default port goes whether a path follows or a query."""
    assert not unclear_uri("file:///Users/me/My%20Documents/notes.txt")
    assert unclear_uri("%20secrets://key") and unclear_uri("secrets://key%20")
    access = compile_access(
        McpAccess.model_validate(
            {"resources": {"allow": ["file:///*"], "deny": ["file:///Secret Plans/*"]}}
        )
    )
    assert not access.permits(Kind.RESOURCE, "file:///Secret%20Plans/q3.txt")
    assert access.permits(Kind.RESOURCE, "file:///Users/me/My%20Documents/notes.txt")
    assert canonical_uri("https://INTERNAL.corp:443?x=1") == "https://internal.corp?x=1"


def test_a_resource_uri_scheme_is_matched_in_lower_case() -> None:
    access = compile_access(
        McpAccess.model_validate({"resources": {"allow": ["*"], "deny": ["secrets://*"]}})
    )
    assert not access.permits(Kind.RESOURCE, "SECRETS://deploy-key")
    assert access.permits(Kind.RESOURCE, "Docs://demo/readme")
    assert isinstance(run(req(1, "resources/read", uri="DOCS://demo/readme")), Forward)


def test_a_resource_glob_scheme_is_matched_in_lower_case_too() -> None:
    access = compile_access(
        McpAccess.model_validate({"resources": {"allow": ["Docs://*"], "deny": ["SECRETS://*"]}})
    )
    assert access.permits(Kind.RESOURCE, "docs://demo/readme")
    assert access.permits(Kind.RESOURCE, "DOCS://demo/readme")
    assert not access.permits(Kind.RESOURCE, "secrets://deploy-key")
    assert not access.permits(Kind.RESOURCE, "Secrets://deploy-key")


def listen(id_: Any, *uris: Any, **notifications: Any) -> dict[str, Any]:
    """A 2026-07-28 ``subscriptions/listen`` subscribing to ``uris``."""
    return req(
        id_,
        "subscriptions/listen",
        notifications={**notifications, "resourceSubscriptions": list(uris)},
    )


def test_subscriptions_listen_judges_each_uri_as_resources_subscribe_does() -> None:
    """It replaced resources/subscribe in MCP 2026-07-28: unjudged, a caller kept off
    ``secrets://*`` would learn that a secret exists and when it changes."""
    allowed = run(listen(1, "docs://demo/readme", "weather://oslo/today", toolsListChanged=True))
    assert isinstance(allowed, Forward)
    assert allowed.methods == {1: "subscriptions/listen"}
    assert allowed.calls[0].verdict is Verdict.ALLOW
    refused = run(listen(2, "docs://demo/readme", "secrets://prod/db-password"))
    assert isinstance(refused, Answer) and refused.status == 200
    error = orjson.loads(refused.body)["error"]
    assert error["code"] == ErrorCode.FORBIDDEN
    assert error["data"] == {
        "method": "subscriptions/listen",
        "kind": "resource",
        "name": "secrets://prod/db-password",
        "server": "demo",
    }
    assert refused.calls == (
        McpCall(
            "demo",
            "subscriptions/listen",
            Kind.RESOURCE,
            "secrets://prod/db-password",
            2,
            Verdict.DENY,
        ),
    )
    alone = run(req(3, "resources/subscribe", uri="secrets://prod/db-password"))
    assert isinstance(alone, Answer)
    assert orjson.loads(alone.body)["error"]["code"] == error["code"]


@pytest.mark.parametrize(
    "message",
    [
        listen(1, "docs://../secrets/deploy-key"),
        listen(2, "docs://demo/readme", 7),
        listen(3, ""),
        req(4, "subscriptions/listen", notifications={"resourceSubscriptions": "secrets://x"}),
        req(5, "subscriptions/listen", notifications=["secrets://x"]),
    ],
    ids=["dot-segments", "not-a-string", "empty", "not-a-list", "notifications-not-an-object"],
)
def test_subscriptions_listen_with_uris_it_cannot_judge_is_refused(message: dict[str, Any]) -> None:
    decision = run(message)
    assert isinstance(decision, Answer) and decision.status == 400
    assert orjson.loads(decision.body)["error"]["code"] == ErrorCode.INVALID_PARAMS


@pytest.mark.parametrize(
    "message",
    [req(1, "subscriptions/listen"), req(2, "subscriptions/listen", notifications={})],
    ids=["no-params", "no-resources"],
)
def test_subscriptions_listen_without_resources_passes(message: dict[str, Any]) -> None:
    assert isinstance(run(message), Forward)


def test_tasks_update_passes_to_deliver_a_waiting_tasks_input() -> None:
    """MCP 2026-07-28's tasks extension answers a task waiting for input with tasks/update
    (its inputResponses are guarded as the client's answers); refused as unknown, such a
    task could never finish."""
    decision = run(req(3, "tasks/update", taskId="t-1", inputResponses={}))
    assert isinstance(decision, Forward)
