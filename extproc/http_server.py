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
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

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
"""Answers one request with exactly one ``write``. It should not raise: if it does, the
server writes its ``failed`` answer (unless the handler had answered) and closes the
connection."""

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
sends one at a time). Reading pauses after the read that queued them, so one read of tiny
pipelined requests can still queue more. Answers the client does not read are bounded
apart: while the transport's buffer is over its high-water mark, reading pauses and no
request is answered."""
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
"""Asked for by ``expect: 100-continue`` (curl's, for a body over 1 KB): sent, the client
sends its body at once instead of after a second's wait."""
LINGER_SECONDS = 2.0
"""How long a connection closed by the server keeps reading (and dropping) what its client
still sends: closed with unread bytes, a socket resets, and the client may lose the last
answer."""


class _TooLarge(Exception):
    """A body past the server's size limit; raised from the parser's callback."""


class _Connection(asyncio.Protocol):
    """One kept-alive connection; its requests are answered in arrival order."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        """Kept: CPython 3.11 makes a system call (getpid) for every get_running_loop()."""
        self._parser = httptools.HttpRequestParser(self)
        self._request = Request()
        self._unanswered_bytes = 0
        """Bytes read since the last whole request: bounds a request's head, per read."""
        self._body_bytes = 0
        """Bytes of the body being read: bounds it exactly."""
        self.receiving = False
        """A request has begun to arrive and is not whole yet."""
        self.began_at = 0.0
        """When it began to arrive (the loop's clock): :meth:`Server.start`'s sweep closes
        a connection whose request takes longer than ``request_seconds``."""
        self._in_head = False
        """The request's head is being read: a header field after it is a trailer's."""
        self._queue: deque[Request | None] = deque()
        """Requests to answer; ``None``: the server's answer to an unreadable one, last."""
        self._serving: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._head_only = False
        """The request being answered is a HEAD: its answer goes without its body."""
        self._answered = False
        """The request being answered has had its answer written."""
        self._closing = False
        """Close once the queue is answered (shutdown, the client's wish, or given up)."""
        self._done = False
        """No more requests are read from this connection."""
        self._stopping = False
        """Closed for shutdown: at once when idle, without lingering; a request still
        arriving is read to its end and answered first."""
        self._paused = False
        """Reading paused: :data:`MAX_QUEUED` requests wait."""
        self._blocked: asyncio.Future[None] | None = None
        """Writing paused (the client does not read its answers): done when it resumes."""
        self._eof = False
        """The client sent its end (half-closed): it may still read the answers."""
        self._idle: asyncio.TimerHandle | None = None

    def close_when_idle(self) -> None:
        """Shutdown: read no more requests; close now if none is being answered or
        received, else after its answer (which says so).

        A request partly received (its head, or part of its body) is in flight too: the
        client sent it before the shutdown, and a reset would fail it (Envoy fails a check
        closed). It is read to its end and answered; what follows it is not read.
        """
        self._closing = self._stopping = True
        if self.receiving:
            return  # on_message_complete marks it the last
        self._done = True
        if self._blocked is not None:
            self._abort()  # it reads no answers: the one being written would not be read
        elif self._serving is None and self._transport is not None:
            self._transport.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._server.connections.add(self)
        if self._server.idle_seconds is not None:
            self._arm_idle(self._server.idle_seconds)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return  # after the last request: dropped while the connection closes
        self._unanswered_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            if not isinstance(error.__context__, _TooLarge):
                # One of our callbacks failed: a bug, not the client's doing.
                log.error("reading a request failed", exc_info=error.__context__)
            self._give_up()
            return
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._give_up()
            return
        # Whole requests reset the count as they complete, so what is left is the part
        # of one not yet whole: unbounded, a header that never ends would grow for ever.
        if self._unanswered_bytes > self._server.max_request_bytes:
            self._give_up()

    def eof_received(self) -> bool:
        """The client half-closed: answer what it sent whole, then close (asyncio would
        close at once, and the answers of requests being served would be lost). A request
        not whole now never will be."""
        self._eof = True
        self.receiving = False
        self._closing = self._done = True
        return self._serving is not None

    def pause_writing(self) -> None:
        """The client does not read its answers: read and answer nothing more until it
        does, or every request it pipelines would add an answer to the buffer."""
        if self._blocked is None:
            self._blocked = self._loop.create_future()
            self._reading()

    def resume_writing(self) -> None:
        blocked, self._blocked = self._blocked, None
        if blocked is not None and not blocked.done():
            blocked.set_result(None)
        self._reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.receiving = False  # never whole now
        self._server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self.resume_writing()  # a handler waiting to answer finds the connection gone

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.receiving = self._in_head = True
        self.began_at = self._loop.time()

    def on_url(self, url: bytes) -> None:
        path = self._request.headers.get(":path", "") + url.decode("utf-8", "replace")
        self._request.headers[":path"] = path

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailer: never one of the request's own headers
        self._request.headers[name.decode("latin-1").lower()] = value.decode("utf-8", "replace")

    def on_headers_complete(self) -> None:
        self._in_head = False
        expect = self._request.headers.get("expect")
        if (
            expect is not None
            and expect.lower() == "100-continue"
            and self._transport is not None
            and not self._queue  # behind earlier answers it would come out of turn
            and self._serving is None
            and self._parser.get_http_version() == "1.1"  # HTTP/1.0 has no such answer
        ):
            self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._request.body.append(body)
        self._body_bytes += len(body)
        if self._body_bytes > self._server.max_request_bytes:
            raise _TooLarge

    def on_message_complete(self) -> None:
        request, self._request = self._request, Request()
        self._unanswered_bytes = self._body_bytes = 0
        self.receiving = False
        if self._done:
            return  # read in the same piece as the last request: not answered
        if self._parser.should_upgrade():
            return  # feed_data raises HttpParserUpgrade next: not a request we can answer
        request.headers[":method"] = self._parser.get_method().decode("ascii")
        if self._stopping or not self._parser.should_keep_alive():
            # Answered, then closed (HTTP/1.0, "close", or received during shutdown).
            self._closing = self._done = True
        self._queue.append(request)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if len(self._queue) >= MAX_QUEUED and not self._paused:
            self._paused = True
            self._reading()
        if self._serving is None:
            self._serving = self._server.answering(self._serve())

    # answering
    def _give_up(self) -> None:
        """The connection's framing is lost (llhttp knows fewer methods than Envoy, a
        client sent garbage or too much): the requests before are answered, then the
        server's answer to an unreadable request, and the connection closes; a client
        opens a new one for its next request."""
        self.receiving = False  # what was arriving is answered as unreadable, or dropped
        if self._done:
            return  # bytes after "connection: close": the requests before are answered
        self._closing = self._done = True
        self._queue.append(None)
        if self._serving is None:
            self._serving = self._server.answering(self._serve())

    def _write(self, answer: bytes) -> bool:
        if self._transport is None or self._transport.is_closing():
            return False
        self._answered = True
        last = self._closing and not self._queue
        if self._head_only or last:
            answer = _last_touches(answer, self._head_only, last)
        self._transport.write(answer)
        return True

    async def _serve(self) -> None:
        try:
            while self._queue and self._transport is not None:
                if self._blocked is not None:
                    try:  # a client that reads nothing for that long is not coming back
                        await asyncio.wait_for(
                            asyncio.shield(self._blocked), self._server.request_seconds
                        )
                    except TimeoutError:
                        self._abort()
                        break
                    continue  # the connection may be gone meanwhile
                request = self._queue.popleft()
                if self._paused and len(self._queue) < MAX_QUEUED // 2:
                    self._paused = False
                    self._reading()
                if request is None:
                    self._write(self._server.unreadable)
                    break
                self._head_only = request.headers[":method"] == "HEAD"
                self._answered = False
                try:
                    await self._server.handler(request, self._write)
                except Exception:
                    log.exception("answering %s failed", request.headers.get(":path"))
                    self._closing = self._done = True
                    self._queue.clear()
                    if not self._answered:
                        self._write(self._server.failed)
                    break
                finally:
                    self._head_only = False
        finally:
            self._serving = None
            if self._closing:
                self._close()
            elif self._server.idle_seconds is not None:
                self._arm_idle(self._server.idle_seconds)

    def _reading(self) -> None:
        """Read while neither a full queue nor unread answers hold it back (nor after
        the last request: the lingering close reads on by itself)."""
        transport = self._transport
        if transport is None or transport.is_closing() or self._done:
            return
        if self._paused or self._blocked is not None:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _close(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._stopping or self._eof or not transport.can_write_eof():
            transport.close()
            return
        # Lingering close: the client sees the end of the answers, and what it still sends
        # is read and dropped (not left to reset the socket) for a while.
        transport.write_eof()
        transport.resume_reading()
        self._loop.call_later(LINGER_SECONDS, transport.close)

    def _arm_idle(self, seconds: float) -> None:
        """Close a connection that sends no whole request for ``seconds`` (a request
        half-sent for that long included)."""
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(seconds, self._on_idle)

    def _on_idle(self) -> None:
        if self._serving is None and self._transport is not None:
            self._transport.close()

    def _abort(self) -> None:
        self.receiving = False
        self._closing = self._done = True
        self._queue.clear()
        if self._transport is not None:
            self._transport.abort()

    def abort_if_slower_than(self, deadline: float) -> None:
        """Close the connection if its request began to arrive before ``deadline``: its
        client (Envoy's check times out long before) has given up, or is holding the
        server's memory and a shutdown's wait for in-flight requests."""
        if self.receiving and self.began_at < deadline:
            self._abort()


def _last_touches(answer: bytes, head_only: bool, closing: bool) -> bytes:
    """``answer`` without its body (to a HEAD) and/or saying the connection closes after
    it (the last one)."""
    end = answer.find(b"\r\n\r\n")
    if end < 0:
        return answer
    head = answer[:end]
    if closing and b"\r\nconnection:" not in head.lower():
        head += b"\r\nconnection: close"
    return head + b"\r\n\r\n" + (b"" if head_only else answer[end + 4 :])


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
        request_seconds: float = 60.0,
    ) -> None:
        self.handler = handler
        self.unreadable = unreadable
        """Written (with ``connection: close`` added) before closing a connection whose
        request cannot be read."""
        self.failed = failed
        """Written (with ``connection: close`` added) before closing a connection whose
        handler raised (it should not)."""
        self.max_request_bytes = max_request_bytes
        """A body past this many bytes makes its request unreadable, and so does a request
        not whole after this many (checked per read: a head may pass it by one read)."""
        self.idle_seconds = idle_seconds
        """Connections with no whole request for this long are closed (``None``: never)."""
        self.request_seconds = request_seconds
        """A connection whose request is not whole this long after it began to arrive is
        closed (checked every quarter of it, so closed within 1.25 times it)."""
        self.connections: set[_Connection] = set()
        self._answering: set[asyncio.Task[None]] = set()
        """Tasks answering requests, also those of a connection already lost."""
        self._listening: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop it listens on (:meth:`start`), which runs its requests' tasks."""

    @property
    def busy(self) -> int:
        """Requests in flight: those being answered, and those partly received (shutdown
        waits for both)."""
        return len(self._answering) + sum(c.receiving for c in self.connections)

    @property
    def port(self) -> int:
        assert self._listening is not None, "not started"
        return int(self._listening.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int, *, reuse_port: bool) -> None:
        """Listen on ``host:port``; ``reuse_port`` shares it with other processes."""
        self._loop = asyncio.get_running_loop()
        self._listening = await self._loop.create_server(
            lambda: _Connection(self), host, port, reuse_port=reuse_port
        )
        self._sweep()

    def _sweep(self) -> None:
        """Close the connections whose request is slower than ``request_seconds``; then
        again in a quarter of it. One timer for the server, not one per request (every
        check would arm and cancel one)."""
        assert self._loop is not None
        deadline = self._loop.time() - self.request_seconds
        for connection in list(self.connections):
            connection.abort_if_slower_than(deadline)
        if (
            self._listening is not None
            and not self._listening.is_serving()
            and not self.connections
        ):
            return  # closed, and no connection left to watch
        self._loop.call_later(self.request_seconds / 4, self._sweep)

    def close(self) -> None:
        """Stop taking connections and requests: idle connections close now, busy ones
        (a request being answered, or still arriving) once their request is answered."""
        if self._listening is not None:
            self._listening.close()
        # The sweep goes on while connections are left: a request still arriving at
        # shutdown is waited for, but not past request_seconds.
        for connection in list(self.connections):
            connection.close_when_idle()

    async def answered(self, within: float) -> bool:
        """Wait, up to ``within`` seconds, for the requests being answered (after
        :meth:`close`: so that what their handlers read, such as a store, is closed only
        once they are done). Whether all were answered in time."""
        if not self._answering:
            return True
        _, pending = await asyncio.wait(self._answering, timeout=within)
        return not pending

    def answering(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task of a connection's, for :meth:`answered` to wait for."""
        loop = self._loop or asyncio.get_running_loop()
        task = loop.create_task(work)
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)
        return task
