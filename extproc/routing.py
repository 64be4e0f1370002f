"""Where a request goes and in which API: the catalogue backend, its key, and translation.

The policy names each model's backend (an Envoy cluster, the API it speaks, its upstream
model name and where its key lives). The service tells Envoy the cluster through a header
the route reads with ``cluster_header``; Envoy keeps the retries, fail-over and load
balancing. An OpenAI chat request for a model served by an Anthropic backend is translated
here on the way in, and its answer (JSON, SSE stream or error) on the way out.

Limit, by design: the body is translated once, before Envoy picks an endpoint, so all the
clusters a backend fails over between must speak the same API (see the README).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc.decisions import Headers
from extproc.dialects.base import Dialect, JsonPath, LLMRequest
from extproc.dialects.json_body import encode_body, set_values
from extproc.errors import InvalidRequest
from extproc.policy.compiled import CatalogueModel
from extproc.translate import (
    StreamTranslator,
    error_from_anthropic,
    request_to_anthropic,
    response_from_anthropic,
)

HEADER_MODEL = "x-gateway-model"
"""The resolved canonical model (for access logs and routes that match on it)."""
HEADER_CLUSTER = "x-gateway-cluster"
"""The catalogue backend's Envoy cluster; the route reads it with ``cluster_header``."""
HEADER_MCP = "x-gateway-mcp"
"""Set (to the server's name) beside :data:`HEADER_CLUSTER` on every MCP request the
gateway sends on: Envoy's route for MCP matches it, and retries only what cannot have
reached the server (a refused connection or stream), never a 5xx, reset or 429 after
which a tool call may have run (envoy/gateway.yaml). Client copies are removed with
every other x-gateway-* header."""
HEADER_SERVED_BY = "x-gateway-served-by"
"""Set on answers by the route (``%UPSTREAM_CLUSTER%``): the cluster that served."""
ANTHROPIC_VERSION = "2023-06-01"
ANTHROPIC_PATH = "/v1/messages"


def upstream_model(model: CatalogueModel) -> str:
    return model.backend.upstream_model if model.backend else model.name


def translates(dialect: Dialect, model: CatalogueModel) -> bool:
    """An OpenAI chat request for a model an Anthropic backend serves."""
    return (
        dialect.name == "openai.chat"
        and model.backend is not None
        and model.backend.provider == "anthropic"
    )


def check_provider(dialect: Dialect, model: CatalogueModel) -> None:
    """A backend speaks one API; other requests must be translatable to it."""
    if model.backend is None or translates(dialect, model):
        return
    if model.backend.provider != dialect.envelope:
        path = ANTHROPIC_PATH if model.backend.provider == "anthropic" else "/v1/chat/completions"
        raise InvalidRequest(
            f"The model '{model.name}' is served by an {model.backend.provider} backend; "
            f"call it through {path}.",
            code="unsupported_api_for_model",
            param="model",
        )


def route_headers(model: CatalogueModel) -> Headers:
    """The resolved model, the cluster Envoy routes to, the provider key it must carry."""
    headers: list[tuple[str, str]] = [(HEADER_MODEL, model.name)]
    backend = model.backend
    if backend is not None:
        headers.append((HEADER_CLUSTER, backend.cluster))
        if backend.credential is not None:
            headers.append(backend.credential)
    return tuple(headers)


def translated_request(
    request: LLMRequest,
    rewrites: dict[JsonPath, Any],
    model: CatalogueModel,
    default_max_tokens: int,
) -> tuple[bytes, Headers]:
    """The Anthropic body for an OpenAI chat request, and the headers it needs upstream."""
    set_values(request.body, rewrites)  # the translation reads the rewritten texts
    translated = request_to_anthropic(request.body, upstream_model(model), default_max_tokens)
    headers = ((":path", ANTHROPIC_PATH), ("anthropic-version", ANTHROPIC_VERSION))
    return encode_body(translated), headers


@dataclass(slots=True)
class ResponseTranslation:
    """Turns one Anthropic answer back into the OpenAI chat answer the caller expects."""

    requested_model: str
    include_usage: bool
    status: int = 0
    stream: StreamTranslator | None = None
    unreadable: bool = False
    """A 2xx answer that is not a JSON message: nothing to translate (answer.py answers 502)."""
    buffered: bytearray = field(default_factory=bytearray)

    def start(self, status: int, content_type: str) -> bool:
        """Note the answer's status; return whether it streams (else it comes whole)."""
        self.status = status
        if 200 <= status < 300 and content_type.startswith("text/event-stream"):
            self.stream = StreamTranslator(self.requested_model, include_usage=self.include_usage)
            return True
        return False

    def chunk(self, data: bytes, end: bool) -> bytes | None:
        """The bytes to send instead of ``data`` (``None`` while a whole body accumulates)."""
        if self.stream is not None:
            out = self.stream.feed(data)
            return out + self.stream.finish() if end else out
        self.buffered += data
        if not end:
            return b""
        raw = bytes(self.buffered)
        if not 200 <= self.status < 300:
            return error_from_anthropic(self.status, raw)
        try:
            answer = orjson.loads(raw)
            if isinstance(answer, dict):
                return orjson.dumps(response_from_anthropic(answer, self.requested_model))
        except (orjson.JSONDecodeError, orjson.JSONEncodeError):
            pass  # not JSON, or a tool's input nested deeper than can be written back
        self.unreadable = True  # a 2xx that is no message: the caller gets a 502 instead
        return None
