"""What every API dialect turns a request body into.

A dialect reads one provider API's request body and exposes a common view of it: the
model, each piece of text with the JSON path where it lives (so a guardrail can rewrite
it in place without knowing the dialect), the output-token cap, the stream flag and the
tools offered. The view never holds protobufs and never performs I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

JsonPath = tuple[str | int, ...]
"""Keys and indices from the body's root to one string value."""

DialectEnvelope = Literal["openai", "anthropic"]
"""The error-body family a dialect's callers expect (and the provider it speaks to)."""

Envelope = DialectEnvelope | Literal["jsonrpc"]
"""The error-body family a caller expects: a dialect's, or JSON-RPC's for MCP callers."""


@dataclass(frozen=True, slots=True)
class TextPart:
    """One string in the request body that policy may read or rewrite.

    ``role`` is the author of the text (system, developer, user, assistant, tool) and
    ``kind`` says what it is: ``message`` (chat text), ``prompt`` (legacy completions),
    ``input`` (embeddings / responses input), ``tool_arguments`` (arguments the model
    produced for a tool call), ``tool_result`` (what a tool returned) or ``instructions``.
    """

    path: JsonPath
    role: str
    kind: str
    text: str
    json_source: bool = False
    """The text is JSON source, escapes and all (OpenAI's function-call ``arguments``):
    guardrails read it as such (:mod:`extproc.guardrails.json_text`)."""
    locked: bool = False
    """A text the model reads that has no place of its own to rewrite (the member names
    of a tool's input, escaped JSON source decoded): a rule that would rewrite what it
    finds there blocks instead."""


@dataclass(frozen=True, slots=True)
class LLMRequest:
    """The common view of one parsed request body."""

    dialect: str
    model: str
    texts: tuple[TextPart, ...]
    max_output_tokens: int | None
    """The caller's cap on output tokens; ``None`` if it set none (the budget reserves the
    policy's default), 0 for an API that produces none (embeddings)."""
    stream: bool
    tools: tuple[str, ...]
    body: dict[str, Any]
    """The parsed body. Treat as read-only; rewrites go through ``apply_rewrites``."""
    chat_messages: int = 0
    """Messages in a chat-style request: each adds framing tokens to the prompt."""
    prompt_token_ids: int = 0
    """Prompt tokens given directly as token ids (legacy completions, embeddings)."""
    answers: int = 1
    """Answers the request asks for (``n``, ``best_of``, a list of prompts), each up to
    ``max_output_tokens``: the budget reserves (and caps) output once per answer."""


class Dialect(Protocol):
    """One provider API, e.g. OpenAI chat completions or Anthropic messages."""

    name: str
    envelope: DialectEnvelope
    output_cap_field: str | None
    """The body field that caps output tokens, set by the gateway when a budget can only
    afford fewer than the caller left open; ``None`` when the API produces no tokens."""
    min_output_cap: int
    """The smallest cap the API accepts: a budget that affords less refuses the request
    (429) rather than writing a cap the provider answers with a 400 about a parameter
    the caller never sent."""
    asks_stream_usage: bool
    """Whether a stream reports its usage only when asked (OpenAI's
    ``stream_options.include_usage``): budgets need the provider's own count, so the
    gateway asks, and the caller then also receives that chunk (one more event with empty
    ``choices``, which the official SDKs expect and skip)."""

    def parse(self, body: dict[str, Any]) -> LLMRequest:
        """Build the common view of ``body``.

        Raises :class:`extproc.errors.InvalidRequest` naming the offending field
        (``param``) when the body does not follow the API's schema.
        """
        ...
