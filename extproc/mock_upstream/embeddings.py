"""OpenAI Embeddings: small deterministic vectors, so tests can compare them exactly.

Each input's vector comes from SHAKE-256 of its UTF-8 text (or of its token ids): the same
input always gives the same vector, different inputs practically never collide. Values are
float32 (what the real API returns), in [-1, 1], ``dimensions`` of them (default 8).
``encoding_format: "base64"`` - the openai SDK's default - returns the little-endian float32
bytes base64-encoded, exactly the values of the float form.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import TypeGuard

from aiohttp import web

from . import body as fields
from . import tokens
from .errors import MockError
from .replies import json_response

DEFAULT_DIMENSIONS = 8
MAX_DIMENSIONS = 4096
_SCALE = 1.0 / 2**31


def _inputs(body: fields.JsonObject) -> list[str | list[int]]:
    """The inputs as strings or token-id arrays; 400 for any other shape."""
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if _is_token_array(value):
            return [value]
        items = [item for item in value if isinstance(item, str) or _is_token_array(item)]
        if len(items) == len(value):
            return items
    raise MockError(
        400, "'input' must be a string, an array of strings or of token arrays", param="input"
    )


def _is_token_array(item: object) -> TypeGuard[list[int]]:
    return isinstance(item, list) and all(
        isinstance(tok, int) and not isinstance(tok, bool) for tok in item
    )


def _dimensions(body: fields.JsonObject) -> int:
    value = body.get("dimensions")
    if value is None:
        return DEFAULT_DIMENSIONS
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DIMENSIONS:
        raise MockError(
            400, f"'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}", param="dimensions"
        )
    return value


def vector_bytes(item: str | list[int], dimensions: int) -> bytes:
    """The little-endian float32 bytes of the embedding of ``item``."""
    data = item.encode() if isinstance(item, str) else b",".join(b"%d" % tok for tok in item)
    raw = hashlib.shake_256(data).digest(4 * dimensions)
    ints = struct.unpack(f"<{dimensions}i", raw)
    return struct.pack(f"<{dimensions}f", *(i * _SCALE for i in ints))


def _tokens(item: str | list[int]) -> int:
    return tokens.count(item) if isinstance(item, str) else len(item)


async def embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings``: one vector per input, float or base64 encoded."""
    body = await fields.read_object(request)
    inputs = _inputs(body)
    dimensions = _dimensions(body)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise MockError(
            400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format"
        )
    data = []
    for index, item in enumerate(inputs):
        packed = vector_bytes(item, dimensions)
        embedding: str | tuple[float, ...] = (
            base64.b64encode(packed).decode()
            if encoding == "base64"
            else struct.unpack(f"<{dimensions}f", packed)
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    prompt_tokens = sum(_tokens(item) for item in inputs)
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": fields.model(body, "mock-embedding"),
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )
