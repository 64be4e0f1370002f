"""The supervisor's end: how long stuck workers may hold it up."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time

import pytest

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


async def _stopped(stop: asyncio.Event, within: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), within)
    except TimeoutError:
        return False
    return True


async def test_a_worker_stops_once_the_process_holding_the_lifeline_is_gone() -> None:
    """The supervisor alone holds the write end: a worker keeps serving while it lives,
    and stops (gracefully, by its stop event) as soon as it is gone, killed included."""
    read, write = os.pipe()
    context = multiprocessing.get_context("fork")
    supervisor = context.Process(target=time.sleep, args=(60,), daemon=True)
    supervisor.start()  # holds its copy of the write end
    os.close(write)  # as a worker does first thing: only the supervisor's copy is left
    lifeline = server.Lifeline(read, write, supervisor=supervisor.pid or 0)
    stop = asyncio.Event()
    try:
        server._stop_when_orphaned(stop, lifeline)
        assert not await _stopped(stop, 0.3)
        supervisor.kill()
        assert await _stopped(stop, 5)
    finally:
        supervisor.join(5)
        os.close(read)


async def test_a_worker_whose_supervisor_went_before_it_listened_stops_at_once() -> None:
    read, write = os.pipe()
    os.close(write)
    stop = asyncio.Event()
    try:
        server._stop_when_orphaned(stop, server.Lifeline(read, write, supervisor=1))
        assert await _stopped(stop, 5)
    finally:
        os.close(read)


@pytest.mark.parametrize(
    ("grace", "reserve"), [(30.0, 2.0), (4.0, 2.0), (1.0, 0.5), (0.0, 0.0), (-1.0, 0.0)]
)
def test_the_access_log_drain_keeps_the_end_of_the_grace(grace: float, reserve: float) -> None:
    """Records of answers ending during shutdown still settle: the drain keeps the last
    2 s of the grace (access_log.DRAIN_SECONDS), half of a shorter one, none of none."""
    assert server._drain_reserve(grace) == reserve
