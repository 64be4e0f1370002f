"""The audit log: records leave the request path through a bounded queue to the sinks.

    JsonlFile    one JSON object per line, rotated by size (keeps N backups)
    Stdout       one JSON object per line on standard output (for log collectors)
    RedisStream  XADD with an approximate MAXLEN, so the stream stays bounded

A full queue is counted and logged, never waited on: the request path never blocks on
audit I/O. Each sink writes from a backlog of its own, so one that is slow or down holds
back only itself. ``close()`` (on SIGTERM, after in-flight exchanges finished) drains the
queue into the sinks before the process exits, so a graceful stop loses no record while
the sinks work (one still failing after :data:`CLOSE_SECONDS` loses its backlog, counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis, RedisCluster

from extproc.budgets.redis_store import RedisTarget
from extproc.telemetry.threads import resolve_from_thread

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000
BATCH = 256
LINGER_SECONDS = 0.05
"""How long the writer waits after a record for others to join its batch: a sink write (a
file append, a hop to a worker thread, a Redis round trip) costs far more than a record."""
SINK_BACKLOG = QUEUE_SIZE
"""Records a sink may fall behind by before it drops new ones (about 100 s of an outage at
100 records a second); the other sinks go on meanwhile."""
SINK_BACKLOG_BYTES = 64 * 1024 * 1024
"""And the bytes it may fall behind by: records with recorded bodies can be megabytes each,
and 10,000 of them held gigabytes while a sink was down. A batch alone is always taken."""
RETRY_SECONDS = (0.1, 0.5, 2.0)
"""Waits between the attempts at writing a batch to a failing sink."""
CLOSE_SECONDS = 3.0
"""How long shutdown waits for the sinks to write their backlogs: a sink still down after
that loses them (counted and logged) rather than holding the process past its grace."""


class Sink(Protocol):
    async def write(self, lines: Sequence[bytes]) -> None: ...

    async def close(self) -> None: ...


INLINE_WRITE_BYTES = 256 * 1024
"""A file sink appends a batch up to this size on the event loop, as nginx writes its
access log: an open, an append to the page cache and a close cost tens of microseconds,
less than the hop to a worker thread, whose hand-offs of the GIL with the loop cost
context switches on a shared core (measured, scenario 5 at 300 req/s, three interleaved
runs each: 730-766 µs of service CPU per request inline, 797-863 through a thread). A
bigger batch (recorded bodies) goes to a worker thread, so that the loop never stalls on
it. The file belongs on a local disk: an append to a stalled network file system would
stall the loop."""


class JsonlFile:
    """Appends lines; rotates ``path`` → ``path.1`` … ``path.N`` when it passes ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int = 100 * 1024 * 1024, backups: int = 5):
        self._path, self._max, self._backups = path, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)

    async def write(self, lines: Sequence[bytes]) -> None:
        data = b"".join(lines)
        if len(data) <= INLINE_WRITE_BYTES:
            self._write(data)
        else:
            await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        """Append ``data`` whole or not at all: a failed append (a full disk) is cut back
        to where it began, since the batch is retried: a torn last line would glue the
        retry's first record to it, and what did reach the file would be written twice.
        A rotation that fails is logged and tried again at the next batch; the batch it
        follows is written, and must not be retried."""
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                left = memoryview(data)
                while left:
                    left = left[os.write(fd, left) :]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        if start + len(data) >= self._max:
            try:
                self._rotate()
            except OSError as exc:
                log.error(
                    "audit file %s could not be rotated (it keeps growing): %s", self._path, exc
                )

    def _rotate(self) -> None:
        for index in range(self._backups - 1, 0, -1):
            older = self._path.with_name(f"{self._path.name}.{index}")
            if older.exists():
                os.replace(older, self._path.with_name(f"{self._path.name}.{index + 1}"))
        os.replace(self._path, self._path.with_name(f"{self._path.name}.1"))

    async def close(self) -> None:
        return None


class Stdout:
    """Lines to stdout, written by a daemon thread of this sink's own.

    A full pipe to the log collector must block that thread, not every stream; and not
    the process's exit either: a thread of the default executor is waited for when the
    event loop closes, forever if the pipe never drains (the service logged "stopped"
    and lived on)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[bytes, Callable[[BaseException | None], None]]]
        self._queue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="audit-stdout", daemon=True).start()

    async def write(self, lines: Sequence[bytes]) -> None:
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()
        self._queue.put((b"".join(lines), functools.partial(resolve_from_thread, loop, written)))
        await written  # a failed write fails here, for the log to count its records

    def _run(self) -> None:
        while True:
            data, done = self._queue.get()
            try:
                with _stdout_turn():
                    _write_all(data)
            except Exception as error:  # stdout closed, gone: the batch fails, counted
                done(error)
            else:
                done(None)

    async def close(self) -> None:
        return None


def _cross_process_lock() -> Any:
    """A lock the workers of ``--workers N`` share (made at import, in the supervisor,
    before they fork); ``None`` where the system has no shared semaphores."""
    try:
        return multiprocessing.get_context("fork").Lock()
    except OSError:  # no /dev/shm
        return None


_STDOUT_LOCK = _cross_process_lock()
STDOUT_TURN_SECONDS = 5.0
"""How long a worker waits for another's batch to reach stdout before writing anyway (a
worker killed while writing would otherwise hold every other one's audit back)."""


@contextlib.contextmanager
def _stdout_turn() -> Iterator[None]:
    """One process writes to the shared stdout at a time: a pipe takes a write over
    4 KiB in pieces, and two workers' batches, written at once into a pipe the collector
    was slow to drain, came out cut into each other mid-line."""
    taken = _STDOUT_LOCK is not None and _STDOUT_LOCK.acquire(timeout=STDOUT_TURN_SECONDS)
    try:
        yield
    finally:
        if taken:
            _STDOUT_LOCK.release()


