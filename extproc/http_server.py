"""The HTTP/1.1 server under the HTTP authorizer and the admin port, on the event loop.

Both ports take a few fixed kinds of request from a known client (Envoy's checks and
answer reports; probes and Prometheus scrapes), so what they need from a server is small:
parse, keep each connection's answers in order, close cleanly on shutdown. httptools
(llhttp, the parser uvicorn uses) parses in C; this module frames the answers. A request
costs ~30 µs of the event loop here. aiohttp's server, which the admin port used before,
cost ~13 MB of imports in every process (its client, yarl, multidict...) for two paths.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import cast

import httptools

from extproc.decisions import Headers

Write = Callable[[bytes], bool]
"""Writes one framed answer; ``False`` if the connection is gone."""


@dataclass(slots=True)
class Request:
    """One request: its headers (lower-case names), with ``:method`` and ``:path`` as
    ext_proc names them, and its body in the pieces it arrived in."""

    headers: dict[str, str] = field(default_factory=dict)
    body: list[bytes] = field(default_factory=list)


Handler = Callable[[Request, Write], Awaitable[None]]
"""Answers one request with exactly one ``write``, and never raises."""

_REASONS = {status.value: status.phrase for status in HTTPStatus}


def frame(status: int, headers: Headers, body: bytes) -> bytes:
    """An answer on the wire; ``content-length`` is set from ``body`` (a given one is
    dropped)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    lines += [f"{name}: {_safe(value)}" for name, value in headers if name != "content-length"]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def _safe(value: str) -> str:
    """A header value cannot carry a line break (it would forge headers)."""
    if "\r" in value or "\n" in value:
        raise ValueError("header value with a line break")
    return value


class _TooLarge(Exception):
    """A request past the server's size limit; raised from a parser callback."""


class _Connection(asyncio.Protocol):
    """One kept-alive connection; its requests are answered in arrival order."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._request = Request()
        self._received = 0
        self._queue: deque[Request] = deque()
        self._serving: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._closing = False

    def close_when_idle(self) -> None:
        """Shutdown: close now if no request is being answered, else after its answer."""
        self._closing = True
        if self._serving is None and self._transport is not None:
            self._transport.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        try:
            if self._received > self._server.max_request_bytes:
                raise _TooLarge
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, _TooLarge):
            # The connection's framing is lost (llhttp knows fewer methods than Envoy, a
            # client sent garbage or too much): answer what the server says to such a
            # request and close; a client opens a new connection for the next one.
            assert self._transport is not None
            self._transport.write(self._server.unreadable)
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._server.connections.discard(self)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        path = self._request.headers.get(":path", "") + url.decode("utf-8", "replace")
        self._request.headers[":path"] = path

    def on_header(self, name: bytes, value: bytes) -> None:
        self._request.headers[name.decode("latin-1").lower()] = value.decode("utf-8", "replace")

    def on_body(self, body: bytes) -> None:
        self._request.body.append(body)

    def on_message_complete(self) -> None:
        request, self._request = self._request, Request()
        self._received = 0
        request.headers[":method"] = self._parser.get_method().decode("ascii")
        if not self._parser.should_keep_alive():
            self._closing = True  # answered, then closed (HTTP/1.0, "connection: close")
        self._queue.append(request)
        if self._serving is None:
            self._serving = asyncio.get_running_loop().create_task(self._serve())

    def _write(self, answer: bytes) -> bool:
        if self._transport is None or self._transport.is_closing():
            return False
        self._transport.write(answer)
        return True

    async def _serve(self) -> None:
        try:
            while self._queue:
                await self._server.handler(self._queue.popleft(), self._write)
        finally:
            self._serving = None
            if self._closing and self._transport is not None:
                self._transport.close()


class Server:
    """The listening socket and the connections kept open to it."""

    def __init__(self, handler: Handler, unreadable: bytes, max_request_bytes: int) -> None:
        self.handler = handler
        self.unreadable = unreadable
        """Written before closing a connection whose request cannot be read."""
        self.max_request_bytes = max_request_bytes
        """Bytes of one request (head and body) past which it is unreadable."""
        self.connections: set[_Connection] = set()
        self._listening: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._listening is not None, "not started"
        return int(self._listening.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int, *, reuse_port: bool) -> None:
        """Listen on ``host:port``; ``reuse_port`` shares it with other processes."""
        self._listening = await asyncio.get_running_loop().create_server(
            lambda: _Connection(self), host, port, reuse_port=reuse_port
        )

    def close(self) -> None:
        """Stop taking connections and requests: idle connections close now, busy ones
        once their request is answered."""
        if self._listening is not None:
            self._listening.close()
        for connection in list(self.connections):
            connection.close_when_idle()
