"""Decoding request bodies and writing rewritten text back into them.

The body is parsed once per request (orjson) and every later stage works on the parsed
object; it is serialised again only when a stage actually changed a text.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from extproc.dialects.base import JsonPath
from extproc.dialects.fields import json_type
from extproc.errors import InvalidRequest


def decode_body(raw: bytes) -> dict[str, Any]:
    """Parse a JSON request body that must be an object.

    Raises :class:`InvalidRequest` with a message a caller can act on for an empty body,
    bytes that are not UTF-8, malformed JSON, and JSON whose top level is not an object.
    """
    if not raw.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "utf-8" in str(exc).lower():
            raise InvalidRequest("The request body is not valid UTF-8.") from None
        raise InvalidRequest(f"The request body is not valid JSON: {exc.msg}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"The request body must be a JSON object, not {json_type(body)}.")
    ambiguous = _lookalike_member(body)
    if ambiguous is not None:
        raise InvalidRequest(
            f"The request body's member {ambiguous!r} reads as another to some servers; "
            "member names are lower case.",
            code="ambiguous_member",
        )
    return body


def _lookalike_member(body: dict[str, Any]) -> str | None:
    """A member name some upstreams would read as another: not in the lower case every
    member of these APIs is spelled in (at the top level, in messages and input items,
    their content parts and tool calls, a call's function, a tool result's blocks).

    Go's ``encoding/json`` matches member names regardless of case (the long s as ``s``,
    the Kelvin sign as ``k``) and keeps the last match, and some decoders drop NULs: with
    ``{"model": "gpt-4o-mini", "Model": "gpt-4o"}`` the gateway would authorise, price and
    guard one model while such an upstream ran another, on messages the guards never read.
    Nested objects the APIs leave free (tool schemas, metadata) are not looked at."""
    for name in _member_names(body):
        if name.replace("\x00", "").casefold() != name:
            return name
    return None


def _member_names(body: dict[str, Any]) -> Iterator[str]:
    """The member names of the body and of the API objects in its lists, as read."""
    yield from body
    for value in body.values():
        for item in value if isinstance(value, list) else ():
            if isinstance(item, dict):
                yield from item
                yield from _inner_names(item)


_LISTED = ("content", "tool_calls")
"""An item's lists of API objects: content parts (or blocks), tool calls."""
_NESTED = ("function", "custom", "source")
"""Objects of those: a tool call's function or custom input, a document's source."""


def _inner_names(item: dict[str, Any]) -> Iterator[str]:
    """The names of ``item``'s content parts and tool calls, of their functions and
    sources, and of a tool result's own blocks (``Arguments`` beside ``arguments``, a
    ``Text`` in a tool result, are what the guards would not read)."""
    for key in _LISTED:
        children = item.get(key)
        for child in children if isinstance(children, list) else ():
            if not isinstance(child, dict):
                continue
            yield from child
            for nested in _NESTED:
                inner = child.get(nested)
                if isinstance(inner, dict):
                    yield from inner
            blocks = child.get("content")
            for block in blocks if isinstance(blocks, list) else ():
                if isinstance(block, dict):
                    yield from block


def set_values(body: dict[str, Any], rewrites: Mapping[JsonPath, Any]) -> None:
    """Set the values at ``rewrites``' paths in ``body``, in place.

    ``body`` belongs to one request and is not shared.
    """
    for path, value in rewrites.items():
        parent: Any = body
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = value


def apply_rewrites(body: dict[str, Any], rewrites: Mapping[JsonPath, Any]) -> bytes:
    """:func:`set_values`, then serialise the body once (:func:`encode_body`)."""
    set_values(body, rewrites)
    return encode_body(body)


def encode_body(body: Any) -> bytes:
    """Serialise a request body that goes upstream changed.

    orjson reads JSON nested up to 1,024 levels deep but writes only 255: a body nested
    deeper than that is the caller's to fix, and it is told so (:class:`InvalidRequest`)
    rather than failing the gateway.
    """
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        raise InvalidRequest(
            f"The request body cannot be forwarded: {exc} (JSON nested over 255 levels?)."
        ) from None
