"""The audit record of one exchange: who, what, how it ended, what it cost.

Built from the exchange's typed state once it is over. It never holds a gateway key (only
the key's id), and guardrail verdicts carry entity types and counts, never matched
values; a prompt or an answer only when the policy asks (``record_bodies``), and then
redacted (:mod:`extproc.telemetry.bodies`). The MCP resource URIs a caller
sent (``docs://customers/jane@example.com``) go through the redaction recorded prompts
get (:mod:`extproc.telemetry.bodies`), whether or not the policy records those.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any
from urllib.parse import unquote

from extproc.dialects.base import TextPart
from extproc.exchange import Exchange
from extproc.guardrails.engine import Guardrails
from extproc.mcp.access import Kind
from extproc.mcp.enforce import McpCall
from extproc.telemetry.bodies import recorded, redactor


def exchange_record(exchange: Exchange) -> dict[str, Any]:
    principal, request, model = exchange.principal, exchange.request, exchange.model
    used = exchange.used
    reservation = exchange.reservation
    if exchange.error_code == "budget_exceeded":
        budget = "rejected"
    elif reservation is None:
        budget = "none"
    else:
        budget = "clamped" if reservation.output_cap is not None else "reserved"
    return {
        "request_id": exchange.request_id,
        "trace_id": exchange.trace_id,
        "time": record_time(),
        "key_id": principal.key_id if principal else None,
        "identity": principal.source if principal else None,
        "user": principal.user if principal else None,
        "team": principal.team if principal else None,
        "method": exchange.method,
        "path": _bounded(exchange.path.partition("?")[0], MAX_PATH_CHARS),
        "dialect": request.dialect if request else None,
        "model_requested": request.model if request else None,
        "model": model.name if model else None,
        "backend": model.backend.cluster if model and model.backend else None,
        "served_by": exchange.served_by,
        "stream": request.stream if request else None,
        "status": exchange.status or None,
        "error": exchange.error_code,
        "input_tokens": used.input_tokens if used else None,
        "output_tokens": used.output_tokens if used else None,
        "cost_micro_usd": used.micro_usd if used else None,
        "usage_source": exchange.usage_source if used else None,
        "budget": budget,
        "guardrails": list(exchange.verdicts),
        "mcp": [
            {
                "server": c.server,
                "method": _bounded(c.method, MAX_NAME_CHARS),
                "name": _recorded_name(exchange, c),
                "verdict": c.verdict.value,
            }
            for c in exchange.mcp_calls
        ]
        or None,
        "policy_version": exchange.policy.version,
        **({"prompt": exchange.recorded_prompt} if exchange.recorded_prompt is not None else {}),
        **({"answer": exchange.recorded_answer} if exchange.recorded_answer is not None else {}),
        "durations_ms": {p: round(s * 1000, 3) for p, s in exchange.durations.items()},
    }


MAX_PATH_CHARS = 2048
MAX_NAME_CHARS = 256
"""Caller-sent strings in a record are bounded: records are kept (the recent ones in
memory, the audit queue, the Redis stream), and a caller could otherwise pin megabytes
with each request."""


def _bounded(text: str | None, limit: int) -> str | None:
    return None if text is None else _cut(text, limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_URI_DELIMITERS = re.compile(r"([/?#&=;,])")
"""Where a URI's parts end: the redaction reads each part as a text of its own, since
``customers/jane@example.com`` is not an e-mail address to it, ``jane@example.com`` is."""


def _recorded_name(exchange: Exchange, call: McpCall) -> str | None:
    """The call's tool or prompt name, bounded; a resource URI redacted too."""
    if call.kind is not Kind.RESOURCE or call.name is None:
        return _bounded(call.name, MAX_NAME_CHARS)
    return _redacted_uri(redactor(), call.name, MAX_NAME_CHARS)


def _redacted_uri(redact: Guardrails, uri: str, limit: int) -> str:
    """``uri`` with each part the redaction rewrites rewritten (percent-decoded, as it
    reads it), bounded to ``limit`` characters by whole parts: a part cut in two could
    leave half of an address no detector recognises."""
    pieces = _URI_DELIMITERS.split(uri)
    kept = pieces if len(uri) <= limit else _first(pieces, limit - 1)
    parts = [i for i in range(0, len(kept), 2) if kept[i]]  # even: between delimiters
    texts = [TextPart((i,), "user", "input", unquote(kept[i])) for i in parts]
    for i, text, found in zip(parts, texts, recorded(redact, texts, {}), strict=True):
        if found["text"] != text.text:
            kept[i] = found["text"]
    shown = "".join(kept) + ("" if len(kept) == len(pieces) else "…")
    return _cut(shown, limit)  # a replacement may be longer than what it replaced


def _first(pieces: list[str], limit: int) -> list[str]:
    """The leading ``pieces`` that fit in ``limit`` characters together."""
    kept: list[str] = []
    length = 0
    for piece in pieces:
        length += len(piece)
        if length > limit:
            break
        kept.append(piece)
    return kept


def record_time() -> str:
    """Now, as the record's ``time``: UTC, to the millisecond (``2026-11-28T06:22:56.123Z``).

    Its second is formatted once (:func:`_utc_second`) and the milliseconds added: a
    request takes this twice, and ``datetime``'s ``isoformat`` was 3 % of the service's
    CPU at one connection."""
    second, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
    return f"{_utc_second(second)}.{nanoseconds // 1_000_000:03d}Z"


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
