"""The answer side of the pipeline: status, usage, translation back, output guardrails.

response headers  note the status and the endpoint that served; budget and guardrail
                  headers; choose whether Envoy sends the body (streamed or whole)
response body     read usage from the upstream's bytes; translate (Anthropic → OpenAI);
                  run the output guardrails on what the caller gets
end (or cut)      work out what was used and settle the budget reservation
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import orjson

from extproc import routing, tools
from extproc.budgets.meter import NOTHING_USED, Cost, Meter, usage_cost
from extproc.decisions import CONTINUE, Decision, Forward, Reply
from extproc.dialects import TEXTLESS_DIALECTS
from extproc.dialects.json_body import set_values
from extproc.dialects.usage import (
    BYTES_PER_TOKEN,
    StreamUsage,
    Usage,
    estimated,
    parsed_answer,
    usage_from_body,
)
from extproc.errors import AnswerTooLarge, BadGateway, InvalidRequest
from extproc.exchange import Exchange
from extproc.guardrails.answer import drop_stale_logprobs
from extproc.guardrails.engine import describe, verdict_header
from extproc.pipeline import OFFLOAD_BODY_BYTES, offloaded, subject_of
from extproc.telemetry.bodies import recorded_answer


def on_response_headers(
    exchange: Exchange, headers: Mapping[str, str], end_of_stream: bool = False
) -> Decision:
    """Note the status; add budget and guardrail headers; ask for the body if a stage needs
    it: usage (budgets, audit), translation, output guardrails. ``end_of_stream``: the
    answer has no body (an HTTP/1 ``content-length: 0``; over HTTP/2 an empty body comes
    as a body message instead)."""
    if exchange.mcp_server is not None:
        return tools.on_response_headers(exchange, headers)
    exchange.response_status = int(headers.get(":status", "0") or 0)
    exchange.status = exchange.response_status
    exchange.served_by = headers.get(routing.HEADER_SERVED_BY)
    reservation, request = exchange.reservation, exchange.request
    content_type = headers.get("content-type", "")
    sse = content_type.lower().startswith("text/event-stream")
    ok = 200 <= exchange.response_status < 300 and request is not None
    guarded = _output_subject(exchange) if ok else None
    if guarded is not None or (ok and exchange.translation is not None):
        unreadable = _unreadable_form(exchange, headers, sse)
        if unreadable is None and end_of_stream and exchange.response_status != 204:
            unreadable = "it is empty"  # as over HTTP/2, where the empty body is judged
        if unreadable is not None:
            return exchange.reject(BadGateway(f"The provider's answer {_UNCHECKED}: {unreadable}."))
    wants_usage = ok and (reservation is not None or exchange.observe_response)
    if wants_usage:
        if sse:
            exchange.response_usage = StreamUsage(_upstream_dialect(exchange))
        else:
            exchange.response_tail = bytearray()
    if guarded is not None:
        _start_output_guard(exchange, sse, guarded)
    verdicts = verdict_header(exchange.verdicts)
    set_headers = (*(reservation.headers if reservation else ()), *verdicts)
    chunked = sse
    if exchange.translation is not None:
        # The body is rewritten: streamed chunk by chunk, or whole (answers and errors).
        chunked = exchange.translation.start(exchange.response_status, content_type)
        set_headers = (
            *set_headers,
            ("content-type", "text/event-stream" if chunked else "application/json"),
        )
    rewritten = (
        exchange.translation is not None
        or exchange.output_guard is not None
        or exchange.guard_answer
    )
    mode: Literal["streamed", "buffered"]
    if exchange.translation is not None or exchange.guard_answer:
        mode = "streamed" if chunked else "buffered"
    elif wants_usage or exchange.output_guard is not None:
        mode = "streamed"
    elif not set_headers:
        return CONTINUE
    else:
        return Forward(set_headers=set_headers)
    exchange.answer_whole = mode == "buffered"
    return Forward(
        set_headers=set_headers,
        remove_headers=("content-length",) if rewritten else (),
        response_body=mode,
    )


_UNCHECKED = "could not be read by the gateway"


def _unreadable_form(exchange: Exchange, headers: Mapping[str, str], sse: bool) -> str | None:
    """Why a 2xx answer the gateway must read (to translate or guard it) cannot be read
    as what was asked for, if it cannot: read as the other form, or not at all, it would
    reach the caller unchecked, since SDKs read it whatever its content-type says."""
    assert exchange.request is not None
    if headers.get("content-encoding", "identity").lower() != "identity":
        return "it is compressed"  # Envoy asks providers for plain answers
    if sse and not exchange.request.stream:
        return "it is a stream, and the request asked for one JSON answer"
    if exchange.request.stream and not sse:
        return "it is not a stream, and the request asked for one"
    return None


def _output_subject(exchange: Exchange) -> dict[str, Any] | None:
    """Who and what the output guardrails judge in this exchange's answer, if they read it
    at all (``None``: they do not)."""
    assert exchange.request is not None and exchange.principal is not None
    if exchange.request.dialect in TEXTLESS_DIALECTS:
        return None  # vectors, no text: held whole for nothing, a batch's answer past 8 MiB failed
    subject = subject_of(exchange, exchange.principal, exchange.model)
    return subject if exchange.policy.guardrails.applies("output", **subject) else None


def _start_output_guard(exchange: Exchange, sse: bool, subject: dict[str, Any]) -> None:
    """For an answer the guards read (``subject``, :func:`_output_subject`): a stream
    guard, or the whole answer held to be checked."""
    assert exchange.request is not None
    if sse:
        exchange.output_guard = exchange.policy.guardrails.stream(
            exchange.request.dialect, **subject
        )
    else:
        exchange.guard_answer = True


def _upstream_dialect(exchange: Exchange) -> str:
    """The API the upstream answers in (Anthropic's for a translated request)."""
    assert exchange.request is not None
    return "anthropic.messages" if exchange.translation else exchange.request.dialect


MAX_RESPONSE_BYTES = 16 * 1024 * 1024
"""JSON answers are kept up to this size for their usage; beyond it only the tail is kept
(providers put ``usage`` last)."""
_TAIL_BYTES = 64 * 1024


def _kept_bytes(exchange: Exchange) -> int:
    """How much of a JSON answer is kept whole: an embeddings answer (vectors, often
    megabytes) only for its usage, so only its tail."""
    assert exchange.request is not None
    if exchange.request.dialect in TEXTLESS_DIALECTS:
        return _TAIL_BYTES
    return MAX_RESPONSE_BYTES


async def read_response_body(exchange: Exchange, chunk: bytes, end: bool) -> Decision:
    """:func:`on_response_body`, in a worker thread for a chunk over
    :data:`~extproc.pipeline.OFFLOAD_BODY_BYTES`: a buffered answer arrives whole (up to
    Envoy's 8 MiB limit), and translating, guarding and reading it in one go on the event
    loop would hold up every other stream. It touches only this exchange."""
    return await offloaded(len(chunk), on_response_body, exchange, chunk, end)


def on_response_body(exchange: Exchange, chunk: bytes, end: bool) -> Decision:
    """Read usage from the upstream's bytes; translate and guard what the caller gets."""
    if exchange.answer_whole and not end:
        return _too_large(exchange, len(chunk))
    if exchange.mcp_server is not None:
        return tools.on_response_body(exchange, chunk, end)
    if exchange.response_usage is not None:
        exchange.response_usage.feed(chunk)
    elif exchange.response_tail is not None:
        exchange.response_bytes += len(chunk)
        exchange.response_tail += chunk
        if len(exchange.response_tail) > _kept_bytes(exchange):
            del exchange.response_tail[:-_TAIL_BYTES]
    out: bytes | None = None  # None: the chunk passes unchanged
    translation = exchange.translation
    if translation is not None:
        out = translation.chunk(chunk, end)
        if translation.unreadable:
            return _unreadable(exchange, "could not be translated to OpenAI's format")
    if exchange.output_guard is not None:
        out = exchange.output_guard.feed(chunk if out is None else out)
        if end:
            out += exchange.output_guard.finish()
    elif exchange.guard_answer:  # held whole (answer_whole): this chunk is the answer
        guarded = _guard_answer(exchange, chunk if out is None else out)
        if isinstance(guarded, Reply):
            return guarded
        out = guarded if guarded is not None else out
        return Forward(body=out, set_headers=verdict_header(exchange.verdicts)) if out else CONTINUE
    if out is None:
        return CONTINUE
    return Forward(body=out)


def _guard_answer(exchange: Exchange, body: bytes) -> Reply | bytes | None:
    """Check a whole answer: a block becomes an error in the caller's dialect, rewrites a
    new body; ``None`` when nothing changed."""
    assert exchange.request is not None and exchange.principal is not None
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        # Nothing the guards can read, so nothing they let through (fail closed).
        return _unreadable(exchange, "could not be checked by the gateway's output guardrails")
    result = exchange.policy.guardrails.check_answer(
        exchange.request.dialect,
        answer,
        **subject_of(exchange, exchange.principal, exchange.model),
    )
    exchange.verdicts.extend(describe(result))
    if result.blocked:
        error = InvalidRequest(
            result.message or f"The answer was blocked by guardrail '{result.blocked_by}'.",
            code="guardrail_blocked",
        )
        record_answer(exchange, {}, exchange.request.dialect)  # the caller got no text
        return exchange.reject(error)
    if not result.rewrites:
        record_answer(exchange, answer, exchange.request.dialect)
        return None
    # Not apply_rewrites: an answer nested too deep to write back is the upstream's doing,
    # not a request the caller must fix: a 502, as for one the guards cannot read.
    set_values(answer, result.rewrites)
    drop_stale_logprobs(answer, result.rewrites)
    record_answer(exchange, answer, exchange.request.dialect)
    try:
        return orjson.dumps(answer)
    except orjson.JSONEncodeError:
        return _unreadable(exchange, "could not be rewritten by the gateway's output guardrails")


def _unreadable(exchange: Exchange, why: str) -> Reply:
    """A 502 in place of a 2xx answer the gateway must read and cannot (not a JSON answer
    it can read and write back)."""
    return exchange.reject(BadGateway(f"The provider's answer {why}: it is no JSON answer."))


def _too_large(exchange: Exchange, held: int) -> Reply:
    """The 502 for an answer wanted whole (to translate, guard or narrow it) that passed
    Envoy's buffer limit: Envoy sends what it holds, ``held`` bytes, before the end.
    Charged as a JSON answer without usage, from its size (up to the reserved output).

    Envoy also sends a body before its end when trailers follow it, which no LLM or MCP
    API sends: such an answer gets the same 502 (fail closed), not a pass unchecked."""
    exchange.response_bytes += held
    return exchange.reject(AnswerTooLarge())


def used(exchange: Exchange, answer: Any = None) -> Cost:
    """What the exchange used, from the provider's usage or, failing that, from what is known.

    Errors answered by the provider, and requests the gateway answered before anything
    went upstream, cost nothing. A stream cut before its usage report is charged the
    counted prompt and one token per content event already sent; a JSON answer without
    usage, its prompt and one token per 4 bytes (an answer the gateway could not read, or
    from an API with no output, its prompt alone). A call that never got an answer (the
    client gone first) is charged its prompt. ``answer`` is the JSON answer, parsed (or
    the ``usage`` found in its kept tail).
    """
    model, reservation = exchange.model, exchange.reservation
    assert model is not None
    if exchange.error_code is not None and not exchange.response_status:
        # The gateway answered before anything went upstream (a request its translation
        # refuses once the budget is reserved, a phase that failed): nothing was used.
        return NOTHING_USED
    usage = _reported_usage(exchange, answer)
    if usage is not None:
        exchange.usage_source = "provider"
        return usage_cost(model, usage)
    exchange.usage_source = "estimate"
    request = exchange.request
    if exchange.response_usage is not None:
        seen = exchange.response_usage.content_events
    elif exchange.error_code == BadGateway.default_code or (
        request is not None and request.max_output_tokens == 0
    ):
        seen = 0  # not an answer we could read (a proxy's page), or an API with no output
    else:  # a JSON answer without a usage block: from its size
        seen = exchange.response_bytes // BYTES_PER_TOKEN
    cap = reservation.reserved.output_tokens if reservation is not None else None
    return usage_cost(model, estimated(exchange.response_status, exchange.input_tokens, seen, cap))


def record_answer(exchange: Exchange, answer: Any, dialect: str | None = None) -> None:
    """Keep the answer's redacted texts for the audit record, when the policy asks, once:
    the output guards record what the caller got (their rewrites, or nothing for a block)
    before the end of the answer would record the upstream's."""
    redact, request = exchange.policy.audit_redactor, exchange.request
    if redact is None or request is None or answer is None:
        return
    if exchange.recorded_answer is None:
        exchange.recorded_answer = recorded_answer(
            redact, dialect or _upstream_dialect(exchange), answer
        )


def account(exchange: Exchange) -> None:
    """Work out what the exchange used, once its answer is over (or cut).

    Known for every exchange that reserved a budget or whose answer the service saw;
    ``None`` for one forwarded without either (nothing to measure it by).
    """
    _judged_stream(exchange)
    seen = exchange.reservation is not None or exchange.response_status != 0
    if exchange.used is None and exchange.model is not None and seen:
        # A JSON answer is parsed once here, for its usage and for the audit record.
        whole, usage_only = parsed_answer(exchange.response_tail)
        exchange.used = used(exchange, whole if whole is not None else usage_only)
        record_answer(exchange, whole)


def _judged_stream(exchange: Exchange) -> None:
    """The stream guard's verdicts into the audit record, once, whether the stream ended
    or was cut (SDKs close it at a block's error event, before the provider ends)."""
    guard = exchange.output_guard
    if guard is None or exchange.stream_judged:
        return
    exchange.stream_judged = True
    result = guard.result
    exchange.verdicts.extend(describe(result))
    if result.blocked:
        exchange.error_code = exchange.error_code or "guardrail_blocked"


async def settle(exchange: Exchange, meter: Meter) -> bool:
    """Account the exchange and replace its reservation with what was used (idempotent);
    ``False`` if another process settled (and reported) it first, from its ticket.

    Accounting parses a kept JSON answer; one over
    :data:`~extproc.pipeline.OFFLOAD_BODY_BYTES` is parsed in a worker thread."""
    await offloaded(_unaccounted_bytes(exchange), account, exchange)
    reservation = exchange.reservation
    if reservation is None or reservation.settled or exchange.model is None:
        return True
    assert exchange.used is not None
    return await meter.settle(reservation, exchange.used)


def keeps_large_answer(exchange: Exchange) -> bool:
    """Whether accounting has yet to parse a kept answer too big to parse on the event loop."""
    return _unaccounted_bytes(exchange) > OFFLOAD_BODY_BYTES


def _unaccounted_bytes(exchange: Exchange) -> int:
    """The kept answer :func:`account` would parse (0 once the exchange is accounted)."""
    kept = exchange.response_tail
    return 0 if kept is None or exchange.used is not None else len(kept)


def _reported_usage(exchange: Exchange, answer: Any) -> Usage | None:
    if exchange.response_usage is not None:
        exchange.response_usage.finish()
        return exchange.response_usage.usage
    if answer is not None and exchange.request is not None:
        return usage_from_body(_upstream_dialect(exchange), answer)
    return None
