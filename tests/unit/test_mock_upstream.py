"""The mock LLM upstream, driven in-process by the official openai and anthropic SDKs.

If the SDKs parse the mock's answers (plain and streamed) and the echo survives byte for byte,
the mock is faithful enough to stand in for a provider behind the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from extproc.mock_upstream import build_app, tokens

# Strings that break naive echo paths: unicode, whitespace at either end, control characters,
# line separators that str.splitlines() (but not SSE) treats as line breaks.
TRICKY = {
    "ascii": "Hello, world!",
    "leading-trailing-ws": "   padded both sides \t ",
    "newlines": "line one\nline two\r\n\nline four\n",
    "unicode": "héllo wörld — naïve café ünïcödé",
    "cjk": "日本語のテキスト 中文 한국어",
    "emoji": "👋🏽 family: 👨‍👩‍👧‍👦 flag 🇫🇷 done",
    "line-separators": "a\u2028b\u2029c\x85d\x1ce",
    "nbsp-and-ideographic-space": "x\u00a0y\u3000z",
    "json-looking": '{"role": "user", "content": "data: [DONE]"}\n\ndata: x',
    "only-whitespace": " \n\t ",
    "empty": "",
}


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on an ephemeral 127.0.0.1 port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    async with serving(build_app()) as url:
        yield url


@pytest.fixture
async def oai(mock_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{mock_url}/v1", api_key="sk-test-key", max_retries=0)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def claude(mock_url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=mock_url, api_key="sk-ant-test", max_retries=0)
    try:
        yield client
    finally:
        await client.close()


async def recorded(mock_url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{mock_url}/_mock/requests") as r:
        assert r.status == 200
        result: list[dict[str, Any]] = await r.json()
        return result


# --- tokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY.values(), ids=TRICKY.keys())
def test_pieces_join_back_to_the_text(text: str) -> None:
    assert "".join(tokens.split(text)) == text
    assert tokens.count(text) == len(tokens.split(text))


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("", []),
        ("one", ["one"]),
        ("one two", ["one", " two"]),
        ("  lead", ["  lead"]),
        ("trail  ", ["trail", "  "]),
        ("a\n\nb", ["a", "\n\nb"]),
        ("   ", ["   "]),
        ("x\u00a0y", ["x", "\u00a0y"]),
    ],
    ids=["empty", "word", "two-words", "leading-ws", "trailing-ws", "newlines", "only-ws", "nbsp"],
)
def test_split_rule(text: str, pieces: list[str]) -> None:
    assert tokens.split(text) == pieces


def test_truncate_marks_only_dropped_pieces() -> None:
    assert tokens.truncate("a b c", None) == (["a", " b", " c"], False)
    assert tokens.truncate("a b c", 3) == (["a", " b", " c"], False)
    assert tokens.truncate("a b c", 2) == (["a", " b"], True)
    assert tokens.count_all(["a b", "", "c"]) == 3


def test_split_is_linear_on_long_whitespace() -> None:
    started = time.perf_counter()
    assert tokens.count(" " * 1_000_000) == 1
    assert time.perf_counter() - started < 1.0


# --- chat completions --------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY.values(), ids=TRICKY.keys())
async def test_chat_echoes_last_user_message_exactly(oai: openai.AsyncOpenAI, text: str) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You are a parrot."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": text},
    ]
    reply = await oai.chat.completions.create(model="mock-echo", messages=messages)
    choice = reply.choices[0]
    assert choice.message.content == text
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert reply.model == "mock-echo"
    assert reply.usage is not None
    prompt = tokens.count_all(["You are a parrot.", "first question", "first answer", text])
    assert reply.usage.prompt_tokens == prompt
    assert reply.usage.completion_tokens == tokens.count(text)
    assert reply.usage.total_tokens == prompt + tokens.count(text)


async def test_chat_echoes_concatenated_text_parts(oai: openai.AsyncOpenAI) -> None:
    content: list[Any] = [
        {"type": "text", "text": "look at "},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "this picture"},
    ]
    reply = await oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": content}]
    )
    assert reply.choices[0].message.content == "look at this picture"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == tokens.count_all(["look at ", "this picture"])


@pytest.mark.parametrize("text", TRICKY.values(), ids=TRICKY.keys())
async def test_chat_stream_deltas_concatenate_to_the_echo(
    oai: openai.AsyncOpenAI, text: str
) -> None:
    stream = await oai.chat.completions.create(
        model="mock-echo",
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks[1:] if c.choices]
    content = [d for d in deltas if d]
    assert "".join(content) == text
    assert len(content) == tokens.count(text)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "stop"
    assert all(f is None for f in finals[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == tokens.count(text)
    assert last.usage.completion_tokens == tokens.count(text)
    assert all(c.usage is None for c in chunks[:-1])


async def test_chat_stream_without_include_usage_has_no_usage_chunk(
    oai: openai.AsyncOpenAI,
) -> None:
    stream = await oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "a b"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_chat_token_limit_truncates_with_length(oai: openai.AsyncOpenAI, field: str) -> None:
    text = "one two three four five"
    limit: dict[str, Any] = {field: 2}
    reply = await oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], **limit
    )
    assert reply.choices[0].message.content == "one two"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 2
    assert reply.usage.prompt_tokens == 5


async def test_chat_limit_equal_to_echo_finishes_with_stop(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "a b c"}], max_tokens=3
    )
    assert reply.choices[0].message.content == "a b c"
    assert reply.choices[0].finish_reason == "stop"


async def test_chat_stream_truncates_with_length(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": " ä ö ü ß "}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ä ö ü"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


# --- completions and embeddings ----------------------------------------------------------


async def test_completions_echo_prompt(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.completions.create(model="m", prompt="  say  this\n")
    assert reply.choices[0].text == "  say  this\n"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 3)


async def test_completions_array_prompt_echoes_first_counts_all(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.completions.create(model="m", prompt=["first one", "second"], max_tokens=1)
    assert reply.choices[0].text == "first"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 1)


async def test_completions_stream(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.completions.create(
        model="m", prompt="a bc  d ", stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "a bc  d "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_embeddings_sdk_default_base64_matches_float(oai: openai.AsyncOpenAI) -> None:
    default = await oai.embeddings.create(model="mock-embedding", input=["hello", "wörld two"])
    floats = await oai.embeddings.create(
        model="mock-embedding", input=["hello", "wörld two"], encoding_format="float"
    )
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    assert [d.index for d in default.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in default.data)
    assert all(-1.0 <= x <= 1.0 for d in default.data for x in d.embedding)
    assert default.data[0].embedding != default.data[1].embedding
    assert default.usage.prompt_tokens == default.usage.total_tokens == 3
    again = await oai.embeddings.create(model="m", input="hello", dimensions=16)
    assert again.data[0].embedding[:8] != []
    assert len(again.data[0].embedding) == 16


async def test_embeddings_base64_is_little_endian_float32(mock_url: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{mock_url}/v1/embeddings", json={"input": "x", "encoding_format": "base64"}
        ) as resp,
    ):
        body = await resp.json()
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert len(raw) == 32
    assert all(-1.0 <= v <= 1.0 for v in struct.unpack("<8f", raw))


# --- responses and models ----------------------------------------------------------------


async def test_responses_echo_and_usage(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.responses.create(
        model="m",
        instructions="be brief",
        input=[
            {"role": "user", "content": "earlier"},
            {"role": "user", "content": [{"type": "input_text", "text": "  ünïcode  "}]},
        ],
    )
    assert reply.output_text == "  ünïcode  "
    assert reply.status == "completed"
    assert reply.usage is not None
    assert reply.usage.input_tokens == tokens.count_all(["be brief", "earlier", "  ünïcode  "])
    assert reply.usage.output_tokens == 2


async def test_responses_max_output_tokens_is_incomplete(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.responses.create(model="m", input="a b c", max_output_tokens=2)
    assert reply.output_text == "a b"
    assert reply.status == "incomplete"
    assert reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens"


async def test_responses_streaming_is_refused(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="not supported by the mock"):
        await oai.responses.create(model="m", input="x", stream=True)


async def test_models_list(oai: openai.AsyncOpenAI) -> None:
    ids = [model.id async for model in oai.models.list()]
    assert "mock-echo" in ids


# --- anthropic ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY.values(), ids=TRICKY.keys())
async def test_anthropic_echo(claude: anthropic.AsyncAnthropic, text: str) -> None:
    reply = await claude.messages.create(
        model="claude-mock",
        max_tokens=1000,
        system=[{"type": "text", "text": "sys prompt"}],
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": text}]},
        ],
    )
    assert len(reply.content) == 1
    block = reply.content[0]
    assert block.type == "text"
    assert block.text == text
    assert reply.stop_reason == "end_turn"
    assert reply.usage.input_tokens == tokens.count_all(["sys prompt", "hi", "hello", text])
    assert reply.usage.output_tokens == tokens.count(text)


async def test_anthropic_max_tokens(claude: anthropic.AsyncAnthropic) -> None:
    reply = await claude.messages.create(
        model="m", max_tokens=2, messages=[{"role": "user", "content": "one two three"}]
    )
    assert reply.content[0].type == "text"
    assert reply.content[0].text == "one two"
    assert reply.stop_reason == "max_tokens"
    assert reply.usage.output_tokens == 2


@pytest.mark.parametrize("text", TRICKY.values(), ids=TRICKY.keys())
async def test_anthropic_stream(claude: anthropic.AsyncAnthropic, text: str) -> None:
    async with claude.messages.stream(
        model="m",
        max_tokens=1000,
        system="be a parrot",
        messages=[{"role": "user", "content": text}],
    ) as stream:
        deltas = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(deltas) == text
    assert len([d for d in deltas if d]) == tokens.count(text)
    assert final.content[0].type == "text"
    assert final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == tokens.count_all(["be a parrot", text])
    assert final.usage.output_tokens == tokens.count(text)


async def test_anthropic_stream_event_sequence(mock_url: str) -> None:
    body = {
        "model": "m",
        "max_tokens": 1,
        "stream": True,
        "messages": [{"role": "user", "content": "a b"}],
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{mock_url}/v1/messages", json=body) as resp,
    ):
        assert resp.content_type == "text/event-stream"
        raw = await resp.text()
    names = [line[len("event: ") :] for line in raw.splitlines() if line.startswith("event: ")]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert '"stop_reason":"max_tokens"' in raw


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": TRICKY["json-looking"]}]},
        ),
        ("/v1/completions", {"prompt": TRICKY["emoji"]}),
        ("/v1/messages", {"messages": [{"role": "user", "content": TRICKY["line-separators"]}]}),
    ],
    ids=["chat", "completions", "messages"],
)
async def test_every_streamed_event_is_one_json_object(
    mock_url: str, path: str, body: dict[str, Any]
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{mock_url}{path}",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        ) as resp,
    ):
        raw = await resp.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    for event in events[:-1]:
        data = [line for line in event.split(b"\n") if line.startswith(b"data: ")]
        assert len(data) == 1
        if data[0] != b"data: [DONE]":
            assert isinstance(orjson.loads(data[0][len(b"data: ") :]), dict)


# --- recording and controls --------------------------------------------------------------


async def test_requests_are_recorded_with_headers_and_body(
    mock_url: str, oai: openai.AsyncOpenAI
) -> None:
    await oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "secret ünïcode"}]
    )
    async with aiohttp.ClientSession() as session:
        await session.get(f"{mock_url}/healthz")
        entries = await recorded(mock_url)
        assert len(entries) == 1
        entry = entries[0]
        assert entry["method"] == "POST"
        assert entry["path"] == "/v1/chat/completions"
        assert entry["headers"]["authorization"] == "Bearer sk-test-key"
        assert entry["headers"]["content-type"] == "application/json"
        assert "secret ünïcode" in entry["body"]
        assert isinstance(entry["time"], float)
        async with session.delete(f"{mock_url}/_mock/requests") as resp:
            assert resp.status == 204
        assert await recorded(mock_url) == []


async def test_record_is_bounded() -> None:
    async with serving(build_app(record_limit=3)) as url, aiohttp.ClientSession() as session:
        for n in range(5):
            async with session.post(f"{url}/v1/completions", data=b'{"prompt":"%d"}' % n):
                pass
        assert [e["body"] for e in await recorded(url)] == [
            '{"prompt":"2"}',
            '{"prompt":"3"}',
            '{"prompt":"4"}',
        ]


async def test_invalid_utf8_body_is_recorded_with_replacement(mock_url: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{mock_url}/v1/chat/completions", data=b"\xff\xfe{") as resp,
    ):
        assert resp.status == 400
    assert (await recorded(mock_url))[0]["body"] == "\ufffd\ufffd{"


async def test_forced_status_raises_the_sdk_error(
    oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-status": "503"},
        )
    assert info.value.status_code == 503
    with pytest.raises(openai.RateLimitError):
        await oai.embeddings.create(model="m", input="x", extra_headers={"x-mock-status": "429"})
    with pytest.raises(anthropic.InternalServerError) as anth:
        await claude.messages.create(
            model="m",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-status": "503"},
        )
    error_body = anth.value.body
    assert isinstance(error_body, dict)
    assert error_body["type"] == "error"
    assert error_body["error"]["type"] == "api_error"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/chat/completions", {"error"}),
        ("/v1/embeddings", {"error"}),
        ("/v1/messages", {"type", "error"}),
    ],
)
async def test_invalid_json_is_400_in_the_api_dialect(
    mock_url: str, path: str, expected: set[str]
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{mock_url}{path}", data=b"{not json") as resp,
    ):
        assert resp.status == 400
        body = await resp.json()
    assert set(body) == expected
    if "type" in body:
        assert body["error"]["type"] == "invalid_request_error"
    else:
        assert set(body["error"]) == {"message", "type", "code", "param"}


async def test_bad_control_header_is_400(mock_url: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{mock_url}/v1/completions", json={"prompt": "x"}, headers={"x-mock-status": "200"}
        ) as resp,
    ):
        assert resp.status == 400
        assert "x-mock-status" in (await resp.json())["error"]["message"]


async def test_latency_header_delays_the_answer(oai: openai.AsyncOpenAI) -> None:
    started = time.perf_counter()
    await oai.completions.create(model="m", prompt="x", extra_headers={"x-mock-latency-ms": "150"})
    assert time.perf_counter() - started >= 0.15


async def test_chunk_delay_streams_events_separately(mock_url: str) -> None:
    body = {"messages": [{"role": "user", "content": "a b c d"}], "stream": True}
    arrivals: list[float] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{mock_url}/v1/chat/completions",
            json=body,
            headers={"x-mock-chunk-delay-ms": "40"},
        ) as resp,
    ):
        async for _line in resp.content:
            arrivals.append(time.perf_counter())
    # role, four tokens, finish, [DONE]: seven events, 40 ms apart.
    assert arrivals[-1] - arrivals[0] >= 6 * 0.04 * 0.9


async def test_client_abort_mid_stream_is_harmless(mock_url: str) -> None:
    body = {"messages": [{"role": "user", "content": "a b c d e f"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{mock_url}/v1/chat/completions", json=body, headers={"x-mock-chunk-delay-ms": "20"}
        ) as resp:
            await resp.content.readline()
        await asyncio.sleep(0.2)
        async with session.get(f"{mock_url}/healthz") as health:
            assert await health.text() == "ok"


async def test_apps_share_no_state() -> None:
    first, second = build_app(), build_app()
    async with serving(first) as one, serving(second) as two, aiohttp.ClientSession() as session:
        async with session.post(f"{one}/v1/completions", json={"prompt": "x"}) as resp:
            assert (await resp.json())["id"] == "cmpl-mock-1"
        async with session.post(f"{two}/v1/completions", json={"prompt": "x"}) as resp:
            assert (await resp.json())["id"] == "cmpl-mock-1"
        assert len(await recorded(one)) == 1
        assert len(await recorded(two)) == 1
