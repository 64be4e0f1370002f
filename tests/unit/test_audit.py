"""The audit log's queue and sinks: nothing lost, bounded, rotated."""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import resource
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import pytest
from redis.asyncio import Redis

from extproc.budgets.redis_store import RedisTarget
from extproc.telemetry import audit
from extproc.telemetry import observer as observer_module
from extproc.telemetry.audit import AuditLog, JsonlFile, RedisStream
from extproc.telemetry.observer import Observer
from extproc.telemetry.record import record_time


def record(i: int) -> dict[str, object]:
    return {"request_id": f"r{i}", "team": "t", "status": 200}


async def test_file_sink_writes_one_line_per_record_and_rotates(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlFile(path, max_bytes=200, backups=2)
    for i in range(20):  # one write per record (AuditLog would batch them by time)
        await sink.write([json.dumps(record(i)).encode() + b"\n"])
    await sink.close()
    backups = [path.with_name("audit.jsonl.1"), path.with_name("audit.jsonl.2")]
    assert all(f.exists() for f in backups)
    assert not path.with_name("audit.jsonl.3").exists()  # only `backups` are kept
    files = [*backups, *([path] if path.exists() else [])]
    ids = [json.loads(line)["request_id"] for f in files for line in f.read_text().splitlines()]
    assert len(ids) == len(set(ids)) and "r19" in ids
    assert all(f.stat().st_size <= 200 + 60 for f in files)


async def test_a_full_disk_mid_batch_leaves_no_torn_line_and_no_record_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills half-way through a batch (a file size limit stands in for it) and
    has room again at the retry: each record is in the file once, whole (the torn line
    glued the retry's first record to it, and the records that had reached the file were
    written twice)."""
    path = tmp_path / "audit.jsonl"
    path.write_bytes(json.dumps(record(-1)).encode() + b"\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    real_sleep = asyncio.sleep

    async def room_again(delay: float) -> None:
        if delay == audit.RETRY_SECONDS[0]:  # the first retry's wait, not the batch's
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        await real_sleep(0)

    monkeypatch.setattr(audit.asyncio, "sleep", room_again)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    log = AuditLog([JsonlFile(path)])
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 300, hard))
        for i in range(10):
            log.submit(record(i))
        await log.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    ids = [json.loads(line)["request_id"] for line in path.read_text().splitlines()]
    assert ids == [f"r{i}" for i in range(-1, 10)] and log.dropped == 0


async def test_a_rotation_that_fails_keeps_the_batch_written_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch was appended; only the rotation after it failed (the directory not
    writable): it was retried, each record written four times and counted lost."""
    path = tmp_path / "audit.jsonl"
    monkeypatch.setattr(audit.os, "replace", mock.Mock(side_effect=PermissionError(13, "denied")))
    monkeypatch.setattr(audit, "RETRY_SECONDS", (0, 0, 0))
    log = AuditLog([JsonlFile(path, max_bytes=100)])
    for i in range(3):
        log.submit(record(i))
    await log.close()
    ids = [json.loads(line)["request_id"] for line in path.read_text().splitlines()]
    assert ids == ["r0", "r1", "r2"] and log.dropped == 0


async def test_file_sink_appends_small_batches_inline_and_big_ones_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of records (every 50 ms) is appended on the event loop; one with recorded
    bodies, over INLINE_WRITE_BYTES, must not stall the loop and goes to a worker thread."""
    path = tmp_path / "audit.jsonl"
    sink = JsonlFile(path)
    threads: list[int] = []
    write = sink._write

    def noting_thread(data: bytes) -> None:
        threads.append(threading.get_ident())
        write(data)

    monkeypatch.setattr(sink, "_write", noting_thread)
    small = [json.dumps(record(i)).encode() + b"\n" for i in range(3)]
    big = [json.dumps({"body": "x" * audit.INLINE_WRITE_BYTES}).encode() + b"\n"]
    await sink.write(small)
    await sink.write(big)
    await sink.write(small)
    assert threads[0] == threads[2] == threading.get_ident() != threads[1]
    lines = path.read_bytes().splitlines(keepends=True)
    assert lines == [*small, *big, *small]


async def test_redis_stream_sink_is_bounded_and_complete() -> None:
    url = os.environ["EXTPROC_TEST_REDIS_URL"]
    stream = f"test-audit-{uuid.uuid4().hex[:8]}"
    log = AuditLog([RedisStream(RedisTarget(url), stream, maxlen=1000)])
    for i in range(5):
        log.submit(record(i))
    await log.close()
    redis = Redis.from_url(url)
    try:
        entries = await redis.xrange(stream)
        assert [json.loads(fields[b"record"])["request_id"] for _, fields in entries] == [
            f"r{i}" for i in range(5)
        ]
    finally:
        await redis.delete(stream)
        await redis.aclose()


async def test_a_full_queue_is_counted_never_waited_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "QUEUE_SIZE", 3)
    drops: list[tuple[str, int]] = []
    log = AuditLog([JsonlFile(tmp_path / "a.jsonl")], on_drop=lambda *drop: drops.append(drop))
    for i in range(5):  # no await in between: the writer task never gets to run
        log.submit(record(i))
    assert log.dropped == 2 and drops == [("queue_full", 1), ("queue_full", 1)]
    await log.close()
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 3


async def test_no_sink_means_no_work() -> None:
    log = AuditLog([])
    log.submit(record(1))
    assert not log.enabled and log.dropped == 0
    await log.close()


class Down:
    """A sink that is down (Redis gone) until ``up`` is set."""

    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.lines: list[bytes] = []
        self.closed = False

    async def write(self, lines: Sequence[bytes]) -> None:
        if not self.up.is_set():
            raise ConnectionError("down")
        self.lines.extend(lines)

    async def close(self) -> None:
        self.closed = True


async def test_a_sink_that_is_down_holds_back_only_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one sink is down the file sink keeps writing, and the down sink, back within
    its retries, writes its whole backlog in order."""
    monkeypatch.setattr(audit, "RETRY_SECONDS", (0.2, 0.2, 0.2))
    down, path = Down(), tmp_path / "a.jsonl"
    log = AuditLog([down, JsonlFile(path)])
    for i in range(3):
        log.submit(record(i))
    for _ in range(100):
        if path.exists() and len(path.read_text().splitlines()) == 3:
            break
        await asyncio.sleep(0.01)
    assert len(path.read_text().splitlines()) == 3  # not held back by the sink that is down
    assert down.lines == []
    down.up.set()
    await log.close()
    assert [json.loads(line)["request_id"] for line in down.lines] == ["r0", "r1", "r2"]
    assert log.dropped == 0


async def test_a_sink_still_down_at_shutdown_loses_its_backlog_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown waits for a failing sink only so long: its backlog is counted as lost, and
    the other sinks have written everything."""
    monkeypatch.setattr(audit, "RETRY_SECONDS", (10.0,))
    drops: list[tuple[str, int]] = []
    down, path = Down(), tmp_path / "a.jsonl"
    log = AuditLog([down, JsonlFile(path)], on_drop=lambda *drop: drops.append(drop))
    for i in range(4):
        log.submit(record(i))
    await asyncio.sleep(0.2)  # the first batch is in its retry wait; later ones queue behind
    log.submit(record(4))
    await asyncio.wait_for(log.close(within=0.3), 5)
    assert down.closed
    assert len(path.read_text().splitlines()) == 5
    # The batch waiting for its next attempt, and the one behind it in the backlog.
    assert drops == [("shutdown", 5)] and log.dropped == 5


async def test_a_record_json_cannot_hold_is_dropped_alone(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog([JsonlFile(path)])
    log.submit(record(1))
    log.submit({"request_id": "r-odd", "cost_micro_usd": 10**30})
    log.submit({"request_id": "r-nan", "value": math.nan})  # written as null by orjson
    log.submit(record(2))
    await log.close()
    ids = [json.loads(line)["request_id"] for line in path.read_text().splitlines()]
    assert ids == ["r1", "r-nan", "r2"] and log.dropped == 1


async def test_a_sinks_backlog_is_bounded_in_bytes_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records with recorded bodies can be megabytes each: ten thousand of them held
    gigabytes while a sink was down. A batch alone is still taken, however large."""
    monkeypatch.setattr(audit, "RETRY_SECONDS", (10.0,))
    monkeypatch.setattr(audit, "SINK_BACKLOG_BYTES", 5_000)
    drops: list[tuple[str, int]] = []
    log = AuditLog([Down()], on_drop=lambda *drop: drops.append(drop))
    big = {"prompt": [{"role": "user", "kind": "message", "text": "x" * 3_000}]}
    log.submit(record(0))  # the batch being written (retried), not in the backlog
    await asyncio.sleep(0.2)
    log.submit({**record(1), **big, "pad": "y" * 4_000})  # alone: taken, past the bound
    await asyncio.sleep(0.2)
    log.submit({**record(2), **big})  # the backlog holds 7 KB: dropped
    await asyncio.sleep(0.2)
    assert drops == [("sink_backlog", 1)]
    await log.close(within=0.1)


async def test_the_recent_records_bodies_are_bounded() -> None:
    observer = Observer(None, AuditLog(()))
    limit = 10_000
    long = [{"role": "user", "kind": "message", "text": "x" * 4_000}]
    with mock.patch.object(observer_module, "RECENT_BODY_CHARS", limit):
        for i in range(5):
            observer.report({**record(i), "prompt": long}, None, 0)
        observer.report(record(5), None, 0)
        assert [r["request_id"] for r in observer.recent] == ["r3", "r4", "r5"]
        observer.report({**record(6), "prompt": [{"text": "x" * 50_000}]}, None, 0)
        assert [r["request_id"] for r in observer.recent] == ["r6"]  # the newest stays


async def test_a_sinks_backlog_is_bounded_in_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However the records fall into batches, a sink that is down holds at most
    SINK_BACKLOG of them; what comes beyond is dropped for it alone, counted."""
    monkeypatch.setattr(audit, "RETRY_SECONDS", (10.0,))
    monkeypatch.setattr(audit, "SINK_BACKLOG", 2)
    drops: list[tuple[str, int]] = []
    down, path = Down(), tmp_path / "a.jsonl"
    log = AuditLog([down, JsonlFile(path)], on_drop=lambda *drop: drops.append(drop))
    log.submit(record(0))  # the batch being written (retried), not in the backlog
    await asyncio.sleep(0.2)
    for i in (1, 2):
        log.submit(record(i))  # one batch of two: the backlog is full
    await asyncio.sleep(0.2)
    log.submit(record(3))  # one more: dropped for the sink that is down
    await asyncio.sleep(0.2)
    assert drops == [("sink_backlog", 1)]
    await log.close(within=0.1)
    assert drops == [("sink_backlog", 1), ("shutdown", 3)]
    assert len(path.read_text().splitlines()) == 4  # the file sink lost nothing


async def test_a_record_after_close_is_dropped_counted(tmp_path: Path) -> None:
    drops: list[tuple[str, int]] = []
    log = AuditLog([JsonlFile(tmp_path / "a.jsonl")], on_drop=lambda *drop: drops.append(drop))
    log.submit(record(1))
    await log.close()
    log.submit(record(2))  # a settlement still running at shutdown
    assert drops == [("closed", 1)]
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 1


def _worker_writing_to_stdout(pipe: int, worker: int) -> None:
    """A forked worker of ``--workers N --audit-stdout``: its stdout is the shared pipe."""
    os.dup2(pipe, 1)

    async def main() -> None:
        log = AuditLog([audit.Stdout()])
        for i in range(2000):
            log.submit({"request_id": f"w{worker}-{i}", "pad": "x" * 400})
            if i % 200 == 0:
                await asyncio.sleep(0)
        await log.close(within=30)

    asyncio.run(main())
    os._exit(0)


def test_forked_workers_never_cut_each_others_lines_on_a_shared_stdout() -> None:
    """Two workers' batches (tens of KiB) written at once into a pipe a collector drains
    slowly came out cut into each other mid-line: a pipe takes a write over 4 KiB in
    pieces."""
    read_end, write_end = os.pipe()
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_worker_writing_to_stdout, args=(write_end, n)) for n in range(2)
    ]
    for worker in workers:
        worker.start()
    os.close(write_end)
    data = bytearray()
    while chunk := os.read(read_end, 4096):  # a collector reading at its own pace
        data += chunk
        time.sleep(0.001)
    os.close(read_end)
    for worker in workers:
        worker.join(10)
    ids = [json.loads(line)["request_id"] for line in data.splitlines()]
    assert sorted(ids) == sorted(f"w{w}-{i}" for w in range(2) for i in range(2000))


@pytest.mark.parametrize(
    "now_ns",
    [
        1_795_844_842_000_000_000,  # on the second
        1_795_844_842_999_600_000,  # late in it: floored, never rounded into the next
        1_704_067_199_999_999_999,  # the last nanosecond of 2023
        1_795_844_843_123_456_789,
    ],
)
def test_a_records_time_is_its_utc_instant_to_the_millisecond(
    monkeypatch: pytest.MonkeyPatch, now_ns: int
) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: now_ns)
    second, nanoseconds = divmod(now_ns, 10**9)
    instant = datetime.fromtimestamp(second, UTC).replace(microsecond=nanoseconds // 1000)
    expected = instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert record_time() == expected
