"""Anthropic SSE → OpenAI chunk SSE: the event sequence, whatever the chunking.

``ANTHROPIC_SSE`` follows Anthropic's documented stream for a turn with thinking, text
and two tool calls (one streamed in ``input_json_delta`` fragments, one without
arguments). It is shared with the SDK tests in ``test_translate_sdk.py``.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from extproc.dialects.usage import StreamUsage
from extproc.translate import StreamTranslator
from extproc.translate.anthropic_stream import MAX_EVENT_BYTES

MODEL = "claude-sonnet"
CREATED = 1_767_225_600


def _event(payload: dict[str, Any]) -> bytes:
    kind: str = payload["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def stream_of(payloads: list[dict[str, Any]]) -> bytes:
    return b"".join(_event(payload) for payload in payloads)


def _args(fragment: str, index: int = 2) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "input_json_delta", "partial_json": fragment},
    }


def _text(fragment: str) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "text_delta", "text": fragment},
    }


MESSAGE_ID = "msg_014p7gG3wDgGV9EUtLvnow3U"
EVENTS: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            "id": MESSAGE_ID,
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 472,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 2000,
                "output_tokens": 2,
            },
        },
    },
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "thinking_delta", "thinking": "The user wants weather."},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"},
    },
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    _text("Okay"),
    _text(", let's check the weather for San Francisco, CA — ünïcödé ✓"),
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {
            "type": "tool_use",
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "name": "get_weather",
            "input": {},
        },
    },
    _args(""),
    _args('{"location":'),
    _args(' "San'),
    _args(" Francisc"),
    _args("o,"),
    _args(' CA"'),
    _args(", "),
    _args('"unit": "fah'),
    _args('renheit"}'),
    {"type": "content_block_stop", "index": 2},
    {
        "type": "content_block_start",
        "index": 3,
        "content_block": {
            "type": "tool_use",
            "id": "toolu_01NoArgs000000000000000",
            "name": "get_time",
            "input": {},
        },
    },
    _args("", 3),
    {"type": "content_block_stop", "index": 3},
    {"type": "some_future_event", "detail": 1},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 89},
    },
    {"type": "message_stop"},
]
ANTHROPIC_SSE = stream_of(EVENTS)

TEXT = "Okay, let's check the weather for San Francisco, CA — ünïcödé ✓"
WEATHER_ARGS = '{"location": "San Francisco, CA", "unit": "fahrenheit"}'
USAGE = {
    "prompt_tokens": 2572,
    "completion_tokens": 89,
    "total_tokens": 2661,
    "prompt_tokens_details": {"cached_tokens": 2000, "cache_write_tokens": 100},
}
# What an OpenAI client sees, one (delta, finish_reason) per chunk.
EXPECTED_CHOICES: list[tuple[dict[str, Any], str | None]] = [
    ({"role": "assistant", "content": ""}, None),
    ({"content": "Okay"}, None),
    ({"content": ", let's check the weather for San Francisco, CA — ünïcödé ✓"}, None),
    (
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        None,
    ),
    *[
        ({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}, None)
        for fragment in [
            '{"location":',
            ' "San',
            " Francisc",
            "o,",
            ' CA"',
            ", ",
            '"unit": "fah',
            'renheit"}',
        ]
    ],
    (
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "toolu_01NoArgs000000000000000",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                }
            ]
        },
        None,
    ),
    ({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}, None),
    ({}, "tool_calls"),
]


def chunked(data: bytes, seed: int, most: int = 40) -> list[bytes]:
    rng = random.Random(seed)
    pieces = []
    at = 0
    while at < len(data):
        step = rng.randint(1, most)
        pieces.append(data[at : at + step])
        at += step
    return pieces


def translate(pieces: list[bytes], **options: Any) -> bytes:
    translator = StreamTranslator(MODEL, created=CREATED, **options)
    out = b"".join(translator.feed(piece) for piece in pieces)
    return out + translator.finish()


def events(sse: bytes) -> list[Any]:
    """The data of each OpenAI event, ``"[DONE]"`` kept as a string."""
    assert sse.endswith(b"\n\n")
    out: list[Any] = []
    for event in sse[:-2].split(b"\n\n"):
        assert event.startswith(b"data: ") and b"\n" not in event, event
        data = event[6:]
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_chunk_sequence_whatever_the_split(seed: int, newline: bytes) -> None:
    raw = ANTHROPIC_SSE.replace(b"\n", newline)
    got = events(translate(chunked(raw, seed, most=1 + seed * 30), include_usage=True))
    assert got[-1] == "[DONE]"
    *chunks, usage_chunk, _ = got
    assert [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks] == (
        EXPECTED_CHOICES
    )
    for chunk in [*chunks, usage_chunk]:
        assert chunk["id"] == MESSAGE_ID
        assert chunk["object"] == "chat.completion.chunk"
        assert (chunk["model"], chunk["created"]) == (MODEL, CREATED)
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == USAGE


def test_reassembled_arguments_are_the_tool_input() -> None:
    chunks = events(translate([ANTHROPIC_SSE]))[:-1]
    arguments: dict[int, str] = {}
    for chunk in chunks:
        for call in chunk["choices"][0]["delta"].get("tool_calls", []):
            arguments[call["index"]] = (
                arguments.get(call["index"], "") + call["function"]["arguments"]
            )
    assert {i: orjson.loads(a) for i, a in arguments.items()} == {
        0: orjson.loads(WEATHER_ARGS),
        1: {},
    }


def test_no_usage_chunk_unless_asked() -> None:
    got = events(translate([ANTHROPIC_SSE]))
    assert got[-1] == "[DONE]"
    assert all("usage" not in chunk and chunk["choices"] for chunk in got[:-1])
    assert len(got) == len(EXPECTED_CHOICES) + 1


def test_gateway_meter_reads_the_same_usage_either_side() -> None:
    """The caller's usage chunk counts what the gateway charges (it meters the upstream
    bytes): the same numbers, cache writes included (``cache_write_tokens``)."""
    upstream, translated = StreamUsage("anthropic.messages"), StreamUsage("openai.chat")
    translator = StreamTranslator(MODEL, include_usage=True)
    for piece in chunked(ANTHROPIC_SSE, 7):
        upstream.feed(piece)
        translated.feed(translator.feed(piece))
    translated.feed(translator.finish())
    upstream.finish()
    translated.finish()
    assert upstream.usage is not None and upstream.usage.cache_write_input_tokens > 0
    assert translated.usage == upstream.usage


def test_error_event_ends_the_stream() -> None:
    head = ANTHROPIC_SSE[: ANTHROPIC_SSE.index(b"event: content_block_stop")]
    error = _event(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    got = events(translate([head, error, b"event: ping\ndata: {}\n\n"]))
    assert got[-2:] == [
        {
            "error": {
                "message": "Overloaded",
                "type": "server_error",
                "code": "overloaded",
                "param": None,
            }
        },
        "[DONE]",
    ]


def test_cut_stream_ends_with_an_error_not_a_finish() -> None:
    cut = ANTHROPIC_SSE[: ANTHROPIC_SSE.index(b"event: message_delta") + 30]
    got = events(translate(chunked(cut, 3)))
    assert got[-1] == "[DONE]"
    assert got[-2]["error"]["code"] == "upstream_error"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in got[:-2])


def test_unterminated_last_event_is_read_at_finish() -> None:
    got = events(translate([ANTHROPIC_SSE.rstrip(b"\n")]))
    assert got[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert got[-1] == "[DONE]"


def test_stream_without_any_event_is_an_error() -> None:
    got = events(translate([]))
    assert "error" in got[0] and got[1] == "[DONE]"


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("stop_sequence", "stop"),
        ("refusal", "content_filter"),
    ],
)
def test_finish_reason(stop_reason: str, finish: str) -> None:
    sse = stream_of(
        [
            {"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 3}}},
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": "Hi"},
            },
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason},
                "usage": {"output_tokens": 1},
            },
            {"type": "message_stop"},
        ]
    )
    got = events(translate([sse], include_usage=True))
    assert got[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert got[2]["choices"][0]["finish_reason"] == finish
    assert got[3]["usage"]["prompt_tokens"] == 3 and got[3]["usage"]["completion_tokens"] == 1


def test_input_repeated_in_message_delta_wins() -> None:
    """Newer API versions repeat cumulative input counts in message_delta."""
    sse = stream_of(
        [
            {
                "type": "message_start",
                "message": {"id": "m", "usage": {"input_tokens": 3, "output_tokens": 1}},
            },
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"input_tokens": 5, "output_tokens": 7},
            },
            {"type": "message_stop"},
        ]
    )
    usage = events(translate([sse], include_usage=True))[-2]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (5, 7)


def test_tool_input_given_whole_at_block_start_is_sent() -> None:
    sse = stream_of(
        [
            {"type": "message_start", "message": {"id": "m", "usage": {}}},
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "f",
                    "input": {"a": 1},
                },
            },
            {"type": "content_block_stop", "index": 0},
            {"type": "message_stop"},
        ]
    )
    got = events(translate([sse]))
    assert got[2]["choices"][0]["delta"] == {
        "tool_calls": [{"index": 0, "function": {"arguments": '{"a":1}'}}]
    }


def test_a_tool_block_never_closed_still_gets_its_arguments() -> None:
    """OpenAI clients parse a call's arguments: "{}" for none, never ""."""
    sse = stream_of(
        [
            {"type": "message_start", "message": {"id": "m", "usage": {}}},
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
            },
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {}},
            {"type": "message_stop"},
        ]
    )
    arguments = "".join(
        call["function"]["arguments"]
        for chunk in events(translate([sse]))[:-1]
        for call in chunk["choices"][0]["delta"].get("tool_calls", [])
    )
    assert arguments == "{}"


def test_oversized_event_is_refused_not_buffered() -> None:
    translator = StreamTranslator(MODEL)
    translator.feed(_event(EVENTS[0]))
    out = translator.feed(b'data: {"type":"content_block_delta","text":"' + b"x" * MAX_EVENT_BYTES)
    assert b'"error"' in out and out.endswith(b"data: [DONE]\n\n")
    assert translator.done
    assert translator.feed(b"more") == b"" and translator.finish() == b""


def test_bad_json_event_is_an_error() -> None:
    got = events(translate([_event(EVENTS[0]), b"data: {not json\n\n"]))
    assert "error" in got[-2] and got[-1] == "[DONE]"


def test_an_event_with_empty_data_is_passed_over() -> None:
    """A bare "data" line is an empty data field (as the format reads it): no JSON to
    translate, and no reason to end the client's stream with an error."""
    start, rest = ANTHROPIC_SSE.split(b"\n\n", 1)
    stream = start + b"\n\nevent: ping\ndata\n\n" + rest
    assert events(translate([stream])) == events(translate([ANTHROPIC_SSE]))
