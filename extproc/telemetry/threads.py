"""Handing a daemon thread's outcome back to the event loop that waits for it.

The telemetry sinks that may block on what they write to (stdout to a log collector, the
OTLP exporter to a collector) do it in daemon threads of their own: the event loop's end
waits for its default executor's threads, for as long as a stuck pipe or collector holds
one. Such a thread resolves the loop's future when done; if the loop closed meanwhile,
nobody waits any more.
"""

from __future__ import annotations

import asyncio
import contextlib


def resolve_from_thread(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[None],
    error: BaseException | None = None,
) -> None:
    """Settle ``future`` on ``loop`` from another thread: done, or failed with ``error``."""
    with contextlib.suppress(RuntimeError):  # the loop is closed
        loop.call_soon_threadsafe(_resolve, future, error)


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
