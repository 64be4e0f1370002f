"""OpenAI chat request → Anthropic Messages request: what is translated, dropped, refused.

Each case is the OpenAI body a caller sends and the exact Anthropic body that leaves
the gateway. Recorded OpenAI traffic (``../shared/data/cassettes/openai``) is translated
too: every body either translates or is refused with the field named, never a crash.
"""

from __future__ import annotations

import copy
import itertools
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from extproc.errors import InvalidRequest
from extproc.translate import request_to_anthropic

UPSTREAM = "claude-sonnet-4-5-20250929"
DEFAULT_CAP = 4096
CASSETTES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cassettes" / "openai"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
WEATHER_OUT = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet", "messages": list(messages), **fields}


def anthropic(*turns: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": UPSTREAM, "max_tokens": DEFAULT_CAP, "messages": list(turns), **fields}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def turn(role: str, *blocks: dict[str, Any]) -> dict[str, Any]:
    return {"role": role, "content": list(blocks)}


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_use(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


HI = user("Hi")
HI_OUT = turn("user", text("Hi"))

TRANSLATED = [
    pytest.param(chat(HI), anthropic(HI_OUT), id="minimal-default-cap"),
    pytest.param(
        chat({"role": "system", "content": "Be terse."}, HI),
        anthropic(HI_OUT, system="Be terse."),
        id="one-system-message-is-a-string",
    ),
    pytest.param(
        chat(
            {"role": "system", "content": "Be terse."},
            HI,
            {"role": "developer", "content": [text("Answer in French.")]},
            {"role": "assistant", "content": "Salut"},
        ),
        anthropic(
            HI_OUT,
            turn("assistant", text("Salut")),
            system=[text("Be terse."), text("Answer in French.")],
        ),
        id="system-and-developer-anywhere-are-hoisted-in-order",
    ),
    pytest.param(
        chat({"role": "developer", "content": "Say hello."}),
        anthropic(turn("user", text("Say hello."))),
        id="developer-only-conversation-becomes-the-user-turn",
    ),
    pytest.param(
        chat(
            {"role": "system", "content": "Be terse."},
            user("Write a haiku."),
            {"role": "assistant", "content": "Old pond"},
            {"role": "developer", "content": "Now translate it into French."},
        ),
        anthropic(
            turn("user", text("Write a haiku.")),
            turn("assistant", text("Old pond")),
            turn("user", text("Now translate it into French.")),
            system="Be terse.",
        ),
        id="instructions-after-the-answer-are-the-next-user-turn-not-a-prefill",
    ),
    pytest.param(
        chat(
            user(
                [
                    text("What is in these?"),
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"},
                    },
                    {"type": "image_url", "image_url": {"url": "data:image/jpg;base64,/9j/4AAQ"}},
                ]
            )
        ),
        anthropic(
            turn(
                "user",
                text("What is in these?"),
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"},
                },
            )
        ),
        id="text-and-images-data-url-and-http-url",
    ),
    pytest.param(
        chat(
            user(
                [
                    {
                        "type": "file",
                        "file": {
                            "filename": "report.pdf",
                            "file_data": "data:application/pdf;base64,JVBERi0x",
                        },
                    },
                    {"text": "Summarise it."},
                ]
            )
        ),
        anthropic(
            turn(
                "user",
                {
                    "type": "document",
                    "source": {
                        "type": "base64",
                        "media_type": "application/pdf",
                        "data": "JVBERi0x",
                    },
                    "title": "report.pdf",
                },
                text("Summarise it."),
            )
        ),
        id="inline-pdf-and-untyped-text-part",
    ),
    pytest.param(
        chat(
            HI,
            user("Are you there?"),
            {"role": "assistant", "content": "Yes."},
            {"role": "assistant", "content": [text("How can I help?")]},
        ),
        anthropic(
            turn("user", text("Hi"), text("Are you there?")),
            turn("assistant", text("Yes."), text("How can I help?")),
        ),
        id="consecutive-same-role-messages-merge",
    ),
    pytest.param(
        chat(
            user("Weather in Paris and Rome?"),
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    call("call_1", "get_weather", '{"city": "Paris"}'),
                    call("call_2", "get_weather", '{"city":"Rome"}'),
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [text("21C"), text(" sunny")]},
            user("And tomorrow?"),
            tools=[WEATHER],
        ),
        anthropic(
            turn("user", text("Weather in Paris and Rome?")),
            turn(
                "assistant",
                text("Checking both."),
                tool_use("call_1", "get_weather", {"city": "Paris"}),
                tool_use("call_2", "get_weather", {"city": "Rome"}),
            ),
            turn(
                "user",
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": [text("21C"), text(" sunny")],
                },
                text("And tomorrow?"),
            ),
            tools=[WEATHER_OUT],
        ),
        id="tool-calls-and-results-in-one-user-turn",
    ),
    pytest.param(
        chat(
            HI,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call("functions.now:0", "now", "")],
            },
            {"role": "tool", "tool_call_id": "functions.now:0", "content": ""},
        ),
        anthropic(
            HI_OUT,
            turn("assistant", tool_use("functions_now_0", "now", {})),
            turn("user", {"type": "tool_result", "tool_use_id": "functions_now_0"}),
            # No tools sent: Anthropic wants the tools the history used defined.
            tools=[{"name": "now", "input_schema": {"type": "object"}}],
            tool_choice={"type": "none"},
        ),
        id="foreign-tool-ids-rewritten-alike-empty-arguments-and-result",
    ),
    pytest.param(
        chat(HI, {"role": "assistant", "content": None, "refusal": "I can't help with that."}),
        anthropic(HI_OUT, turn("assistant", text("I can't help with that."))),
        id="assistant-refusal-is-its-text",
    ),
    pytest.param(
        chat(
            {
                "role": "system",
                "content": [
                    {
                        "type": "text",
                        "text": "Long rules.",
                        "prompt_cache_breakpoint": {"mode": "explicit"},
                    }
                ],
            },
            user(
                [
                    {
                        "type": "text",
                        "text": "Hi",
                        "cache_control": {"type": "ephemeral", "ttl": "1h"},
                    }
                ]
            ),
        ),
        anthropic(
            turn(
                "user",
                {"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
            ),
            system=[
                {"type": "text", "text": "Long rules.", "cache_control": {"type": "ephemeral"}}
            ],
        ),
        id="cache-breakpoints-become-cache-control",
    ),
    pytest.param(
        chat(
            HI,
            tools=[
                {"type": "function", "function": {"name": "now", "strict": True}},
                {
                    "type": "function",
                    "function": {
                        "name": "echo",
                        "parameters": {"properties": {"s": {"type": "string"}}},
                    },
                },
            ],
        ),
        anthropic(
            HI_OUT,
            tools=[
                {
                    "name": "now",
                    "input_schema": {"type": "object", "properties": {}},
                    "strict": True,
                },
                {
                    "name": "echo",
                    "input_schema": {"type": "object", "properties": {"s": {"type": "string"}}},
                },
            ],
        ),
        id="tools-without-parameters-or-type-get-an-object-schema",
    ),
    pytest.param(
        chat(HI, max_tokens=100, max_completion_tokens=50),
        {**anthropic(HI_OUT), "max_tokens": 50},
        id="max-completion-tokens-wins",
    ),
    pytest.param(
        chat(HI, max_tokens=100), {**anthropic(HI_OUT), "max_tokens": 100}, id="legacy-max-tokens"
    ),
    pytest.param(
        chat(HI, temperature=0.2, top_k=40, stop="END"),
        anthropic(HI_OUT, temperature=0.2, top_k=40, stop_sequences=["END"]),
        id="sampling-and-stop-string",
    ),
    pytest.param(chat(HI, top_p=0.9), anthropic(HI_OUT, top_p=0.9), id="top-p-alone"),
    pytest.param(
        # A last assistant message is a prefill to Anthropic, which refuses one ending in
        # whitespace: OpenAI clients send "Here is one: " freely.
        chat(HI, {"role": "assistant", "content": "Here is one: "}),
        anthropic(HI_OUT, turn("assistant", text("Here is one:"))),
        id="prefill-without-trailing-whitespace",
    ),
    pytest.param(
        chat(
            HI,
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "a "}, {"type": "text", "text": " \n"}],
            },
        ),
        anthropic(HI_OUT, turn("assistant", text("a"))),
        id="prefill-whose-last-part-is-whitespace-only",
    ),
    pytest.param(
        # Many clients send top_p: 1 by default; beside a temperature it would be refused.
        chat(HI, temperature=0.7, top_p=1),
        anthropic(HI_OUT, temperature=0.7),
        id="top-p-of-1-is-no-setting",
    ),
    pytest.param(
        chat(HI, stop=["a", "b"]), anthropic(HI_OUT, stop_sequences=["a", "b"]), id="stop-list"
    ),
    pytest.param(chat(HI, stop=[]), anthropic(HI_OUT), id="empty-stop-list"),
    pytest.param(
        chat(HI, stream=True, stream_options={"include_usage": True}),
        anthropic(HI_OUT, stream=True),
        id="stream-usage-always-comes-from-anthropic",
    ),
    pytest.param(chat(HI, stream=False), anthropic(HI_OUT), id="stream-false"),
    pytest.param(chat(HI, user="u-42"), anthropic(HI_OUT, metadata={"user_id": "u-42"}), id="user"),
    pytest.param(
        chat(HI, safety_identifier="hash-9"),
        anthropic(HI_OUT, metadata={"user_id": "hash-9"}),
        id="safety-identifier",
    ),
    pytest.param(
        chat(
            HI,
            seed=7,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            verbosity="low",
            store=True,
            metadata={"app": "x"},
            service_tier="auto",
            prediction={"type": "content", "content": "x"},
            prompt_cache_key="k",
            prompt_cache_options={"mode": "implicit"},
            prompt_cache_retention="24h",
            n=1,
            logprobs=False,
            top_logprobs=0,
            logit_bias={},
            response_format={"type": "text"},
            modalities=["text"],
            reasoning_effort="none",
        ),
        anthropic(HI_OUT),
        id="hints-bookkeeping-and-defaults-dropped",
    ),
    pytest.param(
        chat(HI, temperature=None, n=None, stop=None, tools=None, tool_choice=None, user=None),
        anthropic(HI_OUT),
        id="nulls-read-as-absent",
    ),
]


