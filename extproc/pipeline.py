"""The policy pipeline: from (policy snapshot, exchange phase) to a decision.

Adapters (ext_proc today, ext_authz next) call one function per phase and translate the
returned :class:`~extproc.decisions.Forward` or :class:`~extproc.decisions.Reply` into
their protocol. Every :class:`~extproc.errors.GatewayError` raised by a stage is rendered
here, in the caller's dialect, so adapters never decide what an error looks like.

    request headers   identify → answer /v1/models → choose the phases still needed
    request body      parse (dialect) → authorize model → count prompt tokens
                      (``prepare_request_body``: CPU only, may run in a thread)
                      → reserve budget → route + body rewrites (``finish_request_body``)
    response headers  note the status; budget headers; stream the body if usage is needed
    response body     read usage; at the end (or when the stream is cut) settle the budget
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from extproc import access, identity, routing
from extproc.budgets.meter import Cost, Meter, Reservation, prompt_tokens, usage_cost
from extproc.decisions import CONTINUE, Decision, Forward, Headers, Reply
from extproc.dialects import Dialect, Envelope, LLMRequest, dialect_for_path, envelope_for_path
from extproc.dialects.base import JsonPath
from extproc.dialects.envelopes import render_error
from extproc.dialects.json_body import apply_rewrites, decode_body
from extproc.dialects.usage import StreamUsage, Usage, usage_from_body
from extproc.errors import GatewayError, InvalidRequest, NotFound
from extproc.identity import Principal
from extproc.models_listing import MODELS_PATH, list_models
from extproc.policy.compiled import CatalogueModel, CompiledPolicy
from extproc.routing import ResponseTranslation

TRUSTED_HEADER_PREFIX = "x-gateway-"
"""Headers the gateway sets for upstreams and later filters; client copies are removed."""
HEADER_TEAM = "x-gateway-team"
HEADER_USER = "x-gateway-user"
HEADER_KEY_ID = "x-gateway-key-id"
CREDENTIAL_HEADERS = ("authorization", "x-api-key")
"""Where callers put their gateway key; never forwarded upstream."""
OFFLOAD_BODY_BYTES = 256 * 1024
"""Bodies above this are parsed and counted in a worker thread, so one huge prompt never
stalls the event loop (and every other stream on it)."""


@dataclass(slots=True)
class Exchange:
    """Typed state of one HTTP request/response pair, owned by one ext_proc stream."""

    policy: CompiledPolicy
    method: str = ""
    path: str = ""
    envelope: Envelope = "openai"
    dialect: Dialect | None = None
    principal: Principal | None = None
    request: LLMRequest | None = None
    model: CatalogueModel | None = None
    request_id: str = ""
    trace_id: str | None = None
    """From the caller's W3C ``traceparent`` (forwarded upstream untouched by Envoy)."""
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    """Guardrail verdicts (rule, action, entity types, counts; never matched text)."""
    input_tokens: int = 0
    """Prompt tokens counted before the call (only when a budget needs them)."""
    rewrites: dict[JsonPath, Any] = field(default_factory=dict)
    """Body changes staged by stages, applied in one serialisation."""
    reservation: Reservation | None = None
    response_status: int = 0
    response_usage: StreamUsage | None = None
    response_tail: bytearray | None = None
    """The JSON answer (bounded), for its usage block."""
    translation: ResponseTranslation | None = None
    """Set when an OpenAI chat request goes to an Anthropic backend."""
    served_by: str | None = None
    """The Envoy cluster that answered (after retries and fail-over)."""
    observe_response: bool = False
    """Set by the adapter when audit or metrics need every answer's status."""
    status: int = 0
    """The HTTP status the caller got: ours when we answered, else the upstream's."""
    error_code: str | None = None
    used: Cost | None = None
    usage_source: str = "none"
    """Where ``used`` came from: ``provider`` (its usage block) or ``estimate``."""
    started: float = field(default_factory=time.monotonic)
    durations: dict[str, float] = field(default_factory=dict)
    """Seconds of service time per phase (added up when a phase repeats)."""

    @property
    def metered(self) -> bool:
        return self.principal is not None and bool(self.principal.limits)


Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def on_request_headers(
    exchange: Exchange,
    headers: Mapping[str, str],
    metadata: Mapping[str, Any] | None,
    end_of_stream: bool,
    clock: Clock = utc_now,
    peer: str | None = None,
) -> Decision:
    """Identify the caller and decide everything the headers alone can decide.

    ``peer`` is the SPIFFE id of the client certificate Envoy verified, if any.
    """
    exchange.method = headers.get(":method", "")
    exchange.path = headers.get(":path", "")
    exchange.envelope = envelope_for_path(exchange.path)
    exchange.request_id = headers.get("x-request-id") or uuid.uuid4().hex
    exchange.trace_id = trace_id(headers.get("traceparent"))
    try:
        return _request_headers(exchange, headers, metadata, end_of_stream, clock, peer)
    except GatewayError as error:
        return _reject(exchange, error)


