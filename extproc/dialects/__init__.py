"""The explicit registry of API dialects: one line per endpoint.

Adding an API is adding a module that implements :class:`~extproc.dialects.base.Dialect`
and one line below; nothing else in the service switches on paths.
"""

from __future__ import annotations

from extproc.dialects import (
    anthropic_messages,
    openai_chat,
    openai_completions,
    openai_embeddings,
    openai_responses,
)
from extproc.dialects.base import Dialect, Envelope, LLMRequest, TextPart

__all__ = [
    "TEXTLESS_DIALECTS",
    "Dialect",
    "Envelope",
    "LLMRequest",
    "TextPart",
    "dialect_for_path",
    "envelope_for_path",
]

_BY_PATH: dict[str, Dialect] = {
    "/v1/chat/completions": openai_chat.DIALECT,
    "/v1/completions": openai_completions.DIALECT,
    "/v1/embeddings": openai_embeddings.DIALECT,
    "/v1/responses": openai_responses.DIALECT,
    "/v1/messages": anthropic_messages.DIALECT,
}

TEXTLESS_DIALECTS = frozenset(d.name for d in _BY_PATH.values() if d.output_cap_field is None)
"""APIs that produce no tokens (embeddings): their answers hold no text for an output
guardrail or an audit record to read, and their usage is the prompt alone."""

_ANTHROPIC_PREFIX = "/v1/messages"


def strip_query(path: str) -> str:
    """The path without its query string or fragment."""
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut != -1:
            path = path[:cut]
    return path


def dialect_for_path(path: str) -> Dialect | None:
    """The dialect serving ``path`` (query string ignored), or ``None`` if none does."""
    return _BY_PATH.get(strip_query(path).rstrip("/") or "/")


def envelope_for_path(path: str) -> Envelope:
    """Which error envelope a caller of ``path`` expects (Anthropic's only under its API)."""
    return "anthropic" if strip_query(path).startswith(_ANTHROPIC_PREFIX) else "openai"
