"""A bounded record of the requests the mock received, for tests to inspect.

Tests use it to prove what actually reached the provider through the gateway: that the
caller's gateway key was stripped, that a guardrail's redaction landed in the body. Recording
sits on the benchmark's hot path, so it only appends raw bytes to a bounded deque; decoding
headers and bodies into JSON happens when someone reads the record (``GET /_mock/requests``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from aiohttp import web

DEFAULT_LIMIT = 200


@dataclass(frozen=True, slots=True)
class _Entry:
    method: str
    path: str
    raw_headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    time: float


class Recorder:
    """The last ``limit`` requests, oldest first."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self._entries: deque[_Entry] = deque(maxlen=limit)

    def record(self, request: web.Request, body: bytes) -> None:
        """Remember ``request`` (cheap: no decoding here)."""
        self._entries.append(
            _Entry(request.method, request.path, request.raw_headers, body, time.time())
        )

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self._entries.clear()

    def as_json(self) -> list[dict[str, object]]:
        """The record as JSON-ready dicts.

        Header names are lowercased; a header sent more than once is joined with ``", "``.
        Bodies are decoded as UTF-8 with ``errors="replace"`` so binary bodies still show.
        """
        return [
            {
                "method": entry.method,
                "path": entry.path,
                "headers": _headers(entry.raw_headers),
                "body": entry.body.decode("utf-8", errors="replace"),
                "time": entry.time,
            }
            for entry in self._entries
        ]


def _headers(raw: tuple[tuple[bytes, bytes], ...]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("utf-8", errors="replace")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


RECORDER = web.AppKey("mock_recorder", Recorder)
