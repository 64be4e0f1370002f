"""Usage read from answers: recorded OpenAI traffic, streamed in arbitrary chunk sizes."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from extproc.dialects.usage import StreamUsage, Usage, usage_from_body

CASSETTES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cassettes" / "openai"
DIALECT_BY_SUFFIX = {
    "/chat/completions": "openai.chat",
    "/completions": "openai.completions",
    "/embeddings": "openai.embeddings",
}


def recorded() -> list[Any]:
    cases = []
    for file in sorted(CASSETTES.glob("*.yaml")):
        for interaction in yaml.safe_load(file.read_text())["interactions"]:
            url = interaction["request"]["url"]
            dialect = next((d for s, d in DIALECT_BY_SUFFIX.items() if url.endswith(s)), None)
            response = interaction["response"]
            if dialect and response["code"] == 200:
                cases.append(pytest.param(dialect, response["body"], id=file.stem))
    return cases


def expected_from_sse(body: str) -> dict[str, Any]:
    usages = [
        orjson.loads(line[6:])["usage"]
        for line in body.splitlines()
        if line.startswith("data: {") and orjson.loads(line[6:]).get("usage")
    ]
    return usages[-1] if usages else {}


def test_cassettes_are_present() -> None:
    assert len(recorded()) >= 20, f"the shared data sets are missing: {CASSETTES}"


@pytest.mark.parametrize(("dialect", "body"), recorded())
def test_recorded_usage_is_read_exactly(dialect: str, body: str) -> None:
    if body.lstrip().startswith("data:"):
        expected = expected_from_sse(body)
        meter = StreamUsage(dialect)
        raw = body.encode()
        rng = random.Random(len(raw))
        at = 0
        while at < len(raw):
            step = rng.randint(1, 300)
            meter.feed(raw[at : at + step])
            at += step
        meter.finish()
        got = meter.usage
        if not expected:
            assert got is None
            assert meter.content_events > 0
            return
    else:
        expected = orjson.loads(body).get("usage") or {}
        got = usage_from_body(dialect, orjson.loads(body))
    assert got is not None
    assert got.input_tokens == expected.get("prompt_tokens", 0)
    assert got.output_tokens == expected.get("completion_tokens", 0)
    details = expected.get("prompt_tokens_details") or {}
    assert got.cached_input_tokens == details.get("cached_tokens", 0)


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_a_stream_is_read_whichever_way_its_lines_end(newline: bytes) -> None:
    """The format ends lines with CRLF, LF or CR; every reader splits events alike."""
    lf, other = StreamUsage("anthropic.messages"), StreamUsage("anthropic.messages")
    lf.feed(ANTHROPIC_STREAM)
    raw = ANTHROPIC_STREAM.replace(b"\n", newline)
    for at in range(0, len(raw), 7):
        other.feed(raw[at : at + 7])
    lf.finish()
    other.finish()
    assert lf.usage is not None and other.usage == lf.usage
    assert other.content_events == lf.content_events == 2


ANTHROPIC_STREAM = b"""event: message_start
data: {"type":"message_start","message":{"id":"m","usage":{"input_tokens":25,"cache_read_input_tokens":5,"output_tokens":1}}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" there"}}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}

event: message_stop
data: {"type":"message_stop"}

