"""Anthropic answers → OpenAI answers: messages, finish reasons, usage and errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.dialects.usage import usage_from_body
from extproc.translate import error_from_anthropic, response_from_anthropic

MODEL = "claude-sonnet"
CREATED = 1_767_225_600

TOOL_MESSAGE: dict[str, Any] = {
    "id": "msg_01Aq9w938a90dw8q",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {"type": "thinking", "thinking": "Weather needs a tool.", "signature": "EqQB"},
        {"type": "text", "text": "Let me check "},
        {"type": "text", "text": "both cities."},
        {
            "type": "tool_use",
            "id": "toolu_01A09q90qw90lq917835lq9",
            "name": "get_weather",
            "input": {"location": "San Francisco, CA", "unit": "celsius", "note": "é ✓"},
        },
        {"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 12,
        "cache_creation_input_tokens": 30,
        "cache_read_input_tokens": 2000,
        "output_tokens": 80,
        "output_tokens_details": {"thinking_tokens": 20},
    },
}


def test_text_and_tool_calls() -> None:
    out = response_from_anthropic(TOOL_MESSAGE, MODEL, created=CREATED)
    assert out == {
        "id": "msg_01Aq9w938a90dw8q",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me check both cities.",
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": "toolu_01A09q90qw90lq917835lq9",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": '{"location":"San Francisco, CA","unit":"celsius","note":"é ✓"}',
                            },
                        },
                        {
                            "id": "toolu_02",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"},
                        },
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 2042,
            "completion_tokens": 80,
            "total_tokens": 2122,
            "prompt_tokens_details": {"cached_tokens": 2000, "cache_write_tokens": 30},
            "completion_tokens_details": {"reasoning_tokens": 20},
        },
        "system_fingerprint": None,
    }


def test_tool_calls_only_have_null_content() -> None:
    body = {**TOOL_MESSAGE, "content": TOOL_MESSAGE["content"][3:]}
    message = response_from_anthropic(body, MODEL)["choices"][0]["message"]
    assert message["content"] is None and len(message["tool_calls"]) == 2


def test_plain_answer() -> None:
    body = {
        "id": "msg_1",
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 10, "output_tokens": 3},
    }
    out = response_from_anthropic(body, MODEL)
    assert out["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello!",
        "refusal": None,
    }
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
    }
    assert isinstance(out["created"], int) and out["created"] > 1_700_000_000


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("a_reason_from_the_future", "stop"),
        (None, "stop"),
    ],
)
def test_finish_reasons(stop_reason: str | None, finish: str) -> None:
    body: dict[str, Any] = {"content": [], "stop_reason": stop_reason}
    assert response_from_anthropic(body, MODEL)["choices"][0]["finish_reason"] == finish


def test_usage_reads_the_same_to_the_gateway_meter() -> None:
    """The caller's usage block counts what the gateway charges (which it reads from the
    Anthropic answer itself), cache writes included (``cache_write_tokens``)."""
    translated = usage_from_body("openai.chat", response_from_anthropic(TOOL_MESSAGE, MODEL))
    metered = usage_from_body("anthropic.messages", TOOL_MESSAGE)
    assert metered is not None and metered.cache_write_input_tokens > 0
    assert translated == metered


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"content": None, "usage": "x"},
        {"content": ["x", {"type": "text"}, {"type": "tool_use"}]},
    ],
    ids=["empty", "wrong-types", "malformed-blocks"],
)
def test_malformed_answer_is_an_empty_completion(body: dict[str, Any]) -> None:
    out = response_from_anthropic(body, MODEL)
    assert out["object"] == "chat.completion" and out["usage"]["total_tokens"] == 0
    orjson.dumps(out)


def anthropic_error(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


ERRORS = [
    pytest.param(
        400,
        anthropic_error("invalid_request_error", "max_tokens: Field required"),
        "invalid_request_error",
        "invalid_request",
        "max_tokens: Field required",
        id="400",
    ),
    pytest.param(
        401,
        anthropic_error("authentication_error", "invalid x-api-key"),
        "invalid_request_error",
        "invalid_api_key",
        "invalid x-api-key",
        id="401",
    ),
    pytest.param(
        402,
        anthropic_error("billing_error", "Your credit balance is too low"),
        "insufficient_quota",
        "insufficient_quota",
        "Your credit balance is too low",
        id="402",
    ),
    pytest.param(
        403,
        anthropic_error("permission_error", "no access"),
        "invalid_request_error",
        "permission_denied",
        "no access",
        id="403",
    ),
    pytest.param(
        404,
        anthropic_error("not_found_error", "model: claude-x"),
        "invalid_request_error",
        "not_found",
        "model: claude-x",
        id="404",
    ),
    pytest.param(
        413,
        anthropic_error("request_too_large", "Request exceeds the maximum size"),
        "invalid_request_error",
        "request_too_large",
        "Request exceeds the maximum size",
        id="413",
    ),
    pytest.param(
        429,
        anthropic_error("rate_limit_error", "Number of request tokens has exceeded"),
        "rate_limit_error",
        "rate_limit_exceeded",
        "Number of request tokens has exceeded",
        id="429",
    ),
    pytest.param(
        500,
        anthropic_error("api_error", "Internal server error"),
        "server_error",
        "upstream_error",
        "Internal server error",
        id="500",
    ),
    pytest.param(
        504,
        anthropic_error("timeout_error", "Request timed out"),
        "server_error",
        "timeout",
        "Request timed out",
        id="504",
    ),
    pytest.param(
        529,
        anthropic_error("overloaded_error", "Overloaded"),
        "server_error",
        "overloaded",
        "Overloaded",
        id="529",
    ),
    pytest.param(
        503,
        anthropic_error("brand_new_error", "Something new"),
        "server_error",
        "upstream_error",
        "Something new",
        id="unknown-type-5xx",
    ),
    pytest.param(
        429,
        anthropic_error("brand_new_error", "Slow down"),
        "rate_limit_error",
        "rate_limit_exceeded",
        "Slow down",
        id="unknown-type-429",
    ),
    pytest.param(
        422,
        anthropic_error("brand_new_error", "Nope"),
        "invalid_request_error",
        "invalid_request",
        "Nope",
        id="unknown-type-4xx",
    ),
    pytest.param(
        502,
        b"<html><body>Bad gateway: secret-host-1</body></html>",
        "server_error",
        "upstream_error",
        "The upstream provider answered with HTTP 502.",
        id="html",
    ),
    pytest.param(
        500,
        b"",
        "server_error",
        "upstream_error",
        "The upstream provider answered with HTTP 500.",
        id="empty",
    ),
    pytest.param(
        400,
        b"[1, 2]",
        "invalid_request_error",
        "invalid_request",
        "The upstream provider answered with HTTP 400.",
        id="json-not-object",
    ),
    pytest.param(
        400,
        b'{"type":"error","error":"flat"}',
        "invalid_request_error",
        "invalid_request",
        "The upstream provider answered with HTTP 400.",
        id="flat-error",
    ),
]


@pytest.mark.parametrize(("status", "body", "kind", "code", "message"), ERRORS)
def test_error_mapping(status: int, body: bytes, kind: str, code: str, message: str) -> None:
    assert orjson.loads(error_from_anthropic(status, body)) == {
        "error": {"message": message, "type": kind, "code": code, "param": None}
    }


def test_a_prompt_past_the_context_window_has_openais_code() -> None:
    """Clients trim their history on ``context_length_exceeded``: it was ``invalid_request``."""
    body = anthropic_error(
        "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"
    )
    assert orjson.loads(error_from_anthropic(400, body))["error"] == {
        "message": "prompt is too long: 210000 tokens > 200000 maximum",
        "type": "invalid_request_error",
        "code": "context_length_exceeded",
        "param": "messages",
    }


def test_openai_shaped_error_passes_unchanged() -> None:
    body = b'{"error":{"message":"Budget exceeded","type":"rate_limit_error","code":"budget_exceeded","param":null}}'
    assert error_from_anthropic(429, body) is body