@pytest.mark.parametrize(("body", "expected"), TRANSLATED)
def test_translation(body: dict[str, Any], expected: dict[str, Any]) -> None:
    before = copy.deepcopy(body)
    assert request_to_anthropic(body, UPSTREAM, DEFAULT_CAP) == expected
    assert body == before, "the caller's body is never modified"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"tool_choice": "auto"}, {"type": "auto"}, id="auto"),
        pytest.param({"tool_choice": "none"}, {"type": "none"}, id="none"),
        pytest.param({"tool_choice": "required"}, {"type": "any"}, id="required"),
        pytest.param(
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            {"type": "tool", "name": "get_weather"},
            id="named",
        ),
        pytest.param(
            {"parallel_tool_calls": False},
            {"type": "auto", "disable_parallel_tool_use": True},
            id="serial-calls",
        ),
        pytest.param(
            {"tool_choice": "required", "parallel_tool_calls": False},
            {"type": "any", "disable_parallel_tool_use": True},
            id="required-serial",
        ),
        pytest.param(
            {"tool_choice": "none", "parallel_tool_calls": False},
            {"type": "none"},
            id="none-serial",
        ),
        pytest.param({"parallel_tool_calls": True}, None, id="parallel-is-the-default"),
    ],
)
def test_tool_choice(fields: dict[str, Any], expected: dict[str, Any] | None) -> None:
    out = request_to_anthropic(chat(HI, tools=[WEATHER], **fields), UPSTREAM, DEFAULT_CAP)
    assert out.get("tool_choice") == expected
    assert out["tools"] == [WEATHER_OUT]


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_harmless_tool_choice_without_tools_is_dropped(choice: str) -> None:
    out = request_to_anthropic(chat(HI, tool_choice=choice, tools=[]), UPSTREAM, DEFAULT_CAP)
    assert "tool_choice" not in out and "tools" not in out


AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}}
BAD_CALL = {"role": "assistant", "tool_calls": [call("call_1", "f", '{"secret": "hunter2"')]}

REJECTED = [
    pytest.param(chat(HI, n=2), "n", "unsupported_value", id="n"),
    pytest.param(chat(HI, logprobs=True), "logprobs", "unsupported_value", id="logprobs"),
    pytest.param(chat(HI, top_logprobs=3), "top_logprobs", "unsupported_value", id="top-logprobs"),
    pytest.param(
        chat(HI, logit_bias={"50256": -100}), "logit_bias", "unsupported_value", id="logit-bias"
    ),
    pytest.param(
        chat(
            HI, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
        ),
        "response_format",
        "unsupported_value",
        id="json-schema",
    ),
    pytest.param(
        chat(HI, response_format={"type": "json_object"}),
        "response_format",
        "unsupported_value",
        id="json-mode",
    ),
    pytest.param(
        chat(HI, modalities=["text", "audio"]), "modalities", "unsupported_value", id="audio-out"
    ),
    pytest.param(
        chat(HI, audio={"voice": "alloy", "format": "wav"}),
        "audio",
        "unsupported_parameter",
        id="audio",
    ),
    pytest.param(
        chat(HI, reasoning_effort="high"), "reasoning_effort", "unsupported_value", id="reasoning"
    ),
    pytest.param(
        # Claude models since Opus 4.1 refuse the two together, with a 400 naming neither.
        chat(HI, temperature=0.7, top_p=0.9),
        "top_p",
        "unsupported_value",
        id="temperature-and-top-p",
    ),
    pytest.param(
        chat(HI, web_search_options={}),
        "web_search_options",
        "unsupported_parameter",
        id="web-search",
    ),
    pytest.param(
        chat(HI, moderation={"model": "omni-moderation-latest"}),
        "moderation",
        "unsupported_parameter",
        id="moderation",
    ),
    pytest.param(
        chat(HI, functions=[{"name": "f"}]),
        "functions",
        "unsupported_parameter",
        id="legacy-functions",
    ),
    pytest.param(
        chat(HI, function_call="auto"),
        "function_call",
        "unsupported_parameter",
        id="legacy-function-call",
    ),
    pytest.param(chat(HI, frobnicate=True), "frobnicate", "unknown_parameter", id="unknown-field"),
    pytest.param(
        chat(HI, temperature=1.5),
        "temperature",
        "unsupported_value",
        id="temperature-above-claude-range",
    ),
    pytest.param(
        chat(HI, temperature=-0.1), "temperature", "invalid_value", id="negative-temperature"
    ),
    pytest.param(chat(HI, temperature="hot"), "temperature", "invalid_type", id="temperature-type"),
    pytest.param(chat(HI, max_tokens=0), "max_tokens", "integer_below_min_value", id="zero-cap"),
    pytest.param(
        chat(HI, max_completion_tokens="10"), "max_completion_tokens", "invalid_type", id="cap-type"
    ),
    pytest.param(chat(HI, stop=["ok", 1]), "stop[1]", "invalid_type", id="stop-item"),
    pytest.param(chat(HI, stream="yes"), "stream", "invalid_type", id="stream-type"),
    pytest.param(
        chat(HI, BAD_CALL),
        "messages[1].tool_calls[0].function.arguments",
        "invalid_value",
        id="arguments-not-json",
    ),
    pytest.param(
        chat(HI, {"role": "assistant", "tool_calls": [call("call_1", "f", "[1, 2]")]}),
        "messages[1].tool_calls[0].function.arguments",
        "invalid_value",
        id="arguments-not-an-object",
    ),
    pytest.param(
        chat(
            HI,
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c", "type": "custom", "custom": {"name": "f", "input": "x"}}
                ],
            },
        ),
        "messages[1].tool_calls[0].type",
        "invalid_value",
        id="custom-tool-call",
    ),
    pytest.param(
        chat(HI, {"role": "assistant", "tool_calls": [call("", "f", "{}")]}),
        "messages[1].tool_calls[0].id",
        "invalid_value",
        id="empty-call-id",
    ),
    pytest.param(
        chat(HI, {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}),
        "messages[1].function_call",
        "unsupported_parameter",
        id="assistant-function-call",
    ),
    pytest.param(
        chat(HI, {"role": "function", "name": "f", "content": "1"}),
        "messages[1].role",
        "unsupported_value",
        id="function-role",
    ),
    pytest.param(
        chat({"role": "robot", "content": "x"}),
        "messages[0].role",
        "invalid_value",
        id="unknown-role",
    ),
    pytest.param(
        chat(HI, {"role": "tool", "content": "1"}),
        "messages[1].tool_call_id",
        "missing_required_parameter",
        id="tool-without-call-id",
    ),
    pytest.param(
        chat(user([text("Listen"), AUDIO])),
        "messages[0].content[1].type",
        "unsupported_value",
        id="audio-in",
    ),
    pytest.param(
        chat(
            {
                "role": "system",
                "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
            },
            HI,
        ),
        "messages[0].content[0].type",
        "unsupported_value",
        id="image-in-system",
    ),
    pytest.param(
        chat(user([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}])),
        "messages[0].content[0].image_url.url",
        "invalid_value",
        id="image-scheme",
    ),
    pytest.param(
        chat(user([{"type": "image_url", "image_url": {"url": "data:image/png,plain"}}])),
        "messages[0].content[0].image_url.url",
        "invalid_value",
        id="image-data-url-not-base64",
    ),
    pytest.param(
        chat(
            user(
                [{"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64,PHN2Zz4="}}]
            )
        ),
        "messages[0].content[0].image_url.url",
        "invalid_value",
        id="image-type",
    ),
    pytest.param(
        chat(user([{"type": "file", "file": {"file_id": "file-abc"}}])),
        "messages[0].content[0].file.file_data",
        "unsupported_value",
        id="openai-file-id",
    ),
    pytest.param(
        chat(user([{"type": "file", "file": {"file_data": "data:text/csv;base64,YSxi"}}])),
        "messages[0].content[0].file.file_data",
        "invalid_value",
        id="file-not-pdf",
    ),
    pytest.param(
        chat(user(None)),
        "messages[0].content",
        "missing_required_parameter",
        id="user-content-null",
    ),
    pytest.param(chat(), "messages", "empty_array", id="no-messages"),
    pytest.param(
        chat(user(""), {"role": "assistant", "content": ""}),
        "messages",
        "invalid_value",
        id="only-empty-messages",
    ),
    pytest.param(
        chat(HI, tools=[{"type": "custom", "custom": {"name": "x"}}]),
        "tools[0].type",
        "invalid_value",
        id="custom-tool",
    ),
    pytest.param(
        chat(HI, tools=[{"type": "function"}]),
        "tools[0].function",
        "missing_required_parameter",
        id="tool-without-function",
    ),
    pytest.param(
        chat(HI, tool_choice="required"),
        "tool_choice",
        "invalid_value",
        id="required-without-tools",
    ),
    pytest.param(
        chat(HI, tools=[WEATHER], tool_choice="sometimes"),
        "tool_choice",
        "invalid_value",
        id="tool-choice-value",
    ),
    pytest.param(
        chat(HI, tools=[WEATHER], tool_choice={"type": "allowed_tools", "allowed_tools": {}}),
        "tool_choice.type",
        "invalid_value",
        id="allowed-tools",
    ),
    pytest.param(
        chat(HI, tools=[WEATHER], parallel_tool_calls="no"),
        "parallel_tool_calls",
        "invalid_type",
        id="parallel-type",
    ),
    pytest.param(chat(HI, stop="\n"), "stop", "unsupported_value", id="stop-newline"),
    pytest.param(chat(HI, stop=["END", " "]), "stop[1]", "unsupported_value", id="stop-space"),
]