"""


def test_anthropic_stream_combines_start_and_delta() -> None:
    meter = StreamUsage("anthropic.messages")
    for i in range(0, len(ANTHROPIC_STREAM), 7):
        meter.feed(ANTHROPIC_STREAM[i : i + 7].replace(b"\n", b"\r\n"))
    assert meter.usage == Usage(input_tokens=30, output_tokens=15, cached_input_tokens=5)
    assert meter.content_events == 2


def test_cut_stream_keeps_count_of_content_events() -> None:
    """Cut before message_delta: message_start's usage reports no output, so it is not
    taken for the provider's report; the content events measure what was sent."""
    meter = StreamUsage("anthropic.messages")
    meter.feed(ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: message_delta")])
    assert meter.usage is None
    assert meter.content_events == 2


@pytest.mark.parametrize("absurd", ["start", "delta"])
def test_an_anthropic_stream_with_a_count_past_belief_is_not_believed(absurd: str) -> None:
    stream = ANTHROPIC_STREAM
    if absurd == "start":
        stream = stream.replace(b'"input_tokens":25', b'"input_tokens":-1', 1)
    else:
        stream = stream.replace(b'"output_tokens":15', b'"output_tokens":1e19', 1)
    meter = StreamUsage("anthropic.messages")
    meter.feed(stream)
    assert meter.usage is None


@pytest.mark.parametrize(
    ("dialect", "body", "usage"),
    [
        pytest.param(
            "anthropic.messages",
            {"usage": {"input_tokens": 3, "output_tokens": 4}},
            Usage(3, 4),
            id="anthropic",
        ),
        pytest.param(
            "anthropic.messages",
            {
                "usage": {
                    "input_tokens": 3,
                    "cache_creation_input_tokens": 10,
                    "cache_creation": {
                        "ephemeral_5m_input_tokens": 4,
                        "ephemeral_1h_input_tokens": 6,
                    },
                    "output_tokens": 4,
                }
            },
            Usage(13, 4, 0, 10, 6),
            id="anthropic-one-hour-cache-writes",
        ),
        pytest.param(
            "openai.responses",
            {
                "usage": {
                    "input_tokens": 3,
                    "output_tokens": 4,
                    "input_tokens_details": {"cached_tokens": 1},
                }
            },
            Usage(3, 4, 1),
            id="responses",
        ),
        pytest.param("openai.chat", {"usage": None}, None, id="null-usage"),
        pytest.param(
            "openai.chat",
            {"usage": {"prompt_tokens": "7"}},
            None,
            id="wrong-types-are-not-believed",
        ),
        pytest.param(
            "openai.chat",
            {"usage": {"prompt_tokens": 7, "completion_tokens": -9223372036854775808}},
            None,
            id="negative-is-not-believed",
        ),
        pytest.param(
            "openai.chat", {"usage": {"prompt_tokens": 7}}, Usage(7, 0), id="absent-reads-0"
        ),
        pytest.param("openai.chat", [], None, id="not-an-object"),
        pytest.param(
            "openai.embeddings",
            {"usage": {"total_tokens": 12}},
            Usage(12, 0),
            id="only-a-total-is-the-prompt",
        ),
        pytest.param(
            "openai.completions",
            {"usage": {"total_tokens": 20, "completion_tokens": 5}},
            Usage(15, 5),
            id="total-less-completion",
        ),
        pytest.param(
            "openai.chat",
            {"usage": {"prompt_tokens": 10, "total_tokens": 510}},
            Usage(10, 500),
            id="total-less-prompt-is-the-output",  # was charged no output at all
        ),
        pytest.param(
            "openai.embeddings",
            {"usage": {"prompt_tokens": 12, "total_tokens": 12}},
            Usage(12, 0),
            id="an-embeddings-total-is-its-prompt",
        ),
        pytest.param("openai.embeddings", {"usage": {}}, None, id="no-prompt-count-is-estimated"),
        pytest.param(
            "openai.embeddings",
            {"usage": {"total_tokens": "12"}},
            None,
            id="a-total-not-a-count",
        ),
        pytest.param(
            "openai.chat",
            {"usage": {"prompt_tokens": 7, "completion_tokens": 10**19}},
            None,
            id="past-belief-is-not-reported",
        ),
        pytest.param(
            "anthropic.messages",
            {"usage": {"input_tokens": 3, "cache_read_input_tokens": 10**9, "output_tokens": 4}},
            None,
            id="anthropic-cache-past-belief",
        ),
        pytest.param(
            "openai.chat",
            {"usage": {"prompt_tokens": 2_000_000, "completion_tokens": 128_000}},
            Usage(2_000_000, 128_000),
            id="largest-real-counts",
        ),
    ],
)
def test_usage_shapes(dialect: str, body: Any, usage: Usage | None) -> None:
    assert usage_from_body(dialect, body) == usage


@pytest.mark.parametrize(
    ("dialect", "events", "expected"),
    [
        (
            "openai.chat",
            [
                {"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 500}},
                {"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": "500"}},
            ],
            Usage(8, 500),
        ),
        ("openai.chat", [{"choices": [], "usage": {"prompt_tokens": 8}}], None),
        (
            "openai.responses",
            [{"type": "response.completed", "response": {"usage": {"input_tokens": 3}}}],
            None,
        ),
    ],
    ids=["a-malformed-report-after-a-good-one", "no-output-count", "responses-no-output-count"],
)
def test_a_stream_report_is_believed_only_with_an_output_count(
    dialect: str, events: list[dict[str, Any]], expected: Usage | None
) -> None:
    """A malformed report after a good one erased it (the charge fell back to an
    estimate); a report silent on output was taken for 0 output tokens."""
    meter = StreamUsage(dialect)
    for event in events:
        meter.feed(b"data: " + orjson.dumps(event) + b"\n\n")
    meter.finish()
    assert meter.usage == expected


_CACHED_START = {
    "input_tokens": 12,
    "cache_read_input_tokens": 20_000,
    "cache_creation_input_tokens": 500,
    "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 300},
    "output_tokens": 1,
}
"""A ``message_start`` whose prompt was read from and written to the cache (300 of the
500 written tokens to the 1-hour cache)."""


@pytest.mark.parametrize(
    ("delta_usage", "expected"),
    [
        # The delta repeats the uncached input only: the start's cache reads and writes
        # (with their 1-hour share) stand.
        (
            {"input_tokens": 12, "output_tokens": 300},
            Usage(20_512, 300, 20_000, 500, 300),
        ),
        # The delta repeats the cache reads only: the start's uncached input stands.
        (
            {"cache_read_input_tokens": 20_000, "output_tokens": 300},
            Usage(20_512, 300, 20_000, 500, 300),
        ),
        # Every field repeated (cumulative): the delta's win, the 1-hour split included.
        (
            {
                "input_tokens": 14,
                "cache_read_input_tokens": 19_000,
                "cache_creation_input_tokens": 400,
                "cache_creation": {"ephemeral_1h_input_tokens": 100},
                "output_tokens": 300,
            },
            Usage(19_414, 300, 19_000, 400, 100),
        ),
    ],
    ids=["input-only", "cache-only", "all"],
)
def test_an_anthropic_delta_replaces_only_the_prompt_fields_it_repeats(
    delta_usage: dict[str, Any], expected: Usage
) -> None:
    """As Anthropic's SDK accumulates a stream's usage, and as Envoy's lifted metadata
    settles it under ``accounting: envoy``: both accounting modes charge the same."""
    meter = StreamUsage("anthropic.messages")
    meter.feed(
        b"event: message_start\ndata: "
        + orjson.dumps({"type": "message_start", "message": {"id": "m", "usage": _CACHED_START}})
        + b"\n\nevent: message_delta\ndata: "
        + orjson.dumps({"type": "message_delta", "delta": {}, "usage": delta_usage})
        + b"\n\n"
    )
    assert meter.usage == expected


@pytest.mark.parametrize("image_bytes", [1_100_000, 3_000_000])
def test_a_responses_stream_whose_final_event_is_huge_keeps_its_usage(image_bytes: int) -> None:
    """``response.completed`` repeats the whole response: with a generated image in it,
    the event passes the 1 MiB a metered event may hold; its usage comes last."""
    completed = {
        "type": "response.completed",
        "response": {
            "id": "resp_1",
            "status": "completed",
            "output": [
                {"type": "image_generation_call", "id": "ig_1", "result": "A" * image_bytes},
                {"type": "message", "content": [{"type": "output_text", "text": "done"}]},
            ],
            "usage": {
                "input_tokens": 40,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 1600,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 1640,
            },
            "metadata": {},
        },
    }
    stream = (
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"done"}\n\n'
        b"event: response.completed\ndata: " + orjson.dumps(completed) + b"\n\n"
    )
    meter = StreamUsage("openai.responses")
    for at in range(0, len(stream), 16 * 1024):
        meter.feed(stream[at : at + 16 * 1024])
    meter.finish()
    assert meter.usage == Usage(40, 1600)


