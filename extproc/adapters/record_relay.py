"""Access-log records passed between workers, to the worker that holds their exchange.

With ``--workers N`` an exchange the HTTP authorizer decided waits in the worker that
reserved its budget (:class:`~extproc.accounting.PendingAnswers`), but Envoy's access-log
stream reaches whichever worker the kernel gave its connection. So the authorizer names
the owner in its answer (``x-gateway-owner``, which Envoy keeps as dynamic metadata and
copies into the record), and a worker passes records that are not its own to their owner
over a Unix socket in a directory the supervisor made for the workers. A frame is a
4-byte length and a JSON list of :class:`~extproc.accounting.LoggedAnswer`.

A record whose owner cannot be reached (it stopped or died) is dropped with a warning:
the owner settles its exchanges as reserved when it drains, or they were lost with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import orjson

from extproc.accounting import LoggedAnswer

log = logging.getLogger(__name__)

HEADER_OWNER = "x-gateway-owner"
"""The worker holding a decided exchange; Envoy turns it into dynamic metadata."""
_LENGTH = struct.Struct("!I")

Deliver = Callable[[Sequence[LoggedAnswer]], Awaitable[None]]


class RecordRelay:
    def __init__(self, directory: Path, index: int, deliver: Deliver) -> None:
        self.index = index
        self._directory = directory
        self._deliver = deliver
        self._server: asyncio.Server | None = None
        self._peers: dict[int, asyncio.StreamWriter] = {}
        self._connecting: dict[int, asyncio.Lock] = {}
        self._handlers: set[asyncio.Task[None]] = set()

    def socket(self, index: int) -> Path:
        return self._directory / f"worker-{index}.sock"

    async def start(self) -> None:
        path = self.socket(self.index)
        path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._receive, path)

    async def forward(self, owner: int, answers: Sequence[LoggedAnswer]) -> None:
        """Pass ``answers`` to worker ``owner``; on failure log them and let them go."""
        payload = orjson.dumps(list(answers))
        try:
            async with self._connecting.setdefault(owner, asyncio.Lock()):
                writer = self._peers.get(owner)
                if writer is None or writer.is_closing():
                    _, writer = await asyncio.open_unix_connection(self.socket(owner))
                    self._peers[owner] = writer
            writer.write(_LENGTH.pack(len(payload)) + payload)
            await writer.drain()
        except OSError as error:
            self._peers.pop(owner, None)
            ids = ", ".join(a.request_id for a in answers)
            log.warning("worker %d unreachable (%s); records not passed on: %s", owner, error, ids)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._peers.values():
            writer.close()
        self._peers.clear()
        for task in list(self._handlers):
            task.cancel()
        self.socket(self.index).unlink(missing_ok=True)

    async def _receive(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                frame = orjson.loads(await reader.readexactly(length))
                await self._deliver([LoggedAnswer(**fields) for fields in frame])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the sending worker stopped
        except Exception:
            log.exception("unreadable records from another worker; connection dropped")
        finally:
            self._handlers.discard(task)
            with contextlib.suppress(Exception):
                writer.close()
