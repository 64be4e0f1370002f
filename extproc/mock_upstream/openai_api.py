"""OpenAI Chat Completions and legacy Completions: echo the prompt back, like a parrot model.

Chat echoes the last user message's text; Completions echo the prompt. Both honour the token
limit (truncating the echo and finishing with ``"length"``) and stream in OpenAI's SSE format:
one chunk per token, a final chunk carrying ``finish_reason``, then - when
``stream_options.include_usage`` is set - a chunk with ``choices: []`` and ``usage``, and
``data: [DONE]``. As the real API does with ``include_usage``, every earlier chunk carries
``"usage": null``. Token counts follow :mod:`.tokens`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from aiohttp import web

from . import body as fields
from . import tokens
from .controls import USAGE_HEADER, stream_deltas
from .errors import MockError
from .ids import next_id
from .replies import DONE, data_event, json_response, open_object, send, text_events

MODELS = ("mock-echo", "mock-embedding")


def _usage(prompt_tokens: int, completion_tokens: int, total_only: bool = False) -> dict[str, int]:
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if total_only:
        del usage["completion_tokens"]
    return usage


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: echo the last user message."""
    body = await fields.read_object(request)
    messages = fields.messages(body)
    limit = fields.token_limit(body, "max_tokens", "max_completion_tokens")
    stream = fields.flag(body, "stream")
    pieces, truncated = tokens.truncate(fields.last_user_text(messages), limit)
    total_only = request.headers.get(USAGE_HEADER) == "total-only"
    usage = _usage(tokens.count_all(fields.all_texts(messages)), len(pieces), total_only)
    finish = "length" if truncated else "stop"
    head = {
        "id": next_id(request, "chatcmpl"),
        "created": int(time.time()),
        "model": fields.model(body, "mock-echo"),
    }
    if stream:
        deltas = stream_deltas(request, pieces)
        return await send(request, _chat_events(head, deltas, finish, usage, body))
    return json_response(
        {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
            "system_fingerprint": None,
        }
    )


def _chat_events(
    head: dict[str, object],
    pieces: list[str],
    finish: str,
    usage: dict[str, int],
    body: fields.JsonObject,
) -> Iterator[bytes]:
    with_usage = fields.include_usage(body)
    base = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}
    if with_usage:
        base["usage"] = None

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return data_event({**base, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    yield from text_events(
        b"data: " + open_object(base) + b'"choices":[{"index":0,"delta":{"content":',
        pieces,
        b'},"logprobs":null,"finish_reason":null}]}\n\n',
    )
    yield chunk({}, finish)
    if with_usage:
        yield data_event({**base, "choices": [], "usage": usage})
    yield DONE


def _prompt_strings(body: fields.JsonObject) -> list[str]:
    """The prompt's strings: a string, or the strings of an array (token arrays carry none)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        return [item for item in prompt if isinstance(item, str)]
    raise MockError(400, "'prompt' must be a string or an array", param="prompt")


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``: echo the prompt (the first one, when given an array)."""
    body = await fields.read_object(request)
    prompts = _prompt_strings(body)
    limit = fields.token_limit(body, "max_tokens")
    pieces, truncated = tokens.truncate(prompts[0] if prompts else "", limit)
    usage = _usage(tokens.count_all(prompts), len(pieces))
    finish = "length" if truncated else "stop"
    head = {
        "id": next_id(request, "cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": fields.model(body, "mock-echo"),
    }
    if fields.flag(body, "stream"):
        return await send(request, _completion_events(head, pieces, finish, usage, body))
    choice = {"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": finish}
    return json_response({**head, "choices": [choice], "usage": usage})


def _completion_events(
    head: dict[str, object],
    pieces: list[str],
    finish: str,
    usage: dict[str, int],
    body: fields.JsonObject,
) -> Iterator[bytes]:
    with_usage = fields.include_usage(body)
    base = {**head, "usage": None} if with_usage else head

    def chunk(text: str, finish_reason: str | None = None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return data_event({**base, "choices": [choice]})

    yield from text_events(
        b"data: " + open_object(base) + b'"choices":[{"text":',
        pieces,
        b',"index":0,"logprobs":null,"finish_reason":null}]}\n\n',
    )
    yield chunk("", finish)
    if with_usage:
        yield data_event({**base, "choices": [], "usage": usage})
    yield DONE


async def models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the mock's own model names (the gateway normally answers this)."""
    return json_response(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "mock-upstream"}
                for name in MODELS
            ],
        }
    )