def test_an_anthropic_stream_with_a_huge_event_keeps_its_usage() -> None:
    """A server tool's result comes whole in its ``content_block_start`` (a fetched page
    of 1.1 MB): past the 1 MiB a metered event may hold, it is passed over, and the
    usage around it (the prompt before, the output after) is still the provider's."""
    fetched = {
        "type": "content_block_start",
        "index": 1,
        "content_block": {
            "type": "web_fetch_tool_result",
            "tool_use_id": "srvtoolu_1",
            "content": {
                "type": "web_fetch_result",
                "url": "https://example.com/big",
                "content": {
                    "type": "document",
                    "source": {"type": "text", "media_type": "text/plain", "data": "x" * 1_100_000},
                },
            },
        },
    }
    start = {"input_tokens": 30, "output_tokens": 1}
    events = [
        {"type": "message_start", "message": {"id": "m", "usage": start}},
        fetched,
        {"type": "content_block_stop", "index": 1},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 700},
        },
        {"type": "message_stop"},
    ]
    stream = b"".join(
        b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
        for event in events
    )
    meter = StreamUsage("anthropic.messages")
    for at in range(0, len(stream), 16 * 1024):
        meter.feed(stream[at : at + 16 * 1024])
    meter.finish()
    assert meter.usage == Usage(30, 700)


@pytest.mark.parametrize(
    ("dialect", "usage"),
    [
        (
            "openai.chat",
            {
                "prompt_tokens": 1000,
                "completion_tokens": 3,
                "prompt_tokens_details": {"cached_tokens": 400, "cache_write_tokens": 600},
            },
        ),
        (
            "openai.responses",
            {
                "input_tokens": 1000,
                "output_tokens": 3,
                "input_tokens_details": {"cached_tokens": 400, "cache_write_tokens": 600},
            },
        ),
    ],
)
def test_openai_cache_writes_are_read_beside_cache_reads(
    dialect: str, usage: dict[str, Any]
) -> None:
    assert usage_from_body(dialect, {"usage": usage}) == Usage(
        1000, 3, cached_input_tokens=400, cache_write_input_tokens=600
    )
