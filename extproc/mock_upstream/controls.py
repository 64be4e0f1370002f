"""Test controls carried in request headers, applied by one middleware before any handler.

Headers (not query parameters or a side channel) so that a test can drive them *through* the
gateway exactly as a client would, and the gateway forwards them untouched:

    x-mock-latency-ms: N       sleep N ms before answering (timeouts, slow upstreams)
    x-mock-status: CODE        answer CODE (400-599) with an error body in the API's dialect
    x-mock-chunk-delay-ms: N   streaming: write each SSE event separately, N ms apart
                               (see :mod:`.sse`)
    x-mock-cassette: NAME      answer with a real recorded response (see :mod:`.cassettes`)
    x-mock-fail: NAME[,NAME]   answer 503 if this mock's ``--name`` is listed (fail-over
                               tests: the header reaches every backend Envoy tries)
    x-mock-split-chars: N      streaming: send the echo in deltas of N characters instead
                               of one per token (an entity split across SSE events)
    x-mock-ratelimit: N        answer with the provider's own ``x-ratelimit-limit-tokens: N``
                               (as OpenAI does), which the gateway's budget headers replace
    x-mock-charset: utf-8      answer JSON as ``application/json; charset=utf-8``, as some
                               OpenAI-compatible servers do
    x-mock-cache-tokens: R,W[,H]  Anthropic: report R prompt tokens read from the prompt
                               cache and W written to it (H of them to the 1-hour cache),
                               apart from ``input_tokens`` as Anthropic does
                               (``cache_read_input_tokens``, ``cache_creation_input_tokens``,
                               ``cache_creation.ephemeral_1h_input_tokens``)
    x-mock-pad-bytes: N        JSON answers: add a member of N bytes before the others (an
                               answer past the gateway's 8 MiB, as many choices would make)
    x-mock-usage: total-only   chat: report ``prompt_tokens`` and ``total_tokens`` but no
                               ``completion_tokens``, as some OpenAI-compatible servers do

The same middleware records every API request (:mod:`.recorder`) and renders every
:class:`MockError` raised by a handler, so each of those is done in exactly one place.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Handler

from .cassettes import replay
from .errors import MockError, error_response
from .recorder import RECORDER

LATENCY_HEADER = "x-mock-latency-ms"
STATUS_HEADER = "x-mock-status"
CHUNK_DELAY_HEADER = "x-mock-chunk-delay-ms"
FAIL_HEADER = "x-mock-fail"
SPLIT_HEADER = "x-mock-split-chars"
RATELIMIT_HEADER = "x-mock-ratelimit"
CACHE_TOKENS_HEADER = "x-mock-cache-tokens"
CHARSET_HEADER = "x-mock-charset"
USAGE_HEADER = "x-mock-usage"
PAD_HEADER = "x-mock-pad-bytes"
MAX_PAD_BYTES = 64 * 1024 * 1024
MOCK_NAME = web.AppKey("mock_name", str)

# Control paths are never recorded or delayed: reading the record must not change it.
_UNCONTROLLED_PREFIXES = ("/_mock/", "/healthz")


def header_ms(request: web.Request, name: str) -> float | None:
    """A non-negative millisecond count from header ``name``, in seconds; None if absent."""
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        millis = float(raw)
    except ValueError:
        millis = -1.0
    if not 0.0 <= millis <= 600_000.0:
        raise MockError(400, f"{name} must be a number of milliseconds between 0 and 600000")
    return millis / 1000.0


def stream_deltas(request: web.Request, pieces: list[str]) -> list[str]:
    """The deltas a stream sends: one per token, or N-character slices when asked."""
    raw = request.headers.get(SPLIT_HEADER)
    if raw is None:
        return pieces
    if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
        raise MockError(400, f"{SPLIT_HEADER} must be a number of characters from 1 to 10000")
    size, text = int(raw), "".join(pieces)
    return [text[i : i + size] for i in range(0, len(text), size)]


def cache_tokens(request: web.Request) -> dict[str, object]:
    """Anthropic's prompt-cache usage fields the answer reports (none unless asked)."""
    raw = request.headers.get(CACHE_TOKENS_HEADER)
    if raw is None:
        return {}
    counts = raw.split(",")
    if len(counts) not in (2, 3) or not all(c.isdigit() for c in counts):
        raise MockError(
            400, f"{CACHE_TOKENS_HEADER} must be token counts: READ,WRITTEN[,WRITTEN_1H]"
        )
    read, written, hour = (int(c) for c in (*counts, "0")[:3])
    if hour > written:
        raise MockError(400, f"{CACHE_TOKENS_HEADER}: WRITTEN_1H is part of WRITTEN")
    return {
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": written,
        "cache_creation": {
            "ephemeral_5m_input_tokens": written - hour,
            "ephemeral_1h_input_tokens": hour,
        },
    }


def _names(header: str | None) -> set[str]:
    return {name.strip() for name in header.split(",")} if header else set()


def _forced_status(request: web.Request) -> int | None:
    raw = request.headers.get(STATUS_HEADER)
    if raw is None:
        return None
    try:
        status = int(raw)
    except ValueError:
        status = 0
    if not 400 <= status <= 599:
        raise MockError(400, f"{STATUS_HEADER} must be an HTTP status code between 400 and 599")
    return status


@web.middleware
async def controls_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record, delay, force a status, and render :class:`MockError` - in that order."""
    path = request.path
    if path.startswith(_UNCONTROLLED_PREFIXES):
        return await handler(request)
    request.app[RECORDER].record(request, await request.read())
    try:
        latency = header_ms(request, LATENCY_HEADER)
        if latency:
            await asyncio.sleep(latency)
        if request.app[MOCK_NAME] in _names(request.headers.get(FAIL_HEADER)):
            raise MockError(503, f"mock upstream {request.app[MOCK_NAME]!r} told to fail")
        status = _forced_status(request)
        if status is not None:
            raise MockError(status, f"mock upstream forced status {status} ({STATUS_HEADER})")
        return _padded(request, replay(request) or await handler(request))
    except MockError as error:
        return error_response(path, error)


def _padded(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """``response`` with the padding ``x-mock-pad-bytes`` asks for, if it is a JSON answer."""
    raw = request.headers.get(PAD_HEADER)
    if raw is None:
        return response
    if not raw.isdigit() or not 0 < int(raw) <= MAX_PAD_BYTES:
        raise MockError(400, f"{PAD_HEADER} must be a number of bytes from 1 to {MAX_PAD_BYTES}")
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return response
    assert isinstance(response.body, bytes)
    rest = response.body.lstrip()[1:]  # after the answer's opening brace
    comma = b"," if rest.lstrip() != b"}" else b""
    response.body = b'{"x_mock_padding":"' + b"x" * int(raw) + b'"' + comma + rest
    return response


ORGANIZATION_HEADERS = {"openai-organization": "mock-org", "anthropic-organization-id": "mock-org"}
"""The account a real provider names on every answer (a gateway keeps it from callers)."""


async def provider_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the headers a real provider adds to every answer."""
    if not request.path.startswith(_UNCONTROLLED_PREFIXES):
        response.headers.update(ORGANIZATION_HEADERS)
    limit = request.headers.get(RATELIMIT_HEADER)
    if limit is not None:
        response.headers["x-ratelimit-limit-tokens"] = limit
    charset = request.headers.get(CHARSET_HEADER)
    if charset is not None and response.content_type == "application/json":
        response.headers["content-type"] = f"application/json; charset={charset}"
