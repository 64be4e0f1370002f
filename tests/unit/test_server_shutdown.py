"""The supervisor's end: how long stuck workers may hold it up."""

from __future__ import annotations

import multiprocessing
import signal
import time

from extproc import server


def _sleeping_workers(seconds: float) -> list[multiprocessing.Process]:
    """Three forked workers that each sleep ``seconds`` (as a stuck or a quick worker)."""
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=time.sleep, args=(seconds,), daemon=True) for _ in range(3)]
    for worker in workers:
        worker.start()
    return workers


async def test_stuck_workers_share_one_deadline_then_are_killed() -> None:
    """Workers that do not stop (a blocked event loop, a hung shutdown) are killed when the
    one deadline passes: with a timeout each, the last of N went at N times it."""
    workers = _sleeping_workers(60)
    started = time.monotonic()
    await server._reap(workers, 0.5)
    took = time.monotonic() - started
    for worker in workers:
        worker.join(5)
    assert [w.exitcode for w in workers] == [-signal.SIGKILL] * 3
    assert 0.5 <= took < 1.0


async def test_workers_that_stop_in_time_are_not_waited_for_past_their_exit() -> None:
    workers = _sleeping_workers(0.1)
    started = time.monotonic()
    await server._reap(workers, 5)
    assert time.monotonic() - started < 1.0
    assert [w.exitcode for w in workers] == [0] * 3
