"""The audit log: records leave the request path through a bounded queue to the sinks.

    JsonlFile    one JSON object per line, rotated by size (keeps N backups)
    Stdout       one JSON object per line on standard output (for log collectors)
    RedisStream  XADD with an approximate MAXLEN, so the stream stays bounded

A full queue is counted and logged, never waited on: the request path never blocks on
audit I/O. ``close()`` (on SIGTERM, after in-flight exchanges finished) drains the queue
into the sinks before the process exits, so a graceful stop loses no record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis, RedisCluster

from extproc.budgets.redis_store import RedisTarget

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000
BATCH = 256
LINGER_SECONDS = 0.05
"""How long the writer waits after a record for others to join its batch: a sink write is
a hop to a worker thread (or a Redis round trip), far dearer than the record itself."""


class Sink(Protocol):
    async def write(self, lines: Sequence[bytes]) -> None: ...

    async def close(self) -> None: ...


class JsonlFile:
    """Appends lines; rotates ``path`` → ``path.1`` … ``path.N`` when it passes ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int = 100 * 1024 * 1024, backups: int = 5):
        self._path, self._max, self._backups = path, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)

    async def write(self, lines: Sequence[bytes]) -> None:
        await asyncio.to_thread(self._write, b"".join(lines))

    def _write(self, data: bytes) -> None:
        with self._path.open("ab") as out:
            out.write(data)
            size = out.tell()
        if size >= self._max:
            self._rotate()

    def _rotate(self) -> None:
        for index in range(self._backups - 1, 0, -1):
            older = self._path.with_name(f"{self._path.name}.{index}")
            if older.exists():
                os.replace(older, self._path.with_name(f"{self._path.name}.{index + 1}"))
        os.replace(self._path, self._path.with_name(f"{self._path.name}.1"))

    async def close(self) -> None:
        return None


class Stdout:
    async def write(self, lines: Sequence[bytes]) -> None:
        # A full pipe to the log collector must block a worker thread, not every stream.
        await asyncio.to_thread(self._write, b"".join(lines))

    @staticmethod
    def _write(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    async def close(self) -> None:
        return None


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
    def __init__(self, sinks: Sequence[Sink], on_drop: Callable[[str], None] | None = None):
        self._sinks = list(sinks)
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self._task: asyncio.Task[None] | None = None
        self._on_drop = on_drop or (lambda reason: None)
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return bool(self._sinks)

    def submit(self, record: dict[str, Any]) -> None:
        """Queue one record; never blocks. A full queue drops it, counted and logged."""
        if not self._sinks:
            return
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit-log")
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1
            self._on_drop("queue_full")
            log.error("audit queue full (%d): record %s dropped", QUEUE_SIZE, record["request_id"])

    async def close(self) -> None:
        """Write out everything queued, then close the sinks."""
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sink in self._sinks:
            await sink.close()

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(LINGER_SECONDS)
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            lines = [orjson.dumps(record) + b"\n" for record in batch]
            for sink in self._sinks:
                await self._write(sink, lines)
            for _ in batch:
                self._queue.task_done()

    async def _write(self, sink: Sink, lines: Sequence[bytes]) -> None:
        """Retry a failing sink a few times; then count the batch as lost for that sink."""
        for delay in (0.1, 0.5, 2.0, None):
            try:
                await sink.write(lines)
                return
            except Exception as exc:
                if delay is None:
                    self.dropped += len(lines)
                    self._on_drop("sink_failed")
                    log.error(
                        "audit sink %s failed; %d records lost: %s",
                        type(sink).__name__,
                        len(lines),
                        exc,
                    )
                    return
                await asyncio.sleep(delay)
