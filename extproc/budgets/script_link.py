"""One pipelined Redis connection for the budget scripts: the calls on every request's path.

Why not redis-py for these: profiled under the benchmark, redis-py spent ~30 % of the
event loop's time at concurrency 1 on the two script calls a request makes (pool checkout
and fork checks, argument filtering and observability hooks, a timer per socket read),
while the scripts themselves cost Redis a few microseconds. This link keeps what those
calls need and nothing else: commands written in RESP (a few lines, the protocol is
stable), replies parsed by hiredis (the C parser redis-py itself uses), replies matched to
callers in order on one connection, so concurrent calls are pipelined without a pool.

Everything else (MGET, PING, health, Redis Cluster, TLS) stays with redis-py;
:meth:`RedisStore.from_url` uses this link only for plain TCP and Unix-socket servers, with
the address, database and credentials redis-py parsed from the URL.

Failures: a call that gets no reply within ``timeout`` fails alone (as one redis-py call
would); the calls queued behind it on the connection keep waiting for their replies, which
arrive in order, while new calls open a fresh connection and the old one closes once no
call waits on it. A lost connection fails the calls waiting on it. ``timeout`` bounds a
whole call, connecting and logging in (AUTH, SELECT) included, and calls that find no
connection share one attempt to open it, made within ``timeout`` of its start: when it
fails they all fail with it, each within its own ``timeout`` (were each to make an
attempt of its own in turn, the k-th call of a batch would wait k timeouts). Error replies, refused
connections and timeouts all raise :class:`~extproc.budgets.store.StoreUnavailable`, as
redis-py's errors do. As with any client, a call that timed out may still have run on the
server (see the fail modes in :mod:`extproc.budgets.resilient_store`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis

from extproc.budgets.store import StoreUnavailable

Arg = str | int | bytes


@dataclass(frozen=True, slots=True)
class Address:
    """Where the server is and how to log in; from redis-py's parsed connection settings."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    """A Unix socket instead of host and port."""
    db: int = 0
    username: str | None = None
    password: str | None = None


def pack(args: tuple[Arg, ...]) -> bytes:
    """One command as a RESP array of bulk strings, by hiredis's packer (in C: under half
    the CPU of building it in Python, for a reservation's two dozen arguments)."""
    # hiredis's stub types the command as a tuple of one element, and its result as Any.
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


class _Protocol(asyncio.Protocol):
    """Replies, in order, to the futures of the commands written."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.retiring = False
        self.loop = asyncio.get_running_loop()
        """Kept: CPython 3.11 makes a system call (getpid) for every get_running_loop()."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            future = self.waiting.popleft()
            if future.done():
                continue  # its caller gave up waiting; the reply is read and dropped
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        self._close_if_retired()

    def retire(self) -> None:
        """Close once every call still queued here is answered or has given up."""
        self.retiring = True
        self._close_if_retired()

    def _close_if_retired(self) -> None:
        waited_on = any(not future.done() for future in self.waiting)
        if self.retiring and self.transport is not None and not waited_on:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.fail(ConnectionError(f"connection lost: {exc}" if exc else "connection closed"))

    def fail(self, error: Exception) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class ScriptLink:
    """Runs Lua scripts by SHA (EVALSHA), loading them (EVAL) when the server lacks them."""

    def __init__(self, address: Address, timeout: float) -> None:
        self._address = address
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        """The attempt to connect under way, which every call without a connection awaits."""

    async def run(self, script: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        sha = _sha(script)
        try:
            return await self._command(("EVALSHA", sha, len(keys), *keys, *args))
        except hiredis.ReplyError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise StoreUnavailable(f"redis: {error}") from error
        try:  # after a restart or SCRIPT FLUSH: EVAL also caches it under its SHA
            return await self._command(("EVAL", script, len(keys), *keys, *args))
        except hiredis.ReplyError as error:
            raise StoreUnavailable(f"redis: {error}") from error

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()

    async def _command(self, args: tuple[Arg, ...]) -> Any:
        """One command, answered within ``timeout`` of now, connecting first if need be
        (an attempt under way started no later than now, so it ends by then too)."""
        open_ = self._protocol
        if open_ is not None and open_.transport is not None:
            deadline = open_.loop.time() + self._timeout
        else:
            deadline = asyncio.get_running_loop().time() + self._timeout
        protocol = await self._connected()
        return await self._send(protocol, args, deadline)

    async def _send(self, protocol: _Protocol, args: tuple[Arg, ...], deadline: float) -> Any:
        """``args``'s reply on ``protocol``, or :class:`StoreUnavailable` past ``deadline``
        (the event loop's time)."""
        transport = protocol.transport
        if transport is None:
            raise StoreUnavailable("redis: connection closed")
        loop = protocol.loop
        future: asyncio.Future[Any] = loop.create_future()
        protocol.waiting.append(future)
        transport.write(pack(args))
        timer = loop.call_at(deadline, self._expire, protocol, future)
        try:
            return await future
        except (ConnectionError, OSError) as error:
            raise StoreUnavailable(f"redis: {error}") from error
        finally:
            timer.cancel()

    def _expire(self, protocol: _Protocol, future: asyncio.Future[Any]) -> None:
        """Fail the call that waited too long, and only it: the calls queued behind it
        may still get their replies (Redis may well have run them all). New calls go to
        a fresh connection; this one closes once no call waits on it any more."""
        if future.done():
            return
        future.set_exception(StoreUnavailable(f"redis: no reply within {self._timeout}s"))
        if self._protocol is protocol:
            self._protocol = None
        protocol.retire()

    async def _connected(self) -> _Protocol:
        """The open connection, else the one the attempt under way (or a new one) opens."""
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            return protocol
        attempt = self._connecting
        if attempt is None or attempt.done():
            attempt = self._connecting = asyncio.ensure_future(self._open())
            attempt.add_done_callback(_retrieve)
        # A caller that gives up (cancelled) leaves the attempt to the others.
        return await asyncio.shield(attempt)

    async def _open(self) -> _Protocol:
        """One attempt to connect, shared by every call made meanwhile."""
        self._protocol = await self._connect()
        return self._protocol

    async def _connect(self) -> _Protocol:
        """A connection, logged in and on its database within ``timeout`` (a server that
        accepts and never answers AUTH counts as down as fast as one that refuses)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        address = self._address
        try:
            if address.path is not None:
                opening = loop.create_unix_connection(_Protocol, address.path)
            else:
                opening = loop.create_connection(_Protocol, address.host, address.port)
            _, protocol = await asyncio.wait_for(opening, self._timeout)
        except (OSError, TimeoutError) as error:
            raise StoreUnavailable(f"redis: cannot connect: {error}") from error
        try:
            if address.password is not None:
                login = (address.username, address.password) if address.username else ()
                await self._send(
                    protocol, ("AUTH", *login) if login else ("AUTH", address.password), deadline
                )
            if address.db:
                await self._send(protocol, ("SELECT", address.db), deadline)
        except hiredis.ReplyError as error:
            if protocol.transport is not None:
                protocol.transport.close()
            raise StoreUnavailable(f"redis: {error}") from error
        return protocol


def _retrieve(attempt: asyncio.Future[_Protocol]) -> None:
    """Mark a failed attempt's error as seen: every caller that awaited it has it, and
    when all of them gave up first, asyncio would log it as never retrieved."""
    if not attempt.cancelled():
        attempt.exception()


@functools.cache
def _sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
