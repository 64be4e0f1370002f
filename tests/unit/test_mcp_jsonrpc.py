"""JSON-RPC bodies as MCP clients send them: single, batch, notification, invalid."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.mcp.jsonrpc import (
    ErrorCode,
    Invalid,
    JsonRpcError,
    Notification,
    Request,
    Response,
    error_response,
    http_status,
    parse_body,
)

SDK_CALL = b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"github.search_issues","arguments":{"query":"x"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}'


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            SDK_CALL,
            Request(3, "tools/call", orjson.loads(SDK_CALL)["params"]),
            id="sdk-tools-call",
        ),
        pytest.param(
            b'{"jsonrpc":"2.0","id":"a-1","method":"tools/list"}',
            Request("a-1", "tools/list", {}),
            id="string-id-no-params",
        ),
        pytest.param(
            b'{"jsonrpc":"2.0","id":0,"method":"ping","params":null}',
            Request(0, "ping", {}),
            id="zero-id-null-params",
        ),
        pytest.param(
            b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
            Notification("notifications/initialized", {}),
            id="notification",
        ),
        pytest.param(
            b'{"jsonrpc":"2.0","id":5,"result":{"roots":[]}}', Response(5), id="client-response"
        ),
        pytest.param(
            b'{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"x"}}',
            Response(None),
            id="client-error-with-null-id",
        ),
    ],
)
def test_single_message(body: bytes, expected: Any) -> None:
    parsed = parse_body(body)
    assert parsed.messages == (expected,)
    assert not parsed.batch
    assert parsed.raw == orjson.loads(body)


def test_batch_keeps_order_indices_and_bad_elements() -> None:
    body = orjson.dumps(
        [
            {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}},
            {"jsonrpc": "1.0", "id": 2, "method": "tools/call"},
            17,
            {"jsonrpc": "2.0", "id": 3, "method": "prompts/get", "params": {"name": "p"}},
        ]
    )
    parsed = parse_body(body)
    assert parsed.batch
    assert parsed.messages == (
        Request(1, "tools/list", {}, 0),
        Notification("notifications/progress", {"progress": 1}, 1),
        Invalid(2, 'Invalid request: "jsonrpc" must be "2.0"', 2),
        Invalid(None, "Invalid request: a message must be a JSON object", 3),
        Request(3, "prompts/get", {"name": "p"}, 4),
    )
    assert [r.id for r in parsed.requests] == [1, 3]


@pytest.mark.parametrize(
    ("body", "code", "id_"),
    [
        pytest.param(b"{not json", ErrorCode.PARSE_ERROR, None, id="not-json"),
        pytest.param(b"", ErrorCode.PARSE_ERROR, None, id="empty-body"),
        pytest.param(b"[]", ErrorCode.INVALID_REQUEST, None, id="empty-batch"),
        pytest.param(b'"tools/call"', ErrorCode.INVALID_REQUEST, None, id="not-object"),
        pytest.param(
            b'{"id":1,"method":"tools/list"}',
            ErrorCode.INVALID_REQUEST,
            1,
            id="no-jsonrpc-keeps-id",
        ),
        pytest.param(
            b'{"jsonrpc":"2.0","id":true,"method":"tools/list"}',
            ErrorCode.INVALID_REQUEST,
            None,
            id="bool-id",
        ),
        pytest.param(
            b'{"jsonrpc":"2.0","id":1.5,"method":"tools/list"}',
            ErrorCode.INVALID_REQUEST,
            None,
            id="fractional-id",
        ),
        pytest.param(
            b'{"jsonrpc":"2.0","id":null,"method":"tools/list"}',
            ErrorCode.INVALID_REQUEST,
            None,
            id="null-id-request",
        ),
        pytest.param(
            b'{"jsonrpc":"2.0","id":4,"method":""}', ErrorCode.INVALID_REQUEST, 4, id="empty-method"
        ),
        pytest.param(
            b'{"jsonrpc":"2.0","id":4,"method":"tools/call","params":["x"]}',
            ErrorCode.INVALID_REQUEST,
            4,
            id="positional-params",
        ),
        pytest.param(
            b'{"jsonrpc":"2.0","id":4,"result":{},"error":{}}',
            ErrorCode.INVALID_REQUEST,
            4,
            id="result-and-error",
        ),
        pytest.param(
            b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":1,"method":"tools/list"}]',
            ErrorCode.INVALID_REQUEST,
            None,
            id="duplicate-ids-in-batch",
        ),
        pytest.param(
            orjson.dumps([{"jsonrpc": "2.0", "method": "notifications/x"}] * 101),
            ErrorCode.INVALID_REQUEST,
            None,
            id="batch-past-100",
        ),
    ],
)
def test_unusable_body(body: bytes, code: ErrorCode, id_: Any) -> None:
    with pytest.raises(JsonRpcError) as caught:
        parse_body(body)
    error = caught.value
    assert (error.code, error.id, error.status) == (code, id_, 400)
    answer = orjson.loads(error.answer)
    assert answer["jsonrpc"] == "2.0"
    assert answer["id"] == id_
    assert answer["error"]["code"] == code


def test_error_response_shape() -> None:
    assert error_response("x", ErrorCode.FORBIDDEN, "no", {"name": "t"}) == {
        "jsonrpc": "2.0",
        "id": "x",
        "error": {"code": -32010, "message": "no", "data": {"name": "t"}},
    }
    assert "data" not in error_response(1, ErrorCode.FORBIDDEN, "no")["error"]


@pytest.mark.parametrize(
    ("codes", "status"),
    [
        pytest.param([ErrorCode.FORBIDDEN], 200, id="policy-refusal-is-a-jsonrpc-answer"),
        pytest.param([ErrorCode.FORBIDDEN, ErrorCode.BATCH_REJECTED], 200, id="batch-refusal"),
        pytest.param(
            [ErrorCode.FORBIDDEN, ErrorCode.INVALID_REQUEST], 400, id="any-malformed-is-400"
        ),
        pytest.param([ErrorCode.METHOD_NOT_FOUND], 200, id="unknown-method"),
    ],
)
def test_http_status(codes: list[ErrorCode], status: int) -> None:
    assert http_status(codes) == status
