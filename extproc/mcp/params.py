"""``Mcp-Param-*`` headers: the copies of tool arguments MCP 2026-07-28 clients send.

A tool's input schema may mark an argument ``x-mcp-header: <token>``; a client then sends
that argument's value in an ``Mcp-Param-<token>`` request header too (base64 in a
``=?base64?...?=`` sentinel when it is not plain printable ASCII), so that intermediaries
can route on it, and the server refuses a call whose header and body disagree (-32020).

The gateway does not know the schemas, so it tells a copy by its value: when an input
guardrail rewrites an argument, each header carrying that argument's original value is
given the rewritten one, encoded as a client encodes it (:func:`agreeing`). Left as it
was, the header would take the original text to the server, and the call would fail
there. A header that cannot be made to agree faithfully (a rewritten text inside another
value, one text rewritten two ways, a sentinel that does not decode) raises
:class:`Unfaithful`: the call is refused rather than sent with the original text.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping

from extproc.decisions import Headers
from extproc.dialects.base import JsonPath
from extproc.mcp.jsonrpc import Body
from extproc.mcp.texts import call_texts

PREFIX = "mcp-param-"
"""The headers' name prefix, in the lower case Envoy hands header names over in."""

_SENTINEL = re.compile(r"=\?base64\?(?P<payload>.*)\?=")
_PLAIN = re.compile(r"[\x20-\x7e]*")


class Unfaithful(Exception):
    """A header copying a rewritten argument cannot be made to agree with the body."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def carried(headers: Mapping[str, str]) -> dict[str, str]:
    """The ``Mcp-Param-*`` headers among a request's ``headers``."""
    return {name: value for name, value in headers.items() if name.lower().startswith(PREFIX)}


def argument_changes(body: Body, rewrites: Mapping[JsonPath, str]) -> dict[str, str | None]:
    """Original → rewritten text of every tools/call argument a rule rewrote; ``None``
    for an original rewritten two different ways (no header copy can agree with both)."""
    changes: dict[str, str | None] = {}
    for request in body.requests:
        if request.method != "tools/call":
            continue
        for part in call_texts(request):
            new = rewrites.get(part.path)
            if new is None or new == part.text or not part.text:
                continue
            if part.text in changes and changes[part.text] != new:
                changes[part.text] = None
            else:
                changes.setdefault(part.text, new)
    return changes


def agreeing(headers: Mapping[str, str], changes: Mapping[str, str | None]) -> Headers:
    """The ``Mcp-Param-*`` headers to set once ``changes`` (:func:`argument_changes`) are
    made to the body: each copy of a rewritten argument with its rewritten value.

    Every one is set, the others to the value read here: the service reads a repeated
    header's last value (the adapter's header map keeps it), and setting it replaces
    every copy, so a first copy the gateway never saw cannot take an original text on.
    Raises :class:`Unfaithful`.
    """
    if not changes:
        return ()
    updates: list[tuple[str, str]] = []
    for name, raw in carried(headers).items():
        updates.append((name, _agreeing(name, raw, changes)))
    return tuple(updates)


def _agreeing(name: str, raw: str, changes: Mapping[str, str | None]) -> str:
    value = decode(raw)
    if value is None:
        raise Unfaithful(f"its {name} header does not decode")
    if value in changes:
        new = changes[value]
        if new is None:
            raise Unfaithful(f"its {name} header copies a text rewritten two ways")
        return encode(new)
    if any(original in value for original in changes):
        raise Unfaithful(f"its {name} header carries a rewritten text inside another value")
    return raw


def encode(value: str) -> str:
    """``value`` as a client puts it in the header: as it is when it is printable ASCII
    without edge spaces, else base64 in the sentinel."""
    if _PLAIN.fullmatch(value) and value == value.strip() and not _SENTINEL.fullmatch(value):
        return value
    return f"=?base64?{base64.b64encode(value.encode()).decode('ascii')}?="


def decode(raw: str) -> str | None:
    """A header's value as a server reads it; ``None`` for a sentinel that does not
    decode (bad or non-canonical base64, or not UTF-8), which servers refuse too."""
    match = _SENTINEL.fullmatch(raw)
    if match is None:
        return raw
    payload = match["payload"]
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None
        return decoded.decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
