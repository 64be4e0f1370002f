"""The supervisor's end: how long stuck workers may hold it up."""

from __future__ import annotations

import multiprocessing
import signal
import time

from extproc import server


async def test_stuck_workers_share_one_deadline_then_are_killed() -> None:
    """Workers that do not stop (a blocked event loop, a hung shutdown) are killed when the
    one deadline passes: with a timeout each, the last of N went at N times it."""
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=time.sleep, args=(60,), daemon=True) for _ in range(3)]
    for worker in workers:
        worker.start()
    started = time.monotonic()
    await server._reap(workers, 0.5)
    took = time.monotonic() - started
    for worker in workers:
        worker.join(5)
    assert [w.exitcode for w in workers] == [-signal.SIGKILL] * 3
    assert 0.5 <= took < 1.0


async def test_workers_that_stop_in_time_are_not_waited_for_past_their_exit() -> None:
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=time.sleep, args=(0.1,), daemon=True) for _ in range(3)]
    for worker in workers:
        worker.start()
    started = time.monotonic()
    await server._reap(workers, 5)
    assert time.monotonic() - started < 1.0
    assert [w.exitcode for w in workers] == [0] * 3