async def authorize(
    exchange: Exchange,
    headers: Mapping[str, str],
    metadata: Mapping[str, Any] | None,
    body: bytes | None,
    peer: str | None,
    meter: Meter,
    clock: Clock = utc_now,
) -> Decision:
    """The ext_authz decision: identity, RBAC on the body's model, a budget pre-check.

    The same stages as ext_proc's request phases, minus what an authorizer cannot do
    (rewrite the body, reserve a budget it could never settle).
    """
    decision = on_request_headers(exchange, headers, metadata, False, clock, peer)
    if not isinstance(decision, Forward) or exchange.dialect is None or body is None:
        return decision
    if len(body) > OFFLOAD_BODY_BYTES:
        rejected = await asyncio.to_thread(prepare_request_body, exchange, body)
    else:
        rejected = prepare_request_body(exchange, body)
    if rejected is not None:
        return rejected
    request, model, principal = exchange.request, exchange.model, exchange.principal
    assert request is not None and model is not None and principal is not None
    try:
        if principal.limits:
            await meter.precheck(
                principal.limits, model, exchange.input_tokens, request.max_output_tokens, clock()
            )
    except GatewayError as error:
        return _reject(exchange, error)
    return Forward(
        set_headers=(*decision.set_headers, *routing.route_headers(model)),
        remove_headers=decision.remove_headers,
    )


def _request_headers(
    exchange: Exchange,
    headers: Mapping[str, str],
    metadata: Mapping[str, Any] | None,
    end_of_stream: bool,
    clock: Clock,
    peer: str | None,
) -> Decision:
    policy = exchange.policy
    principal = identity.identify(policy, headers, metadata, clock(), peer)
    exchange.principal = principal
    path = exchange.path.partition("?")[0]
    if path == MODELS_PATH or path.startswith(MODELS_PATH + "/"):
        if exchange.method != "GET":
            raise _invalid_url(exchange)
        exchange.status = 200
        return list_models(access.visible_models(policy, principal), path, headers)

    scrubbed = _scrubbed_headers(headers)
    exchange.dialect = dialect_for_path(exchange.path)
    if exchange.dialect is None:
        if policy.unknown_paths == "reject":
            raise _invalid_url(exchange)
        return Forward(
            set_headers=_identity_headers(principal),
            remove_headers=scrubbed,
            skip_request_body=True,
            clear_route_cache=bool(scrubbed),  # a client-set routing header must not stick
        )
    if exchange.method != "POST":
        raise _invalid_url(exchange)
    if end_of_stream:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    return Forward(
        set_headers=_identity_headers(principal),
        remove_headers=scrubbed,
        process_response=exchange.metered or exchange.observe_response,
    )


def prepare_request_body(exchange: Exchange, raw: bytes) -> Reply | None:
    """The CPU-only part of the body phase: parse, authorize, count prompt tokens.

    Returns a :class:`Reply` to reject, ``None`` to go on with :func:`finish_request_body`.
    Safe to run in a worker thread: it touches only this exchange.
    """
    try:
        dialect, principal = exchange.dialect, exchange.principal
        if dialect is None or principal is None:
            # Envoy only sends a body after a headers answer that asked for it.
            raise InvalidRequest("Request body received before its headers were authorised.")
        request = dialect.parse(decode_body(raw))
        exchange.request = request
        model = access.authorize_model(exchange.policy, principal, request.model)
        exchange.model = model
        routing.check_provider(dialect, model)
        if routing.translates(dialect, model):
            exchange.translation = ResponseTranslation(
                requested_model=request.model, include_usage=routing.include_usage(request)
            )
        elif routing.upstream_model(model) != request.model:
            exchange.rewrites[("model",)] = routing.upstream_model(model)
        if exchange.metered:
            exchange.input_tokens = prompt_tokens(model, request)
            if exchange.translation is None:
                exchange.rewrites.update(dialect.stream_usage_rewrites(request))
    except GatewayError as error:
        return _reject(exchange, error)
    return None


