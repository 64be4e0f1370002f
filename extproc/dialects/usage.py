"""What a provider says it used: token counts from JSON answers and from SSE streams.

Each API family reports usage in its own shape; this module reads them all into one
:class:`Usage`. Streams are read incrementally with a bounded carry-over buffer and only
events that can carry usage are JSON-decoded, so metering a 50-chunk stream costs a few
byte searches per chunk rather than 50 JSON parses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from extproc import sse

MAX_EVENT_BYTES = 1024 * 1024
"""A single SSE event larger than this is not buffered whole: only its tail is kept."""
CUT_EVENT_TAIL_BYTES = 64 * 1024
"""Of an event past that, the tail kept to find its usage in."""
MAX_REPORTED_TOKENS = 100_000_000
"""A usage report with a count above this (50 times the largest context window) is not
believed: the exchange is charged as if it had reported none. A broken or hostile
upstream's 10**19 would overflow Redis's counters and the audit record's integers."""


BYTES_PER_TOKEN = 4
"""For a JSON answer without usage: output tokens estimated from the bytes sent."""
STREAM_BYTES_PER_TOKEN = 64
"""For a stream cut before its usage arrived. An SSE event carries about one token in
150-250 bytes of JSON; 64 errs towards charging more than was sent, never much less."""


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    """Of ``input_tokens``, those written to the provider's prompt cache (Anthropic)."""
    cache_write_1h_input_tokens: int = 0
    """Of those, the ones written to Anthropic's 1-hour cache (billed at 2x the input
    price, against 1.25x for its 5-minute one)."""


def estimated(status: int, input_tokens: int, output_seen: int, cap: int | None) -> Usage:
    """What an exchange whose provider reported no usage is charged: an error answer
    nothing; no answer at all (the caller left first) its prompt; otherwise its prompt and
    the output seen, never more than was reserved (``cap``)."""
    if status == 0 or status >= 300:
        return Usage(input_tokens if status == 0 else 0, 0)
    return Usage(input_tokens, output_seen if cap is None else min(output_seen, cap))


def token_count(value: object) -> int:
    """A provider's token count: a non-negative int, anything else reads as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _openai(usage: Any) -> Usage | None:
    """Chat, completions and embeddings: prompt/completion tokens, cached prompt details."""
    if not isinstance(usage, dict):
        return None
    cached, written = _cache_details(usage.get("prompt_tokens_details"))
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if prompt is None:
        # Some OpenAI-compatible servers report only the total (embeddings); without
        # either, the prompt is not counted at all: estimated, not charged as none.
        totals = _counts(usage.get("total_tokens"), completion)
        if usage.get("total_tokens") is None or totals is None:
            return None
        prompt = max(0, totals[0] - totals[1])
    elif completion is None and usage.get("total_tokens") is not None:
        # And some only the prompt and the total: the rest is the output, not none.
        totals = _counts(usage.get("total_tokens"), prompt)
        if totals is None:
            return None
        completion = max(0, totals[0] - totals[1])
    counts = _counts(prompt, completion, cached, written)
    return None if counts is None else Usage(*counts)


def _responses(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    cached, written = _cache_details(usage.get("input_tokens_details"))
    counts = _counts(usage.get("input_tokens"), usage.get("output_tokens"), cached, written)
    return None if counts is None else Usage(*counts)


def _cache_details(details: Any) -> tuple[object, object]:
    """OpenAI's prompt cache reads and writes, both counted in the prompt (a model with a
    ``cache_write`` price was charged its writes at the input price)."""
    if not isinstance(details, dict):
        return None, None
    return details.get("cached_tokens"), details.get("cache_write_tokens")


def anthropic_usage(usage: Any) -> Usage | None:
    """Anthropic counts cache reads and writes apart from ``input_tokens``; we add them in."""
    if not isinstance(usage, dict):
        return None
    counts = _counts(
        usage.get("input_tokens"),
        usage.get("output_tokens"),
        usage.get("cache_read_input_tokens"),
        usage.get("cache_creation_input_tokens"),
    )
    if counts is None:
        return None
    prompt, output, cached, created = counts
    split = usage.get("cache_creation")
    hour = _counts(split.get("ephemeral_1h_input_tokens")) if isinstance(split, dict) else None
    hourly = min(hour[0], created) if hour is not None else 0
    return Usage(prompt + cached + created, output, cached, created, hourly)


def _counts(*reported: object) -> tuple[int, ...] | None:
    """A report's token counts, an absent one as 0; ``None`` (the report is not believed,
    the exchange is estimated) if one is not a non-negative integer or is past belief
    (:data:`MAX_REPORTED_TOKENS`): a negative count, a string, Lua's rendering of 1e19."""
    counts = []
    for value in reported:
        if value is None:
            counts.append(0)
        elif isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value <= MAX_REPORTED_TOKENS:
                return None
            counts.append(value)
        else:
            return None
    return tuple(counts)


