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
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import cast

import httptools

from extproc.decisions import Headers

log = logging.getLogger(__name__)

Write = Callable[[bytes], bool]
"""Writes one framed answer; ``False`` if the connection is gone."""


@dataclass(slots=True)
class Request:
    """One request: its headers (lower-case names), with ``:method`` and ``:path`` as
    ext_proc names them, and its body in the pieces it arrived in."""

    headers: dict[str, str] = field(default_factory=dict)
    body: list[bytes] = field(default_factory=list)


Handler = Callable[[Request, Write], Awaitable[None]]
"""Answers one request with exactly one ``write``. It should not raise: one that does
gets the server's ``failed`` answer written for it, and the connection closes."""

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


MAX_QUEUED = 32
"""Requests read ahead of their answers on one connection before reading pauses (Envoy
sends one at a time; a pipelining client is held back rather than buffered)."""
LINGER_SECONDS = 2.0
"""How long a connection closed by the server keeps reading (and dropping) what its client
still sends: closed with unread bytes, a socket resets, and the client may lose the last
answer."""


class _TooLarge(Exception):
    """A request past the server's size limit; raised from a parser callback."""


class _Connection(asyncio.Protocol):
    """One kept-alive connection; its requests are answered in arrival order."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._request = Request()
        self._size = 0
        self._queue: deque[Request | None] = deque()
        """Requests to answer; ``None``: the server's answer to an unreadable one, last."""
        self._serving: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._head_only = False
        """The request being answered is a HEAD: its answer goes without its body."""
        self._closing = False
        """Close once the queue is answered (shutdown, the client's wish, or given up)."""
        self._done = False
        """No more requests are read from this connection."""
        self._paused = False
        self._idle: asyncio.TimerHandle | None = None

    def close_when_idle(self) -> None:
        """Shutdown: close now if no request is being answered, else after its answer."""
        self._closing = True
        if self._serving is None and self._transport is not None:
            self._transport.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._server.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._done:
            return  # after the last request: dropped while the connection closes
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # (A callback's _TooLarge arrives as an HttpParserCallbackError.)
            self._give_up()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        path = self._request.headers.get(":path", "") + url.decode("utf-8", "replace")
        self._request.headers[":path"] = path

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        self._request.headers[name.decode("latin-1").lower()] = value.decode("utf-8", "replace")

    def on_body(self, body: bytes) -> None:
        self._count(len(body))
        self._request.body.append(body)

    def on_message_complete(self) -> None:
        request, self._request = self._request, Request()
        if self._parser.should_upgrade():
            return  # feed_data raises HttpParserUpgrade next: not a request we can answer
        request.headers[":method"] = self._parser.get_method().decode("ascii")
        if not self._parser.should_keep_alive():
            self._closing = self._done = True  # answered, then closed (HTTP/1.0, "close")
        self._queue.append(request)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if len(self._queue) >= MAX_QUEUED and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        self._serve_queue()

    # answering
    def _count(self, size: int) -> None:
        self._size += size
        if self._size > self._server.max_request_bytes:
            raise _TooLarge

    def _give_up(self) -> None:
        """The connection's framing is lost (llhttp knows fewer methods than Envoy, a
        client sent garbage or too much): the requests before are answered, then the
        server's answer to an unreadable request, and the connection closes; a client
        opens a new one for its next request."""
        if self._done:
            return  # bytes after "connection: close": the requests before are answered
        self._closing = self._done = True
        self._queue.append(None)
        self._serve_queue()

    def _serve_queue(self) -> None:
        if self._serving is None:
            self._serving = asyncio.get_running_loop().create_task(self._serve())

    def _write(self, answer: bytes) -> bool:
        if self._transport is None or self._transport.is_closing():
            return False
        if self._head_only:
            answer = answer[: answer.index(b"\r\n\r\n") + 4]
        if self._closing and not self._queue and _CLOSE not in answer:
            answer = answer.replace(b"\r\n\r\n", _CLOSE + b"\r\n\r\n", 1)  # the last one
        self._transport.write(answer)
        return True

    async def _serve(self) -> None:
        try:
            while self._queue:
                request = self._queue.popleft()
                if self._paused and len(self._queue) < MAX_QUEUED // 2 and not self._done:
                    self._paused = False
                    if self._transport is not None:
                        self._transport.resume_reading()
                if request is None:
                    self._write(self._server.unreadable)
                    break
                self._head_only = request.headers[":method"] == "HEAD"
                try:
                    await self._server.handler(request, self._write)
                except Exception:
                    log.exception("answering %s failed", request.headers.get(":path"))
                    self._closing = self._done = True
                    self._queue.clear()
                    self._write(self._server.failed)
                    break
                finally:
                    self._head_only = False
        finally:
            self._serving = None
            if self._closing:
                self._close()
            else:
                self._arm_idle()

    def _close(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._done and transport.can_write_eof():
            # Lingering close: the client sees the end of the answers, and what it still
            # sends is read and dropped (not left to reset the socket) for a while.
            transport.write_eof()
            transport.resume_reading()
            asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
        else:
            transport.close()

    def _arm_idle(self) -> None:
        """Close a connection that sends no whole request for ``idle_seconds`` (a request
        half-sent for that long included)."""
        timeout = self._server.idle_seconds
        if timeout is None or self._transport is None:
            return
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(timeout, self._on_idle)

    def _on_idle(self) -> None:
        if self._serving is None and self._transport is not None:
            self._transport.close()


_CLOSE = b"\r\nconnection: close"


class Server:
    """The listening socket and the connections kept open to it."""

    def __init__(
        self,
        handler: Handler,
        *,
        unreadable: bytes,
        failed: bytes,
        max_request_bytes: int,
        idle_seconds: float | None = None,
    ) -> None:
        self.handler = handler
        self.unreadable = unreadable
        """Written (with ``connection: close`` added) before closing a connection whose
        request cannot be read."""
        self.failed = failed
        """Written (with ``connection: close`` added) before closing a connection whose
        handler raised (it should not)."""
        self.max_request_bytes = max_request_bytes
        """Bytes of one request (its URL, header names and values, body) past which it is
        unreadable."""
        self.idle_seconds = idle_seconds
        """Connections with no whole request for this long are closed (``None``: never)."""
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