async def finish_request_body(exchange: Exchange, meter: Meter, clock: Clock = utc_now) -> Decision:
    """Reserve the budget, then route and apply every staged body change at once."""
    request, model, principal = exchange.request, exchange.model, exchange.principal
    assert request is not None and model is not None and principal is not None
    dialect = exchange.dialect
    assert dialect is not None
    try:
        if principal.limits:
            reservation = await meter.reserve(
                principal.limits,
                model,
                exchange.input_tokens,
                request.max_output_tokens,
                exchange.policy.default_max_output_tokens,
                exchange.request_id,
                clock(),
            )
            exchange.reservation = reservation
            cap = reservation.output_cap if reservation is not None else None
            if cap is not None and dialect.output_cap_field is not None:
                exchange.rewrites[(dialect.output_cap_field,)] = cap
    except GatewayError as error:
        return _reject(exchange, error)
    headers = routing.route_headers(model)
    if exchange.translation is not None:
        try:
            translated, extra = routing.translated_request(
                request, exchange.rewrites, model, exchange.policy.default_max_output_tokens
            )
        except GatewayError as error:
            return _reject(exchange, error)  # the reservation is released when the stream ends
        return Forward(set_headers=(*headers, *extra), body=translated, clear_route_cache=True)
    body = apply_rewrites(request.body, exchange.rewrites) if exchange.rewrites else None
    return Forward(set_headers=headers, body=body, clear_route_cache=True)


def on_response_headers(exchange: Exchange, headers: Mapping[str, str]) -> Decision:
    """Note the status; add budget headers; ask for the body if usage or translation need it."""
    exchange.response_status = int(headers.get(":status", "0") or 0)
    exchange.status = exchange.response_status
    exchange.served_by = headers.get(routing.HEADER_SERVED_BY)
    reservation = exchange.reservation
    content_type = headers.get("content-type", "")
    streamed = content_type.startswith("text/event-stream")
    wants_usage = (
        200 <= exchange.response_status < 300
        and exchange.request is not None
        and (reservation is not None or exchange.observe_response)
    )
    if wants_usage:
        if streamed:
            exchange.response_usage = StreamUsage(_upstream_dialect(exchange))
        else:
            exchange.response_tail = bytearray()
    budget_headers = reservation.headers if reservation is not None else ()
    if exchange.translation is not None:
        # The body is rewritten: streamed chunk by chunk, or whole (answers and errors).
        chunked = exchange.translation.start(exchange.response_status, content_type)
        return Forward(
            set_headers=(
                *budget_headers,
                ("content-type", "text/event-stream" if chunked else "application/json"),
            ),
            remove_headers=("content-length",) if chunked else (),
            response_body="streamed" if chunked else "buffered",
        )
    if reservation is None and not wants_usage:
        return CONTINUE
    return Forward(set_headers=budget_headers, response_body="streamed" if wants_usage else None)


def _upstream_dialect(exchange: Exchange) -> str:
    """The API the upstream answers in (Anthropic's for a translated request)."""
    assert exchange.request is not None
    return "anthropic.messages" if exchange.translation else exchange.request.dialect


MAX_RESPONSE_BYTES = 16 * 1024 * 1024
"""JSON answers are kept up to this size for their usage; beyond it only the tail is kept
(providers put ``usage`` last)."""
_TAIL_BYTES = 64 * 1024