def usage_from_body(dialect: str, body: Any) -> Usage | None:
    """Usage in a non-streamed JSON answer of ``dialect``, or ``None`` if it has none."""
    if not isinstance(body, dict):
        return None
    usage = body.get("usage")
    if dialect == "anthropic.messages":
        return anthropic_usage(usage)
    if dialect == "openai.responses":
        return _responses(usage)
    return _openai(usage)


OUTPUT_COUNTS = frozenset({"completion_tokens", "output_tokens", "total_tokens"})
"""The usage fields that count an answer's output (OpenAI's chat name; Anthropic's and the
Responses API's; a total, less the prompt, for servers that report no output count)."""


class StreamUsage:
    """Reads usage from an SSE answer chunk by chunk.

    Besides the provider's own usage report, it counts the content-bearing events it has
    seen: providers stream about one token per event, so when a stream is cut before the
    final usage arrives the count is the best available measure of output already sent.
    """

    __slots__ = ("_anthropic_start", "_cut", "_dialect", "_events", "_usage", "content_events")

    def __init__(self, dialect: str) -> None:
        self._dialect = dialect
        self._events = sse.Events()
        self._usage: Usage | None = None
        self._anthropic_start: dict[str, Any] | None = None
        """``message_start``'s usage as reported (believed), for ``message_delta``'s."""
        self._cut = False
        """The unfinished event grew past :data:`MAX_EVENT_BYTES`: only its tail is held."""
        self.content_events = 0

    @property
    def usage(self) -> Usage | None:
        return self._usage

    def feed(self, chunk: bytes) -> None:
        for event in self._events.feed(chunk):
            self._complete(event)
        if self._events.held > MAX_EVENT_BYTES:
            # Its tail only: usage comes last. A Responses stream's final event repeats
            # the whole response (a generated image's 2 MB of base64 in it), and dropping
            # it charged such a stream as if it had been cut before its usage.
            tail = self._events.rest()[-CUT_EVENT_TAIL_BYTES:]
            self._events.feed(tail)
            self._cut = True

    def finish(self) -> None:
        """The stream ended: read an unterminated last event, if any."""
        rest = self._events.rest()
        if rest.strip():
            self._complete(rest)

    def _complete(self, event: bytes) -> None:
        if not self._cut:
            self._event(event)
            return
        self._cut = False
        if self._dialect == "anthropic.messages":
            return  # its usage events are small: a huge one is no report of usage
        _, found = parsed_answer(bytearray(event))
        if found is not None:
            reader = _responses if self._dialect == "openai.responses" else _openai
            self._believe(found["usage"], reader)

    def _event(self, event: bytes) -> None:
        if b'"usage":{' not in event and b'"usage": {' not in event:
            # OpenAI sends "usage": null on every chunk before the last; skip the parse.
            if b'"delta"' in event or b'"text"' in event:
                self.content_events += 1
            return
        payload = _data_of(event)
        if payload is None:
            return
        if self._dialect == "anthropic.messages":
            self._anthropic_event(payload)
        elif self._dialect == "openai.responses":
            response = payload.get("response")
            if isinstance(response, dict):
                self._believe(response.get("usage"), _responses)
        else:
            self._believe(payload.get("usage"), _openai)
        if payload.get("choices"):
            self.content_events += 1

    def _believe(self, reported: Any, read: Callable[[Any], Usage | None]) -> None:
        """Take a usage report that counts the output and passes ``read``'s checks; any
        other (a malformed one after a good one, one without an output count: a stream's
        output is never taken to be 0 on a report's silence) leaves the last one taken."""
        if not isinstance(reported, dict) or not OUTPUT_COUNTS & reported.keys():
            return
        usage = read(reported)
        if usage is not None:
            self._usage = usage

    def _anthropic_event(self, payload: dict[str, Any]) -> None:
        """``message_start`` reports the prompt, ``message_delta`` the output: the usage is
        the provider's only once both came and were believed. A stream cut before its
        ``message_delta`` (the caller left, an error event) is estimated instead, from its
        content events: its start alone would charge no output at all."""
        kind = payload.get("type")
        if kind == "message_start":
            message = payload.get("message")
            reported = message.get("usage") if isinstance(message, dict) else None
            if anthropic_usage(reported) is not None:
                self._anthropic_start = reported
        elif kind == "message_delta":
            reported = payload.get("usage")
            start = self._anthropic_start
            if not isinstance(reported, dict):
                return
            if start is None and not any(reported.get(k) for k in _ANTHROPIC_PROMPT_FIELDS[:3]):
                return  # unbelievable: the last report believed, if any, stands
            usage = anthropic_usage(merged_anthropic_usage(start or {}, reported))
            if usage is not None:
                self._usage = usage


