"""Sending answers: a JSON body, or a stream of server-sent events.

JSON goes through orjson straight to bytes. A stream is, by default, written in a single
write: every event is still its own ``data:`` record (one per token), but the mock spends one
syscall per answer, so it never becomes the bottleneck in a benchmark. A test that needs real
chunking (to exercise the gateway's streamed body processing, or a client abort mid-stream)
sends ``x-mock-chunk-delay-ms: N``: then every event is written and flushed separately, N ms
apart (``0`` means separately but without sleeping).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator

import orjson
from aiohttp import web

from .controls import CHUNK_DELAY_HEADER, header_ms

DONE = b"data: [DONE]\n\n"


def json_response(payload: object) -> web.Response:
    """A 200 ``application/json`` answer, serialised once with orjson."""
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def data_event(payload: object) -> bytes:
    """An unnamed event (OpenAI style): ``data: {json}``."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def open_object(payload: dict[str, object]) -> bytes:
    """``payload`` as JSON without its closing brace, ready for one more member.

    With :func:`text_events` this lets a stream encode its envelope (id, model, ...) once and
    only the token text per event: the per-token cost is what bounds the mock's throughput.
    """
    encoded = orjson.dumps(payload)
    return (encoded[:-1] + b",") if len(encoded) > 2 else b"{"


def text_events(head: bytes, texts: Iterable[str], tail: bytes) -> Iterator[bytes]:
    """One event per text: ``head + json(text) + tail`` (together a complete SSE event)."""
    for text in texts:
        yield head + orjson.dumps(text) + tail


def named_event(name: str, payload: object) -> bytes:
    """A named event (Anthropic style): ``event: name`` then ``data: {json}``."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


async def send(request: web.Request, events: Iterable[bytes]) -> web.StreamResponse:
    """Stream ``events`` as ``text/event-stream`` (chunked), honouring the chunk delay."""
    delay = header_ms(request, CHUNK_DELAY_HEADER)
    response = web.StreamResponse(headers={"cache-control": "no-cache"})
    response.content_type = "text/event-stream"
    response.charset = "utf-8"
    try:
        await response.prepare(request)
        if delay is None:
            # Headers, the whole body and the last chunk marker leave in a single write.
            await response.write_eof(b"".join(events))
            return response
        for index, event in enumerate(events):
            if index and delay:
                await asyncio.sleep(delay)
            await response.write(event)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away mid-stream: nothing left to send, nothing to log
    return response