def on_response_body(exchange: Exchange, chunk: bytes, end: bool) -> Decision:
    """Feed one chunk of the answer to the usage reader; translate it if needed."""
    if exchange.response_usage is not None:
        exchange.response_usage.feed(chunk)
    elif exchange.response_tail is not None:
        exchange.response_tail += chunk
        if len(exchange.response_tail) > MAX_RESPONSE_BYTES:
            del exchange.response_tail[:-_TAIL_BYTES]
    translation = exchange.translation
    if translation is None:
        return CONTINUE
    replaced = translation.chunk(chunk, end)
    if replaced is None:
        return CONTINUE
    return Forward(body=replaced, body_is_chunk=translation.stream is not None)


def used(exchange: Exchange) -> Cost:
    """What the exchange used, from the provider's usage or, failing that, from what is known.

    Errors answered by the provider cost nothing. A stream cut before its usage report
    is charged the counted prompt and one token per content event already sent. A call
    that never got an answer (client gone first) is charged its prompt.
    """
    model, reservation = exchange.model, exchange.reservation
    assert model is not None
    usage = _reported_usage(exchange)
    if usage is not None:
        exchange.usage_source = "provider"
        return usage_cost(model, usage)
    exchange.usage_source = "estimate"
    status = exchange.response_status
    if status >= 300 or (status == 0 and exchange.response_usage is None):
        tokens_in = exchange.input_tokens if status == 0 else 0
        return usage_cost(model, Usage(tokens_in, 0))
    streamed = exchange.response_usage.content_events if exchange.response_usage else 0
    if reservation is not None:
        streamed = min(streamed, reservation.reserved.output_tokens)
    return usage_cost(model, Usage(exchange.input_tokens, streamed))


def account(exchange: Exchange) -> None:
    """Work out what the exchange used, once its answer is over (or cut).

    Known for every exchange that reserved a budget or whose answer the service saw;
    ``None`` for one forwarded without either (nothing to measure it by).
    """
    seen = exchange.reservation is not None or exchange.response_status != 0
    if exchange.used is None and exchange.model is not None and seen:
        exchange.used = used(exchange)


async def settle(exchange: Exchange, meter: Meter) -> None:
    """Account the exchange and replace its reservation with what was used (idempotent)."""
    account(exchange)
    reservation = exchange.reservation
    if reservation is None or reservation.settled or exchange.model is None:
        return
    assert exchange.used is not None
    await meter.settle(reservation, exchange.model, exchange.used)


def _reported_usage(exchange: Exchange) -> Usage | None:
    if exchange.response_usage is not None:
        exchange.response_usage.finish()
        return exchange.response_usage.usage
    if exchange.response_tail and exchange.request is not None:
        return usage_from_body(_upstream_dialect(exchange), _json_or_tail(exchange.response_tail))
    return None


def _json_or_tail(raw: bytearray) -> Any:
    """The parsed answer; if only its tail was kept, the ``usage`` object found in it."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    at = raw.rfind(b'"usage"')
    start = raw.find(b"{", at) if at != -1 else -1
    if start == -1:
        return None
    depth = 0
    for end in range(start, len(raw)):
        depth += {0x7B: 1, 0x7D: -1}.get(raw[end], 0)
        if depth == 0:
            try:
                return {"usage": orjson.loads(raw[start : end + 1])}
            except orjson.JSONDecodeError:
                return None
    return None


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``), if valid."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    try:
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1].lower()


def _reject(exchange: Exchange, error: GatewayError) -> Reply:
    """Render ``error`` for the caller and remember the outcome for audit and metrics."""
    exchange.status = error.status
    exchange.error_code = error.code
    return render_error(error, exchange.envelope)


def _scrubbed_headers(headers: Mapping[str, str]) -> tuple[str, ...]:
    """Client headers to drop: credentials, and anything claiming gateway-set identity."""
    return tuple(
        name
        for name in headers
        if name in CREDENTIAL_HEADERS or name.startswith(TRUSTED_HEADER_PREFIX)
    )


def _identity_headers(principal: Principal) -> Headers:
    pairs: list[tuple[str, str]] = [(HEADER_TEAM, principal.team)]
    if principal.user is not None:
        pairs.append((HEADER_USER, principal.user))
    if principal.key_id is not None:
        pairs.append((HEADER_KEY_ID, principal.key_id))
    return tuple(pairs)


def _invalid_url(exchange: Exchange) -> GatewayError:
    return NotFound(
        f"Invalid URL ({exchange.method} {exchange.path.partition('?')[0]})",
        code="unknown_url",
    )
