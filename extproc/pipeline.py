"""The policy pipeline: from (policy snapshot, exchange phase) to a decision.

Adapters (ext_proc, the gRPC and HTTP ext_authz) call these functions and translate the
returned :class:`~extproc.decisions.Forward` or :class:`~extproc.decisions.Reply` into
their protocol. Every :class:`~extproc.errors.GatewayError` raised by a stage is rendered
here, in the caller's dialect, so adapters never decide what an error looks like.

    request headers   identify → answer /v1/models → choose the phases still needed
    request body      parse (dialect) → authorize model → input guardrails → count prompt
                      tokens (``prepare_request_body``: CPU only, may run in a thread)
                      → reserve budget → route, translate, apply every body rewrite at once
                      (``finish_request_body``)

The answer side (status, usage, translation back, output guardrails, settlement) is
:mod:`extproc.answer`; the state both fill in is :class:`extproc.exchange.Exchange`.

:func:`decide_request` runs both request phases in one call, for the HTTP authorizer that
sees headers and body together (``adapters/ext_authz_http.py``): a request it can finish
costs one cheap HTTP call instead of an ext_proc stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from extproc import access, accounting, identity, routing, tools
from extproc.budgets.meter import Meter, OutputCapNeeded, prompt_tokens
from extproc.decisions import Decision, Forward, Headers, Reply
from extproc.dialects import (
    Dialect,
    LLMRequest,
    dialect_for_path,
    envelope_for_path,
    strip_query,
)
from extproc.dialects.fields import (
    asked_for_usage,
    asks_hour_cache,
    include_usage_rewrites,
    optional_bool,
)
from extproc.dialects.json_body import apply_rewrites, decode_body
from extproc.errors import GatewayError, InvalidRequest, NotFound
from extproc.exchange import Clock, Exchange, utc_now
from extproc.guardrails.engine import describe, verdict_header
from extproc.identity import Principal
from extproc.models_listing import is_models_path, list_models
from extproc.policy.compiled import CatalogueModel
from extproc.routing import ResponseTranslation
from extproc.telemetry.bodies import recorded

TRUSTED_HEADER_PREFIX = "x-gateway-"
"""Headers the gateway sets for upstreams and later filters; client copies are removed."""
HEADER_TEAM = "x-gateway-team"
HEADER_USER = "x-gateway-user"
HEADER_KEY_ID = "x-gateway-key-id"
CREDENTIAL_HEADERS = ("authorization", "x-api-key")
"""Where callers put their gateway key; never forwarded upstream."""
T = TypeVar("T")
log = logging.getLogger(__name__)
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")

MAX_REQUEST_ID_CHARS = 256
"""A caller's ``x-request-id`` longer than this is cut to it in the audit record and the
ticket, which travels in a header and must fit in one."""
MAX_TRACEPARENT_CHARS = 128
"""A ``traceparent`` longer than this is ignored: W3C's version 00 is 55 characters, and
later versions may only append fields. It travels in the ticket too."""
OFFLOAD_BODY_BYTES = 256 * 1024
"""Bodies above this are parsed and counted in a worker thread, so one huge prompt never
stalls the event loop (and every other stream on it)."""


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
    if "anthropic-version" in headers and is_models_path(strip_query(exchange.path)):
        exchange.envelope = "anthropic"  # Anthropic's SDK lists models too
    exchange.request_id = (headers.get("x-request-id") or uuid.uuid4().hex)[:MAX_REQUEST_ID_CHARS]
    traceparent = headers.get("traceparent")
    if traceparent is not None and len(traceparent) <= MAX_TRACEPARENT_CHARS:
        exchange.trace_id = trace_id(traceparent)
        # Only a traceparent with a trace id in it is continued (and carried in the ticket).
        exchange.traceparent = traceparent if exchange.trace_id else None
    try:
        return _request_headers(exchange, headers, metadata, end_of_stream, clock, peer)
    except GatewayError as error:
        return exchange.reject(error)


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
    rejected = await read_request_body(exchange, body)
    if rejected is not None:
        return rejected
    request, model, principal = exchange.request, exchange.model, exchange.principal
    assert request is not None and model is not None and principal is not None
    try:
        if principal.limits:
            await meter.precheck(
                principal.limits,
                model,
                exchange.input_tokens,
                request.max_output_tokens,
                clock(),
                request.answers,
                min_output_cap=exchange.dialect.min_output_cap,
                hour_cache=hour_cache(exchange, request),
            )
    except GatewayError as error:
        return exchange.reject(error)
    return Forward(
        set_headers=(*decision.set_headers, *routing.route_headers(model)),
        remove_headers=decision.remove_headers,
    )


async def decide_request(
    exchange: Exchange,
    headers: Mapping[str, str],
    body: bytes,
    meter: Meter,
    clock: Clock = utc_now,
) -> Decision | None:
    """Both request phases at once, or ``None``: ext_proc must process this request.

    Only a request whose answer is needed just to account for it is decided here (an LLM
    call whose answer Envoy reads, settled from the exchange's ticket when its access-log
    record comes, ``accounting: envoy``, or when Envoy reports it before its end,
    ``service``) and whose body goes up unchanged, or with only
    ``stream_options.include_usage`` added, which Envoy does
    (:func:`_stream_usage_by_envoy`). Everything else, found before any side effect
    (nothing is reserved), is handed over whole and ext_proc decides it from scratch: an
    answer the service must rewrite or check, a body to rewrite (alias, translation, masking, other
    ``stream_options``, an output cap a tight budget needs), MCP, ``/v1/models``, and a
    caller identified only by what
    ext_proc is sent and this call is not (JWT claims in dynamic metadata, a verified
    client certificate). A path no dialect serves (``unknown_paths: passthrough``) needs
    only its caller identified, and is decided here too.
    """
    decided = on_request_headers(exchange, headers, None, not body, clock)
    if not isinstance(decided, Forward) or exchange.mcp_server is not None:
        return None
    if decided.skip_request_body:
        return decided  # a path no dialect serves: identified and scrubbed, nothing more
    if not exchange.only_accounted:
        return None
    rejected = await read_request_body(exchange, body)
    if rejected is not None:
        return rejected
    if _read_for_its_usage(exchange):
        return None
    envoy_adds_usage = _stream_usage_by_envoy(exchange)
    if exchange.translation is not None or exchange.rewrites:
        return None
    try:
        forward = await finish_request_body(
            exchange, meter, clock, may_cap_output=False, ticketed=True
        )
    except OutputCapNeeded:
        return None
    if not isinstance(forward, Forward):
        return forward
    assert forward.body is None, "nothing was staged to rewrite"
    marks = ((accounting.HEADER_STREAM_USAGE, "include"),) if envoy_adds_usage else ()
    return replace(
        forward,
        set_headers=(*decided.set_headers, *forward.set_headers, *marks),
        remove_headers=decided.remove_headers,
    )


def _read_for_its_usage(exchange: Exchange) -> bool:
    """An embeddings answer of a model whose prompt is only estimated: it is handed over
    to ext_proc, which reads the provider's count from the answer as it streams."""
    dialect, model = exchange.dialect, exchange.model
    return (
        dialect is not None
        and model is not None
        and dialect.name in accounting.COUNTED_DIALECTS
        and model.name in exchange.policy.estimated_models
    )


