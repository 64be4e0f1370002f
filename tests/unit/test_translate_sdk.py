"""The official SDKs read what the translation produces.

A tiny aiohttp server plays the gateway in front of a scripted Claude: it translates the
OpenAI request the ``openai`` SDK sends (and records the Anthropic body), then answers
with a scripted Anthropic answer translated back — streamed in random chunk sizes, as
JSON, or as an error. The ``anthropic`` SDK reads the same scripted stream from
``/v1/messages``, so streamed and non-streamed translations can be compared through the
two SDKs' own accumulators.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from extproc.dialects.envelopes import render_error
from extproc.errors import InvalidRequest
from extproc.translate import (
    StreamTranslator,
    error_from_anthropic,
    request_to_anthropic,
    response_from_anthropic,
)
from tests.unit.test_translate_stream import ANTHROPIC_SSE, TEXT, WEATHER_ARGS

UPSTREAM = "claude-upstream-test"
MODEL = "claude-sonnet"
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}
QUESTION: Any = [{"role": "user", "content": "Weather in San Francisco, and the time?"}]


@dataclass
class Script:
    """What the fake Claude answers next, and what reached it."""

    status: int = 200
    body: bytes = ANTHROPIC_SSE
    seed: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Stage:
    """Holds the current test's script; the app is shared by the module's tests."""

    script: Script = field(default_factory=Script)


STAGE = web.AppKey("stage", Stage)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    script = request.app[STAGE].script
    body = await request.json()
    try:
        upstream_body = request_to_anthropic(body, UPSTREAM, 1024)
    except InvalidRequest as error:
        reply = render_error(error, "openai")
        return web.Response(status=reply.status, body=reply.body, content_type="application/json")
    script.seen.append(upstream_body)
    if script.status != 200:
        translated = error_from_anthropic(script.status, script.body)
        return web.Response(status=script.status, body=translated, content_type="application/json")
    if not upstream_body.get("stream"):
        answer = response_from_anthropic(orjson.loads(script.body), body["model"])
        return web.Response(body=orjson.dumps(answer), content_type="application/json")
    options = body.get("stream_options") or {}
    translator = StreamTranslator(body["model"], include_usage=options.get("include_usage") is True)
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    rng = random.Random(script.seed)
    at = 0
    while at < len(script.body):
        step = rng.randint(1, 64)
        out = translator.feed(script.body[at : at + step])
        at += step
        if out:
            await response.write(out)
    await response.write(translator.finish())
    await response.write_eof()
    return response


async def messages(request: web.Request) -> web.StreamResponse:
    """Claude itself, for the anthropic SDK: the scripted stream, untranslated."""
    script = request.app[STAGE].script
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(script.body)
    await response.write_eof()
    return response


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, web.Application]]:
    app = web.Application()
    app[STAGE] = Stage()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/messages", messages)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", app
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


@pytest.fixture
def script(server: tuple[str, web.Application]) -> Script:
    server[1][STAGE].script = fresh = Script()
    return fresh


@pytest.fixture
def client(server: tuple[str, web.Application]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=10)


def claude_message(server: tuple[str, web.Application]) -> dict[str, Any]:
    """The scripted stream as the anthropic SDK accumulates it: the non-streamed answer."""
    claude = anthropic.Anthropic(base_url=server[0], api_key="x", max_retries=0, timeout=10)
    with claude.messages.stream(model=UPSTREAM, max_tokens=1024, messages=QUESTION) as stream:
        return stream.get_final_message().model_dump(exclude_none=True)


@pytest.mark.parametrize("seed", range(4))
def test_sdk_stream_yields_text_tool_calls_and_usage(
    client: openai.OpenAI, script: Script, seed: int
) -> None:
    script.seed = seed
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=[WEATHER],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in stream:
        assert chunk.model == MODEL
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
    assert text == TEXT
    assert calls == {
        0: {
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "name": "get_weather",
            "arguments": WEATHER_ARGS,
        },
        1: {"id": "toolu_01NoArgs000000000000000", "name": "get_time", "arguments": "{}"},
    }
    assert finish == "tool_calls"
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2572, 89, 2661)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 2000
    assert usage.prompt_tokens_details.model_dump().get("cache_write_tokens") == 100
    assert script.seen[0]["stream"] is True and script.seen[0]["model"] == UPSTREAM


def test_sdk_stream_helper_reassembles_the_completion(
    client: openai.OpenAI, script: Script
) -> None:
    with client.chat.completions.stream(
        model=MODEL,
        messages=QUESTION,
        tools=[WEATHER],
        stream_options={"include_usage": True},
    ) as stream:
        completion = stream.get_final_completion()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == TEXT
    calls = choice.message.tool_calls or []
    assert [(c.function.name, orjson.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"location": "San Francisco, CA", "unit": "fahrenheit"}),
        ("get_time", {}),
    ]
    assert completion.usage is not None and completion.usage.total_tokens == 2661


def test_no_usage_chunk_unless_asked(client: openai.OpenAI, script: Script) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True))
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)


def test_async_sdk_stream(server: tuple[str, web.Application], script: Script) -> None:
    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True)
        text = ""
        async for chunk in stream:
            text += "".join(c.delta.content or "" for c in chunk.choices)
        await client.close()
        return text

    assert asyncio.run(run()) == TEXT


def test_streamed_and_whole_answers_agree(
    server: tuple[str, web.Application], client: openai.OpenAI, script: Script
) -> None:
    with client.chat.completions.stream(
        model=MODEL,
        messages=QUESTION,
        stream_options={"include_usage": True},
    ) as stream:
        streamed = stream.get_final_completion()
    script.body = orjson.dumps(claude_message(server))
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION)
    assert script.seen[-1].get("stream") is None
    assert whole.object == "chat.completion" and whole.model == MODEL
    assert whole.id == streamed.id == "msg_014p7gG3wDgGV9EUtLvnow3U"
    a, b = whole.choices[0], streamed.choices[0]
    assert (a.finish_reason, a.message.content) == (b.finish_reason, b.message.content)
    # Streamed arguments keep Claude's spacing; whole ones are compact: same JSON either way.
    assert [_call(c) for c in a.message.tool_calls or []] == [
        _call(c) for c in b.message.tool_calls or []
    ]
    assert whole.usage == streamed.usage


def _call(call: Any) -> tuple[str, str, Any]:
    return call.id, call.function.name, orjson.loads(call.function.arguments)


def test_tool_call_round_trip(client: openai.OpenAI, script: Script) -> None:
    """Tool calls the SDK received go back to Claude as the same tool_use blocks."""
    with client.chat.completions.stream(
        model=MODEL,
        messages=QUESTION,
        tools=[WEATHER],
    ) as stream:
        message = stream.get_final_completion().choices[0].message
    calls = message.tool_calls or []
    follow_up = [
        *QUESTION,
        message.model_dump(
            exclude_none=True,
            exclude={"parsed": True, "tool_calls": {"__all__": {"function": {"parsed_arguments"}}}},
        ),
        *[
            {"role": "tool", "tool_call_id": c.id, "content": f"result {i}"}
            for i, c in enumerate(calls)
        ],
    ]
    script.body = orjson.dumps(
        {"content": [{"type": "text", "text": "It is 18C."}], "stop_reason": "end_turn"}
    )
    answer = client.chat.completions.create(model=MODEL, messages=follow_up, tools=[WEATHER])
    assert answer.choices[0].message.content == "It is 18C."
    sent = script.seen[-1]["messages"]
    assert [t["role"] for t in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == [
        {"type": "text", "text": TEXT},
        {
            "type": "tool_use",
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "name": "get_weather",
            "input": {"location": "San Francisco, CA", "unit": "fahrenheit"},
        },
        {
            "type": "tool_use",
            "id": "toolu_01NoArgs000000000000000",
            "name": "get_time",
            "input": {},
        },
    ]
    assert sent[2]["content"] == [
        {
            "type": "tool_result",
            "tool_use_id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "content": "result 0",
        },
        {
            "type": "tool_result",
            "tool_use_id": "toolu_01NoArgs000000000000000",
            "content": "result 1",
        },
    ]


@pytest.mark.parametrize(
    ("status", "kind", "exception", "openai_type", "code"),
    [
        (400, "invalid_request_error", openai.BadRequestError, "invalid_request_error", "invalid_request"),
        (401, "authentication_error", openai.AuthenticationError, "invalid_request_error", "invalid_api_key"),
        (403, "permission_error", openai.PermissionDeniedError, "invalid_request_error", "permission_denied"),
        (404, "not_found_error", openai.NotFoundError, "invalid_request_error", "not_found"),
        (429, "rate_limit_error", openai.RateLimitError, "rate_limit_error", "rate_limit_exceeded"),
        (500, "api_error", openai.InternalServerError, "server_error", "upstream_error"),
        (529, "overloaded_error", openai.InternalServerError, "server_error", "overloaded"),
    ],
)  # fmt: skip
def test_sdk_raises_its_own_exception_for_upstream_errors(
    client: openai.OpenAI,
    script: Script,
    status: int,
    kind: str,
    exception: type[Exception],
    openai_type: str,
    code: str,
) -> None:
    script.status = status
    script.body = orjson.dumps(
        {"type": "error", "error": {"type": kind, "message": "Claude says no"}}
    )
    with pytest.raises(exception) as caught:
        client.chat.completions.create(model=MODEL, messages=QUESTION)
    assert isinstance(caught.value, openai.APIStatusError)
    assert caught.value.status_code == status
    # OpenAI's envelope, not Anthropic's passed through: the SDK reads type and code from it.
    assert caught.value.body == {  # type: ignore[attr-defined]
        "message": "Claude says no",
        "type": openai_type,
        "code": code,
        "param": None,
    }
    assert (caught.value.type, caught.value.code) == (openai_type, code)  # type: ignore[attr-defined]


def test_sdk_sees_a_refused_field_with_its_param(client: openai.OpenAI, script: Script) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=QUESTION, n=2)
    assert (caught.value.param, caught.value.code) == ("n", "unsupported_value")
    assert not script.seen, "nothing reached Claude"


@pytest.mark.parametrize("where", [b"event: content_block_stop", b"event: message_delta"])
def test_sdk_raises_on_error_event_and_cut_stream(
    client: openai.OpenAI, script: Script, where: bytes
) -> None:
    head = ANTHROPIC_SSE[: ANTHROPIC_SSE.index(where, ANTHROPIC_SSE.index(b"Okay"))]
    overloaded = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    for body, message in [(head + overloaded, "Overloaded"), (head, "ended before")]:
        script.body = body
        text = ""
        with pytest.raises(openai.APIError, match=message):
            for chunk in client.chat.completions.create(
                model=MODEL, messages=QUESTION, stream=True
            ):
                text += "".join(c.delta.content or "" for c in chunk.choices)
        assert text and TEXT.startswith(text), "text sent before the failure was delivered"