@pytest.mark.parametrize(("body", "param", "code"), REJECTED)
def test_rejection_names_the_field(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        request_to_anthropic(body, UPSTREAM, DEFAULT_CAP)
    assert (caught.value.param, caught.value.code) == (param, code)
    assert caught.value.status == 400
    assert param in caught.value.message
    assert "hunter2" not in caught.value.message, "prompt content is never echoed"


def test_unsupported_field_message_says_why() -> None:
    with pytest.raises(InvalidRequest, match="Claude returns one choice per request"):
        request_to_anthropic(chat(HI, n=3), UPSTREAM, DEFAULT_CAP)


# --------------------------------------------------------------------------- recorded traffic

# Recorded bodies Claude cannot honour, and the field each is refused for.
RECORDED_REFUSALS = {
    "chat-audio-to-text": "messages[0].content[1].type",
    "chat-bad-request": "messages[0].content",
    "chat-json-mode": "response_format",
    "chat-no-messages": "messages",
    "chat-openai-agents-python": "response_format",
    "chat-streaming-web-search": "web_search_options",
    "chat-text-to-audio": "audio",
    "chat-web-search": "web_search_options",
}


def recorded_chat_bodies() -> list[Any]:
    cases = []
    for file in sorted(CASSETTES.glob("*.yaml")):
        for interaction in yaml.safe_load(file.read_text())["interactions"]:
            request = interaction["request"]
            if request["url"].endswith("/chat/completions"):
                cases.append(pytest.param(file.stem, orjson.loads(request["body"]), id=file.stem))
    return cases


def test_recorded_chat_bodies_are_present() -> None:
    assert len(recorded_chat_bodies()) >= 15, f"the shared data sets are missing: {CASSETTES}"


@pytest.mark.parametrize(("name", "body"), recorded_chat_bodies())
def test_recorded_bodies_translate_or_name_the_field(name: str, body: dict[str, Any]) -> None:
    if name in RECORDED_REFUSALS:
        with pytest.raises(InvalidRequest) as caught:
            request_to_anthropic(body, UPSTREAM, DEFAULT_CAP)
        assert caught.value.param == RECORDED_REFUSALS[name]
        return
    out = request_to_anthropic(body, UPSTREAM, DEFAULT_CAP)
    assert out["model"] == UPSTREAM and out["max_tokens"] > 0
    roles = [t["role"] for t in out["messages"]]
    assert all(a != b for a, b in itertools.pairwise(roles)), "turns alternate"
    assert all(t["content"] for t in out["messages"]), "no empty turn"


def test_junk_anywhere_is_an_invalid_request_never_a_crash() -> None:
    """Replace random nodes of valid bodies with values of every JSON type."""
    rng = random.Random(20261122)
    seeds: list[Any] = [p.values[0] for p in TRANSLATED]
    junk: list[Any] = [None, True, 0, -1, 2.5, "", "x", [], [None], {}, {"type": None}]
    for _ in range(3000):
        body = copy.deepcopy(rng.choice(seeds))
        node: Any = body
        path = []
        while isinstance(node, dict | list) and node and rng.random() < 0.8:
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            path.append((node, key))
            node = node[key]
        if not path:
            continue
        parent, key = path[-1]
        parent[key] = rng.choice(junk)
        try:
            out = request_to_anthropic(body, UPSTREAM, DEFAULT_CAP)
        except InvalidRequest as error:
            assert error.param is not None
        else:
            orjson.dumps(out)


def test_texts_of_whitespace_alone_are_left_out() -> None:
    """Anthropic refuses a text block of whitespace alone (a replayed assistant turn of
    "\n" is common); such a text carries nothing for the model either."""
    body = chat(
        HI,
        {"role": "assistant", "content": "\n"},
        {
            "role": "user",
            "content": [{"type": "text", "text": " "}, {"type": "text", "text": "Go"}],
        },
    )
    out = request_to_anthropic(body, UPSTREAM, DEFAULT_CAP)
    texts = [b["text"] for t in out["messages"] for b in t["content"] if b["type"] == "text"]
    assert all(text.strip() for text in texts) and "Go" in texts


def test_a_last_message_of_whitespace_alone_is_refused_not_a_prefill() -> None:
    """Left out, it left the conversation ending on the model's answer, which Claude then
    continued instead of answering: the caller is told which message is empty."""
    body = chat(HI, {"role": "assistant", "content": "Hello!"}, user(" "))
    with pytest.raises(InvalidRequest) as refused:
        request_to_anthropic(body, UPSTREAM, DEFAULT_CAP)
    assert refused.value.param == "messages[2].content"


def test_a_tool_result_of_whitespace_alone_is_sent_without_content() -> None:
    """As a part of whitespace alone is: Anthropic refuses text of whitespace alone."""
    body = chat(
        HI,
        {"role": "assistant", "content": None, "tool_calls": [call("c1", "ls", "{}")]},
        {"role": "tool", "tool_call_id": "c1", "content": "\n"},
    )
    out = request_to_anthropic(body, UPSTREAM, DEFAULT_CAP)
    assert out["messages"][-1]["content"] == [{"type": "tool_result", "tool_use_id": "c1"}]
