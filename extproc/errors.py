"""The closed set of errors the gateway answers with.

Every rejection the service makes is one of these, raised anywhere in the core and turned
into an HTTP answer in exactly one place (:func:`extproc.dialects.envelopes.render_error`),
in the caller's API dialect. Foreign exceptions (JSON, Redis, protobuf) are translated into
these at the boundary where they occur; nothing else is allowed to escape to the adapters.

    GatewayError                 (abstract; status, OpenAI and Anthropic error types)
    ├── InvalidRequest           400  malformed JSON, wrong types, missing fields
    ├── Unauthenticated          401  missing, unknown, expired or disabled credential
    ├── PermissionDenied         403  model or tool not allowed for this caller
    ├── NotFound                 404  unknown model, unknown path under /v1/
    ├── RateLimited              429  rate limit or budget exhausted (carries retry-after)
    ├── BadGateway               502  an upstream answer the gateway must read cannot be
    │   │                             (output guardrails, translation or MCP narrowing on
    │   │                             a non-JSON body)
    │   └── AnswerTooLarge       502  ... or is past Envoy's buffer limit (not retried)
    └── ServiceUnavailable       503  a store the policy depends on is down (fail-closed)

A body over the size limit (413) never reaches the service: Envoy refuses it, and its
``local_reply_config`` renders the same envelopes (envoy/gateway.yaml).
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    """Base of every error the gateway returns to a caller.

    ``message`` is shown to the caller verbatim, so it must never contain secrets,
    raw prompt text or anything matched by a guardrail.
    """

    status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "api_error"
    anthropic_type: ClassVar[str] = "api_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.headers = headers


class InvalidRequest(GatewayError):
    status = 400
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    default_code = "invalid_request"


class Unauthenticated(GatewayError):
    status = 401
    openai_type = "invalid_request_error"
    anthropic_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    openai_type = "invalid_request_error"
    anthropic_type = "permission_error"
    default_code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"
    default_code = "not_found"


class RateLimited(GatewayError):
    status = 429
    openai_type = "rate_limit_error"
    anthropic_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class BadGateway(GatewayError):
    status = 502
    openai_type = "api_error"
    anthropic_type = "api_error"
    default_code = "upstream_answer_unreadable"


class AnswerTooLarge(BadGateway):
    """An answer the gateway holds whole (to guard, translate or lift its usage) that is
    past Envoy's buffer limit. The provider has billed it and would bill it again, so
    the SDKs are told not to retry (``x-should-retry: false``). Envoy's own version of it
    (usage lifted) is rendered by its ``local_reply_config`` (envoy/gateway.yaml), with
    the same message."""

    default_code = "upstream_answer_too_large"

    def __init__(self) -> None:
        super().__init__(
            "The provider's answer is larger than the gateway reads (8 MiB); ask for less"
            " (fewer choices or inputs, a lower max tokens).",
            headers=(("x-should-retry", "false"),),
        )


class ServiceUnavailable(GatewayError):
    status = 503
    openai_type = "api_error"
    anthropic_type = "api_error"
    default_code = "service_unavailable"