def _stream_usage_by_envoy(exchange: Exchange) -> bool:
    """Take the staged ``stream_options`` rewrite off an OpenAI stream whose caller sent
    none, for envoy/gateway.yaml's Lua filter to add instead (switched on by
    :data:`~extproc.accounting.HEADER_STREAM_USAGE`): the member it inserts,
    ``{"include_usage": true}``, is then exactly the rewrite. With ``stream_options`` in
    the body, merging is left to ext_proc."""
    request = exchange.request
    if request is None or "stream_options" in request.body:
        return False
    return exchange.rewrites.pop(("stream_options",), None) is not None


def _request_headers(
    exchange: Exchange,
    headers: Mapping[str, str],
    metadata: Mapping[str, Any] | None,
    end_of_stream: bool,
    clock: Clock,
    peer: str | None,
) -> Decision:
    policy = exchange.policy
    path = strip_query(exchange.path)
    if _unclear(path):
        # Envoy's shipped configs normalise paths; a mesh's may not (Istio merges no
        # slashes by default): /v1//chat/completions must not pass for an unknown path.
        raise InvalidRequest(
            "The path has an empty, '.' or '..' segment; send it without.", code="invalid_path"
        )
    server = policy.mcp_servers.for_path(path)
    if server is not None:
        exchange.envelope = "jsonrpc"  # every error, identity's too, as MCP clients read them
    principal = identity.identify(policy, headers, metadata, clock(), peer)
    exchange.principal = principal
    if is_models_path(path):
        if exchange.method != "GET":
            raise _invalid_url(exchange)
        exchange.status = 200
        models = access.visible_models(policy, principal)
        return list_models(models, path, anthropic=exchange.envelope == "anthropic")

    scrubbed = _scrubbed_headers(headers)
    if server is not None:
        decision = tools.on_headers(exchange, server, principal, headers, end_of_stream)
        if isinstance(decision, Reply):
            return decision
        return replace(
            decision,
            set_headers=(*_identity_headers(principal), *decision.set_headers),
            remove_headers=scrubbed,
        )
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
    exchange.only_accounted = accounting.only_accounted(exchange, principal, path)
    return Forward(
        set_headers=_identity_headers(principal),
        remove_headers=scrubbed,
        process_response=not exchange.accounted_by_envoy
        and (
            exchange.metered
            or exchange.observe_response
            or accounting.may_translate(exchange, principal)  # Claude's answer, made OpenAI's
            or policy.guardrails.applies(
                "output", team=principal.team, key_id=principal.key_id, model=None, path=path
            )
        ),
    )


