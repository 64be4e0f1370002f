"""The audit log's queue and sinks: nothing lost, bounded, rotated."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis

from extproc.budgets.redis_store import RedisTarget
from extproc.telemetry import audit
from extproc.telemetry.audit import AuditLog, JsonlFile, RedisStream


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
    drops: list[str] = []
    log = AuditLog([JsonlFile(tmp_path / "a.jsonl")], on_drop=drops.append)
    for i in range(5):  # no await in between: the writer task never gets to run
        log.submit(record(i))
    assert log.dropped == 2 and drops == ["queue_full", "queue_full"]
    await log.close()
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 3


async def test_no_sink_means_no_work() -> None:
    log = AuditLog([])
    log.submit(record(1))
    assert not log.enabled and log.dropped == 0
    await log.close()
