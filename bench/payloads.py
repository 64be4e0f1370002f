"""What every scenario sends and what the upstreams answer: fixed bytes, built once.

The request is one OpenAI chat completion of exactly :data:`REQUEST_BYTES` bytes: a system
message padded to size and a last user message of :data:`PROMPT_WORDS` words, so our mock
upstream, which echoes the last user message one SSE event per word, streams the same 50
content chunks as the fixed answer below.
"""

from __future__ import annotations

import hashlib
from typing import Final

import orjson

REQUEST_BYTES: Final = 1024
PROMPT_WORDS: Final = 50
MODEL: Final = "gpt-4o-mini"
CHAT_PATH: Final = "/v1/chat/completions"
PASSTHROUGH_PREFIX: Final = "/passthrough"
"""Scenario 2 sends to ``/passthrough/v1/chat/completions``: a path no dialect serves, so the
service only sees its headers; the benchmark's Envoy config strips the prefix on the way up."""

BENCH_KEY: Final = "sk-bench-0001"
"""The caller's gateway key; the bench policies hold only its SHA-256."""
BENCH_KEY_SHA256: Final = hashlib.sha256(BENCH_KEY.encode()).hexdigest()

ANSWER_HEADER: Final = "x-bench-answer"
"""Request header the upstream Envoy routes on: ``sse`` selects the streamed answer."""

_SENTENCE: Final = (
    "the quick brown fox jumps over the lazy dog while seven wizards quietly brew "
    "strong coffee for every tired engineer who benchmarks gateways late at night"
)
_WORDS = _SENTENCE.split()


def _filler(chars: int) -> str:
    """Ordinary English text of exactly ``chars`` characters (tokenizes like a real prompt)."""
    text = prompt_text(chars // 4 + 1)
    return text[:chars]


def prompt_text(words: int = PROMPT_WORDS) -> str:
    return " ".join(_WORDS[i % len(_WORDS)] for i in range(words))


def chat_request(stream: bool = False, size: int = REQUEST_BYTES) -> bytes:
    """The chat request, padded (system message) to exactly ``size`` bytes."""

    def build(padding: int) -> bytes:
        body: dict[str, object] = {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a terse assistant. " + _filler(padding)},
                {"role": "user", "content": prompt_text()},
            ],
            "max_tokens": 256,
            "temperature": 0,
        }
        if stream:
            body["stream"] = True
        return orjson.dumps(body)

    padding = size - len(build(0))
    if padding < 0:
        raise ValueError(f"the request cannot be {size} bytes: it needs {len(build(0))}")
    encoded = build(padding)
    assert len(encoded) == size
    return encoded


def _usage() -> dict[str, int]:
    prompt, completion = 230, PROMPT_WORDS
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def json_answer() -> bytes:
    """A complete non-streamed chat completion (echo of the prompt) with its usage block."""
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1767225600,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": prompt_text(), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(),
            "system_fingerprint": None,
        }
    )


def sse_answer() -> bytes:
    """OpenAI's streamed form of the same answer: a role chunk, one chunk per word, the
    finish chunk, the usage chunk (``stream_options.include_usage``) and ``[DONE]``."""
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1767225600,
        "model": MODEL,
        "system_fingerprint": None,
        "usage": None,
    }

    def event(delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

    words = prompt_text().split(" ")
    pieces = [words[0], *(" " + word for word in words[1:])]
    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": piece}) for piece in pieces]
    events.append(event({}, "stop"))
    events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": _usage()}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def content_chunks() -> int:
    """Content-bearing events in :func:`sse_answer` (one per prompt word)."""
    return PROMPT_WORDS