def _write_all(data: bytes) -> None:
    """``data`` to stdout's file descriptor, around Python's buffered stdout: a write
    blocked on a full pipe then holds no lock the interpreter's exit needs (it flushes
    that buffer, and would wait, or abort, for this thread)."""
    fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class RedisStream:
    """``XADD stream MAXLEN ~ maxlen * record <json>``, one pipeline round trip per batch."""

    def __init__(self, redis: RedisTarget, stream: str, maxlen: int = 1_000_000) -> None:
        kind = RedisCluster if redis.cluster else Redis
        self._redis: Redis | RedisCluster = kind.from_url(redis.url, socket_timeout=2.0)
        self._stream, self._maxlen = stream, maxlen

    async def write(self, lines: Sequence[bytes]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for line in lines:
            pipe.xadd(
                self._stream, {"record": line.rstrip(b"\n")}, maxlen=self._maxlen, approximate=True
            )
        await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()


class AuditLog:
    """Records in one bounded queue, serialised in batches and handed to each sink's own
    writer (:class:`_SinkWriter`): a sink that is slow or down (Redis going away) holds
    back only its own backlog, never the other sinks or the queue the request path fills."""

    def __init__(
        self, sinks: Sequence[Sink], on_drop: Callable[[str, int], None] | None = None
    ) -> None:
        self._on_drop = on_drop or (lambda reason, count: None)
        self._writers = [_SinkWriter(sink, self._dropped) for sink in sinks]
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.dropped = 0
        """Records lost by any sink (one record lost by two sinks counts twice)."""

    @property
    def enabled(self) -> bool:
        return bool(self._writers)

    def submit(self, record: dict[str, Any]) -> None:
        """Queue one record; never blocks. A full queue drops it, counted and logged."""
        if not self._writers:
            return
        if self._closed:
            self._dropped("closed", 1)
            log.error("audit record %s came after the log closed: dropped", record["request_id"])
            return
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-log")
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self._dropped("queue_full", 1)
            log.error("audit queue full (%d): record %s dropped", QUEUE_SIZE, record["request_id"])

    async def close(self, within: float = CLOSE_SECONDS) -> None:
        """Write out everything queued (for at most ``within`` seconds: a sink still down
        then loses its backlog, counted and logged), then close the sinks."""
        self._closed = True
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        deadline = asyncio.get_running_loop().time() + within
        for writer in self._writers:
            await writer.close(deadline)

    def _dropped(self, reason: str, count: int) -> None:
        self.dropped += count
        self._on_drop(reason, count)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(LINGER_SECONDS)
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                lines = [line for record in batch if (line := self._serialised(record))]
                for writer in self._writers:
                    writer.put(lines)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _serialised(self, record: dict[str, Any]) -> bytes | None:
        try:
            return orjson.dumps(record) + b"\n"
        except TypeError as error:  # a value JSON cannot hold: a bug, not a reason to stop
            self._dropped("unserialisable", len(self._writers))
            log.error("audit record %s cannot be written: %s", record.get("request_id"), error)
            return None


class _SinkWriter:
    """One sink's backlog of serialised batches, written by a task of its own; a batch
    the sink keeps failing is retried a few times, then counted as lost."""

    def __init__(self, sink: Sink, dropped: Callable[[str, int], None]) -> None:
        self._sink = sink
        self._dropped = dropped
        self._backlog: asyncio.Queue[Sequence[bytes]] = asyncio.Queue()
        self._behind = 0
        """Records in the backlog (batches vary in size: the backlog is bounded by these)."""
        self._behind_bytes = 0
        self._writing: Sequence[bytes] = ()
        """The batch being written (or waiting for its next attempt)."""
        self._task: asyncio.Task[None] | None = None

    def put(self, lines: Sequence[bytes]) -> None:
        if not lines:
            return
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"audit-{self._name}")
        size = sum(map(len, lines))
        if self._behind and (
            self._behind + len(lines) > SINK_BACKLOG
            or self._behind_bytes + size > SINK_BACKLOG_BYTES
        ):
            self._dropped("sink_backlog", len(lines))
            log.error("audit sink %s is behind: %d records dropped", self._name, len(lines))
            return
        self._behind += len(lines)
        self._behind_bytes += size
        self._backlog.put_nowait(lines)

    async def close(self, deadline: float) -> None:
        if self._task is not None:
            left = deadline - asyncio.get_running_loop().time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._backlog.join(), max(left, 0.0))
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            lost = len(self._writing) + self._behind
            if lost:
                self._dropped("shutdown", lost)
                log.error(
                    "audit sink %s still failing at shutdown: %d records lost", self._name, lost
                )
        await self._sink.close()

    @property
    def _name(self) -> str:
        return type(self._sink).__name__

    async def _run(self) -> None:
        while True:
            self._writing = await self._backlog.get()
            self._behind -= len(self._writing)
            self._behind_bytes -= sum(map(len, self._writing))
            try:
                await self._write(self._writing)
                self._writing = ()
            finally:
                self._backlog.task_done()

    async def _write(self, lines: Sequence[bytes]) -> None:
        """Retry a failing sink a few times; then count the batch as lost for that sink."""
        for delay in (*RETRY_SECONDS, None):
            try:
                await self._sink.write(lines)
                return
            except Exception as exc:
                if delay is None:
                    self._dropped("sink_failed", len(lines))
                    log.error(
                        "audit sink %s failed; %d records lost: %s", self._name, len(lines), exc
                    )
                    return
                await asyncio.sleep(delay)
