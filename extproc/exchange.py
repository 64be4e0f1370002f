"""The typed state of one exchange (one HTTP request and its answer).

Owned by one ext_proc stream (or one ext_authz check); the pipeline's request side
(:mod:`extproc.pipeline`) and answer side (:mod:`extproc.answer`) read and fill it in,
the telemetry turns it into an audit record at the end. One policy snapshot per exchange.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from extproc.budgets.meter import Cost, Reservation
from extproc.decisions import Forward, Reply
from extproc.dialects.base import Dialect, Envelope, JsonPath, LLMRequest
from extproc.dialects.envelopes import render_error
from extproc.dialects.usage import StreamUsage
from extproc.errors import GatewayError
from extproc.guardrails.stream import StreamGuard
from extproc.identity import Principal
from extproc.mcp.access import CompiledServer
from extproc.mcp.enforce import McpCall
from extproc.mcp.jsonrpc import Body, RequestId
from extproc.mcp.sessions import SessionBinder
from extproc.mcp.stream import SseRewriter
from extproc.policy.compiled import CatalogueModel, CompiledPolicy
from extproc.routing import ResponseTranslation


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
    traceparent: str | None = None
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
    response_bytes: int = 0
    """The JSON answer's size: an estimate of its output when it reports no usage."""
    translation: ResponseTranslation | None = None
    """Set when an OpenAI chat request goes to an Anthropic backend."""
    served_by: str | None = None
    """The upstream endpoint that answered (after retries and fail-over)."""
    output_guard: StreamGuard | None = None
    """Checks a streamed answer's text as it passes (output guardrails)."""
    stream_judged: bool = False
    """Whether the stream guard's verdicts are in :attr:`verdicts` (added once, at the end)."""
    guard_answer: bool = False
    """Check the whole (buffered) answer with the output guardrails at its end."""
    answer_whole: bool = False
    """Envoy was asked for the answer's body whole: a part of it (not its end) means the
    answer passed Envoy's buffer limit."""
    mcp_server: CompiledServer | None = None
    """Set for an MCP exchange (a path the policy's ``mcp.servers`` names)."""
    mcp_calls: tuple[McpCall, ...] = ()
    mcp_methods: Mapping[RequestId, str] = field(default_factory=dict)
    """Request id → method of the calls sent on, to read the server's answers."""
    mcp_stream: SseRewriter | None = None
    mcp_body: Body | None = None
    mcp_tools: tuple[tuple[str, str], ...] = ()
    """(server, tool) of each tools/call let through: what tool limits count."""
    mcp_forward: Forward | None = None
    """The judged MCP body's way on (routing, rewritten arguments), from the body phase."""
    mcp_params: Mapping[str, str] = field(default_factory=dict)
    """The request's ``Mcp-Param-*`` headers: copies of arguments a rewrite must follow."""
    mcp_sessions: SessionBinder | None = None
    """Binds MCP session ids to their caller, where this exchange can see the answer's
    (ext_proc's); ``None`` leaves them as they are (an ext_authz check before ext_proc,
    which binds them)."""
    observe_response: bool = False
    """Set by the adapter when the audit log needs every answer's status and usage."""
    only_accounted: bool = False
    """Decided at the request headers: the answer is needed only to account for it, which
    the exchange's ticket lets any process do (accounting.py)."""
    handed_to_envoy: bool = False
    """The request went on with that mark: the access-log record reports the exchange."""
    status: int = 0
    """The HTTP status the caller got: ours when we answered, else the upstream's."""
    error_code: str | None = None
    used: Cost | None = None
    usage_source: str = "none"
    """Where ``used`` came from: ``provider`` (its usage block), ``counted`` (the prompt
    the service counted: embeddings) or ``estimate``."""
    started_ns: int = field(default_factory=time.time_ns)
    """Wall-clock start, for the exchange's span."""
    recorded_prompt: list[dict[str, str]] | None = None
    recorded_answer: list[dict[str, str]] | None = None
    """Redacted texts for the audit record (only when the policy records bodies)."""
    durations: dict[str, float] = field(default_factory=dict)
    """Seconds of service time per phase (added up when a phase repeats)."""

    @property
    def metered(self) -> bool:
        return self.principal is not None and bool(self.principal.limits)

    @property
    def accounted_by_envoy(self) -> bool:
        """``only_accounted`` under ``accounting: envoy``: Envoy reads the answer."""
        return self.only_accounted and self.policy.accounting == "envoy"

    def reject(self, error: GatewayError) -> Reply:
        """``error`` rendered for the caller, in its dialect; the outcome is remembered for
        the audit record and the metrics."""
        self.status, self.error_code = error.status, error.code
        return render_error(error, self.envelope, self._only_request_id())

    def _only_request_id(self) -> RequestId | None:
        """The id of the one JSON-RPC request an MCP body held: the id an error answers
        (``None``: a batch, or no request, answered as JSON-RPC does when it cannot tell)."""
        ids = tuple(self.mcp_methods)
        batch = self.mcp_body is not None and self.mcp_body.batch
        return ids[0] if len(ids) == 1 and not batch else None


Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)