async def read_request_body(exchange: Exchange, raw: bytes) -> Reply | None:
    """:func:`prepare_request_body`, in a worker thread for a body over
    :data:`OFFLOAD_BODY_BYTES` so a huge prompt does not stall the event loop."""
    return await offloaded(len(raw), prepare_request_body, exchange, raw)


async def offloaded(size: int, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` on the event loop, or in a worker thread (:func:`in_worker_thread`)
    when the body it works on, ``size`` bytes, is over :data:`OFFLOAD_BODY_BYTES`."""
    if size > OFFLOAD_BODY_BYTES:
        return await in_worker_thread(work, *args)
    return work(*args)


async def in_worker_thread(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` in a worker thread, for CPU work on one exchange's big body.

    Other streams are served meanwhile (the GIL still alternates between the two every few
    milliseconds). If this stream is cancelled, the thread is finished first
    (:func:`completed`): it is still changing the exchange.
    """
    return await completed(asyncio.to_thread(work, *args))


async def completed(work: Awaitable[T]) -> T:
    """``work``'s result; if this stream is cancelled meanwhile (Envoy reset it: the
    caller left), ``work`` is waited for before the cancellation goes on, since what it
    does to the exchange (a reservation it takes, a body it parses) is what the stream's
    clean-up then settles and reports."""
    running = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        while not running.done():  # a second cancellation (shutdown) waits all the same
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({running})
        if not running.cancelled() and (error := running.exception()) is not None:
            log.error("work on an exchange whose stream was cut failed", exc_info=error)
        raise


def prepare_request_body(exchange: Exchange, raw: bytes) -> Reply | None:
    """The CPU-only part of the body phase: parse, authorize, count prompt tokens.

    Returns a :class:`Reply` to reject, ``None`` to go on with :func:`finish_request_body`.
    Safe to run in a worker thread: it touches only this exchange.
    """
    if exchange.mcp_server is not None:
        decision = tools.on_body(exchange, raw)
        if isinstance(decision, Reply):
            return decision
        exchange.mcp_forward = decision
        return None
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
                requested_model=request.model, include_usage=asked_for_usage(request)
            )
        elif (upstream := routing.upstream_model(model)) != request.model:
            exchange.rewrites[("model",)] = upstream
        if dialect.name == "openai.responses":
            _refuse_unseen_answers(exchange, request, model, principal)
        _guard_input(exchange, dialect, request, model, principal)
        # An answer accounted from the prompt alone (embeddings) needs the count when its
        # record is kept (the audit log, Envoy's access log), even if nothing meters it.
        if exchange.metered or (
            exchange.only_accounted
            and dialect.name in accounting.COUNTED_DIALECTS
            and (exchange.observe_response or exchange.accounted_by_envoy)
        ):
            exchange.input_tokens = prompt_tokens(model, request)
            if exchange.translation is None and dialect.asks_stream_usage:
                exchange.rewrites.update(include_usage_rewrites(request))
    except GatewayError as error:
        return exchange.reject(error)
    return None


def _guard_input(
    exchange: Exchange,
    dialect: Dialect,
    request: LLMRequest,
    model: CatalogueModel,
    principal: Principal,
) -> None:
    """Run the input guardrails: stage their rewrites, or raise to block the prompt."""
    guards = exchange.policy.guardrails
    subject = subject_of(exchange, principal, model)
    if not guards.applies("input", **subject):
        return
    result = guards.check("input", request.texts, **subject)
    exchange.verdicts.extend(describe(result))
    if result.blocked:
        raise InvalidRequest(
            result.message or f"The prompt was blocked by guardrail '{result.blocked_by}'.",
            code="guardrail_blocked",
        )
    exchange.rewrites.update(result.rewrites)


def _refuse_unseen_answers(
    exchange: Exchange, request: LLMRequest, model: CatalogueModel, principal: Principal
) -> None:
    """Refuse a Responses request whose answer the gateway would not see whole, when it
    must: a stream under output guardrails (its events are not parsed yet), and a
    background response when it is metered or guarded. The latter's answer says only
    ``queued`` (or, streamed, lasts only as long as the caller stays): the output comes
    later from ``GET /v1/responses/{id}``, a path no dialect serves, so it would be
    settled at an estimate of a few tokens while the provider bills up to the cap, and
    its text would reach the caller unchecked. A metering rule as much as a guardrail
    one, so it runs before the input guardrails, whether or not any applies."""
    subject = subject_of(exchange, principal, model)
    output_guarded = exchange.policy.guardrails.applies("output", **subject)
    if request.stream and output_guarded:
        raise InvalidRequest(
            "Output guardrails apply to this model, and streamed /v1/responses answers "
            "cannot be checked yet; send the request with stream: false.",
            code="guardrail_unsupported_stream",
            param="stream",
        )
    if optional_bool(request.body, "background") and (output_guarded or exchange.metered):
        raise InvalidRequest(
            "Background responses are answered out of the gateway's sight, so their "
            "output can be neither metered nor checked; send the request without "
            "background: true.",
            code="unsupported_parameter",
            param="background",
        )


def hour_cache(exchange: Exchange, request: LLMRequest) -> bool:
    """Whether the request asks Claude for its 1-hour cache (an Anthropic request, or a
    chat one translated for Claude: its parts keep their cache_control). Looked for only
    when a budget prices the request and it goes to Claude, not in every body."""
    goes_to_claude = request.dialect == "anthropic.messages" or exchange.translation is not None
    return goes_to_claude and asks_hour_cache(request.body)


def subject_of(exchange: Exchange, principal: Principal, model: CatalogueModel | None) -> Any:
    """The keyword arguments a guardrail scope is matched against."""
    return {
        "team": principal.team,
        "key_id": principal.key_id,
        "model": model.name if model is not None else None,
        "path": exchange.path,
    }


async def finish_request_body(
    exchange: Exchange,
    meter: Meter,
    clock: Clock = utc_now,
    *,
    may_cap_output: bool = True,
    ticketed: bool = False,
) -> Decision:
    """Reserve the budget, then route and apply every staged body change at once.

    ``may_cap_output`` is passed to :meth:`Meter.reserve`. ``ticketed``: decided by the
    HTTP authorizer, whose answer Envoy reads (its access-log record, or its report
    before the answer's end) and the service settles from its ticket, so no response
    phase of this stream sets the answer's headers.
    """
    if exchange.mcp_forward is not None:
        if exchange.mcp_tools and exchange.metered:
            refused = await tools.count_tool_calls(exchange, meter, clock())
            if refused is not None:
                return refused
        return exchange.mcp_forward
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
                exchange.policy.reserved_output(model),
                clock(),
                may_cap_output=may_cap_output,
                answers=request.answers,
                min_output_cap=dialect.min_output_cap,
                hour_cache=hour_cache(exchange, request),
            )
            exchange.reservation = reservation
            cap = reservation.output_cap if reservation is not None else None
            if cap is not None and dialect.output_cap_field is not None:
                exchange.rewrites[(dialect.output_cap_field,)] = cap
    except GatewayError as error:
        return exchange.reject(error)
    if exchange.policy.audit_redactor is not None:
        exchange.recorded_prompt = recorded(
            exchange.policy.audit_redactor, request.texts, exchange.rewrites
        )
    headers = routing.route_headers(model)
    if exchange.translation is not None:
        try:
            translated, extra = routing.translated_request(
                request, exchange.rewrites, model, exchange.policy.reserved_output(model)
            )
        except GatewayError as error:
            return exchange.reject(error)  # the reservation is released when the stream ends
        return Forward(set_headers=(*headers, *extra), body=translated, clear_route_cache=True)
    try:
        body = apply_rewrites(request.body, exchange.rewrites) if exchange.rewrites else None
    except GatewayError as error:
        return exchange.reject(error)
    if exchange.accounted_by_envoy or ticketed:
        # No response phase of this stream will set the budget and guardrail headers:
        # Envoy adds them from metadata. Under accounting: envoy it also lifts the usage.
        answer_headers = (
            *(exchange.reservation.headers if exchange.reservation else ()),
            *verdict_header(exchange.verdicts),
        )
        marks = ((accounting.HEADER, "envoy"),) if exchange.accounted_by_envoy else ()
        return Forward(
            set_headers=(*headers, *marks),
            body=body,
            clear_route_cache=True,
            answer_headers=answer_headers,
        )
    return Forward(set_headers=headers, body=body, clear_route_cache=True)


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``), if valid
    as OpenTelemetry reads it: lowercase hex, neither id all zeros, version not ``ff``,
    fields after the fourth only in a later version."""
    if not traceparent:
        return None
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    if match is None:
        return None
    version, trace, parent, extra = match.group(1, 2, 3, 4)
    if version == "ff" or (version == "00" and extra):
        return None
    if trace == "0" * 32 or parent == "0" * 16:
        return None
    return trace


def _unclear(path: str) -> bool:
    """Whether ``path`` has a segment a server may read away: empty (``//``), ``.`` or
    ``..``; a trailing slash is a path's own."""
    return any(segment in ("", ".", "..") for segment in path.split("/")[1:-1]) or (
        path.endswith(("/.", "/.."))
    )


def _scrubbed_headers(headers: Mapping[str, str]) -> tuple[str, ...]:
    """Client headers to drop: credentials, and anything claiming gateway-set identity."""
    return tuple(
        name
        for name in headers
        if name in CREDENTIAL_HEADERS
        # x_gateway_team too: some upstreams read _ as - (Envoy configs that let such
        # names through, as Istio's may, must not let one pass for a trusted header)
        or name.replace("_", "-").startswith(TRUSTED_HEADER_PREFIX)
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