_ANTHROPIC_PROMPT_FIELDS = (
    "input_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cache_creation",
)


def merged_anthropic_usage(start: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """A ``message_delta``'s usage over its ``message_start``'s, field by field, as
    Anthropic's SDK accumulates them and as Envoy's lifted metadata overwrites them: each
    prompt field the delta repeats (cumulative) replaces the start's, one it leaves out
    keeps the start's; the output is the delta's. Merged as sums instead, a delta repeating
    ``input_tokens`` alone wiped out the start's cache reads, and charged a 20,000-token
    cached prompt as 12. One merge for budgets and for the usage a translated stream
    reports to an OpenAI client, so the two cannot disagree."""
    merged = {key: start[key] for key in _ANTHROPIC_PROMPT_FIELDS if key in start}
    merged.update(
        {key: delta[key] for key in _ANTHROPIC_PROMPT_FIELDS if delta.get(key) is not None}
    )
    merged["output_tokens"] = delta.get("output_tokens")
    if delta.get("output_tokens_details") is not None:
        merged["output_tokens_details"] = delta["output_tokens_details"]
    return merged


def _data_of(event: bytes) -> dict[str, Any] | None:
    text = sse.data(event)
    if text is None:
        return None
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


_BRACE_DEPTH = {0x7B: 1, 0x7D: -1}


def parsed_answer(raw: bytearray | None) -> tuple[Any, Any]:
    """``(answer, None)`` for a whole JSON answer; ``(None, {"usage": ...})`` when only its
    tail was kept (providers put ``usage`` last); ``(None, None)`` when neither parses."""
    if not raw:
        return None, None
    try:
        return orjson.loads(raw), None
    except orjson.JSONDecodeError:
        pass
    at = raw.rfind(b'"usage"')
    start = raw.find(b"{", at) if at != -1 else -1
    if start == -1:
        return None, None
    depth = 0
    for end in range(start, len(raw)):
        depth += _BRACE_DEPTH.get(raw[end], 0)
        if depth == 0:
            try:
                return None, {"usage": orjson.loads(raw[start : end + 1])}
            except orjson.JSONDecodeError:
                return None, None
    return None, None
