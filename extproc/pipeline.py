"""The policy pipeline: pure functions from (policy snapshot, exchange phase) to a decision.

Adapters (ext_proc today, ext_authz next) call one function per phase and translate the
returned :class:`~extproc.decisions.Forward` or :class:`~extproc.decisions.Reply` into
their protocol. Every :class:`~extproc.errors.GatewayError` raised by a stage is rendered
here, in the caller's dialect, so adapters never decide what an error looks like.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from extproc import access, identity
from extproc.decisions import Decision, Forward, Headers
from extproc.dialects import Dialect, Envelope, LLMRequest, dialect_for_path, envelope_for_path
from extproc.dialects.envelopes import render_error
from extproc.dialects.json_body import apply_rewrites, decode_body
from extproc.errors import GatewayError, InvalidRequest, NotFound
from extproc.identity import Principal
from extproc.models_listing import MODELS_PATH, list_models
from extproc.policy.compiled import CatalogueModel, CompiledPolicy

TRUSTED_HEADER_PREFIX = "x-gateway-"
"""Headers the gateway sets for upstreams and later filters; client copies are removed."""
HEADER_TEAM = "x-gateway-team"
HEADER_USER = "x-gateway-user"
HEADER_KEY_ID = "x-gateway-key-id"
HEADER_MODEL = "x-gateway-model"
"""The resolved canonical model; Envoy routes on it after ``clear_route_cache``."""
CREDENTIAL_HEADERS = ("authorization", "x-api-key")
"""Where callers put their gateway key; never forwarded upstream."""


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
    verdicts: list[str] = field(default_factory=list)


Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def on_request_headers(
    exchange: Exchange,
    headers: Mapping[str, str],
    metadata: Mapping[str, Any] | None,
    end_of_stream: bool,
    clock: Clock = utc_now,
) -> Decision:
    """Identify the caller and decide everything the headers alone can decide."""
    exchange.method = headers.get(":method", "")
    exchange.path = headers.get(":path", "")
    exchange.envelope = envelope_for_path(exchange.path)
    try:
        return _request_headers(exchange, headers, metadata, end_of_stream, clock)
    except GatewayError as error:
        return render_error(error, exchange.envelope)


def on_request_body(exchange: Exchange, raw: bytes) -> Decision:
    """Parse the body in its dialect, authorise the model and set the route."""
    try:
        return _request_body(exchange, raw)
    except GatewayError as error:
        return render_error(error, exchange.envelope)


def _request_headers(
    exchange: Exchange,
    headers: Mapping[str, str],
    metadata: Mapping[str, Any] | None,
    end_of_stream: bool,
    clock: Clock,
) -> Decision:
    policy = exchange.policy
    principal = identity.identify(policy, headers, metadata, clock())
    exchange.principal = principal
    path = exchange.path.partition("?")[0]
    if path == MODELS_PATH or path.startswith(MODELS_PATH + "/"):
        if exchange.method != "GET":
            raise _invalid_url(exchange)
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
        )
    if exchange.method != "POST":
        raise _invalid_url(exchange)
    if end_of_stream:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    return Forward(set_headers=_identity_headers(principal), remove_headers=scrubbed)


def _request_body(exchange: Exchange, raw: bytes) -> Decision:
    dialect, principal = exchange.dialect, exchange.principal
    if dialect is None or principal is None:
        # Envoy only sends a body after a headers answer that asked for it.
        raise InvalidRequest("Request body received before its headers were authorised.")
    body = decode_body(raw)
    request = dialect.parse(body)
    exchange.request = request
    model = access.authorize_model(exchange.policy, principal, request.model)
    exchange.model = model
    new_body = None
    if model.name != request.model:
        new_body = apply_rewrites(body, {("model",): model.name})
    return Forward(
        set_headers=((HEADER_MODEL, model.name),),
        body=new_body,
        clear_route_cache=True,
    )


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
