"""accounting: envoy in memory: which answers are handed to Envoy, and how records settle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.json_format import MessageToDict

from extproc.accounting import EXCHANGE_NAMESPACE, HEADER_EXCHANGE, LoggedAnswer
from extproc.adapters.access_log import (
    AUTHZ_NAMESPACE,
    USAGE_NAMESPACE,
    AccessLogReceiver,
    logged_answer,
)
from extproc.adapters.ext_proc import ANSWER_HEADERS_NAMESPACE, ExternalProcessor
from extproc.adapters.record_relay import HEADER_OWNER, RecordRelay
from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.meter import Meter
from extproc.policy.store import PolicyStore
from extproc.stack import ROOT
from extproc.telemetry.audit import AuditLog
from extproc.telemetry.observer import Observer
from tests.unit.fake_envoy import exchange, headers_set, request_body, request_headers

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi a@b.com"}]}


def policy_file(tmp_path: Path, accounting: str = "envoy", output_guard: bool = False) -> Path:
    policy = yaml.safe_load((ROOT / "policies" / "example.yaml").read_text())
    policy["settings"]["accounting"] = accounting
    for rule in policy["guardrails"]:
        if rule["name"] in ("mask-pii", "mask-secrets") and not output_guard:
            rule["stage"] = "input"
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def processor(path: Path) -> ExternalProcessor:
    return ExternalProcessor(PolicyStore(path), Meter(MemoryStore()), Observer(None, AuditLog([])))


async def send(
    proc: ExternalProcessor, key: str, path: str = "/v1/chat/completions", body: object = CHAT
) -> list[pb.ProcessingResponse]:
    headers = {"authorization": f"Bearer {key}", "x-request-id": "req-1"}
    return await exchange(proc, [request_headers(path, headers), request_body(body)])


async def handed(proc: ExternalProcessor, key: str, **kw: Any) -> str:
    """Send a request Envoy will account for; the exchange key Envoy is given for it."""
    responses = await send(proc, key, **kw)
    return str(MessageToDict(responses[1].dynamic_metadata)[EXCHANGE_NAMESPACE]["key"])


def answers_asked(responses: list[pb.ProcessingResponse]) -> bool:
    first = responses[0]
    return first.mode_override.response_header_mode == ProcessingMode.SEND


async def test_an_answer_needed_only_for_accounting_is_handed_to_envoy(tmp_path: Path) -> None:
    proc = processor(policy_file(tmp_path))
    responses = await send(proc, "sk-demo-restricted")
    assert not answers_asked(responses)
    body = responses[1].request_body.response
    assert headers_set(body)["x-gateway-accounting"] == "envoy"
    answer_headers = MessageToDict(responses[1].dynamic_metadata)[ANSWER_HEADERS_NAMESPACE]
    assert answer_headers["x-ratelimit-limit-usd"] == "500"
    assert answer_headers["x-gateway-guardrails"] == "mask-pii=rewritten[EMAIL_ADDRESS]x1"
    assert len(proc.pending) == 1
    assert not proc._observer.recent  # the access-log record will report it


@pytest.mark.parametrize(
    ("accounting", "output_guard", "key"),
    [
        ("service", False, "sk-demo-restricted"),  # the default reads answers itself
        ("envoy", True, "sk-demo-restricted"),  # an output guardrail must see the answer
        ("envoy", False, "sk-demo-admin"),  # may call Claude: a chat answer may be translated
    ],
)
async def test_answers_the_service_must_read_keep_the_response_phases(
    tmp_path: Path, accounting: str, output_guard: bool, key: str
) -> None:
    proc = processor(policy_file(tmp_path, accounting, output_guard))
    responses = await send(proc, key)
    assert answers_asked(responses)
    assert "x-gateway-accounting" not in headers_set(responses[1].request_body.response)
    assert len(proc.pending) == 0


async def test_a_refused_request_is_reported_by_its_stream(tmp_path: Path) -> None:
    proc = processor(policy_file(tmp_path))
    body = {**CHAT, "model": "gpt-4o"}  # not allowed for this key
    responses = await send(proc, "sk-demo-restricted", body=body)
    assert responses[1].immediate_response.status.code == 403
    assert len(proc.pending) == 0
    [record] = proc._observer.recent
    assert record["error"] == "model_not_allowed"


async def test_the_log_record_settles_and_reports_with_the_providers_usage(
    tmp_path: Path,
) -> None:
    proc = processor(policy_file(tmp_path))
    key = await handed(proc, "sk-demo-restricted")
    logged = LoggedAnswer(
        request_id="req-1",
        key=key,
        status=200,
        usage={"prompt_tokens": 1000, "completion_tokens": 3, "cached_tokens": 1000},
        served_by="openai_primary",
        response_bytes=300,
    )
    assert await proc.pending.settle(logged)
    assert not await proc.pending.settle(logged)  # once only
    [record] = proc._observer.recent
    assert (record["input_tokens"], record["output_tokens"]) == (1000, 3)
    # 1,000 cached prompt tokens at $0.075/M and 3 output tokens at $0.60/M, rounded up.
    assert record["cost_micro_usd"] == 77
    assert record["usage_source"] == "provider"
    assert record["served_by"] == "openai_primary" and record["status"] == 200


async def test_anthropic_usage_fields_are_read_as_anthropic_reports_them(tmp_path: Path) -> None:
    proc = processor(policy_file(tmp_path))
    body = {"model": "claude-3-5-haiku", "max_tokens": 20, "messages": CHAT["messages"]}
    key = await handed(proc, "sk-demo-admin", path="/v1/messages", body=body)
    usage = {"input_tokens": 5, "output_tokens": 4, "cache_read_input_tokens": 10}
    await proc.pending.settle(LoggedAnswer("req-1", key, 200, usage, None, 100))
    [record] = proc._observer.recent
    assert (record["input_tokens"], record["output_tokens"]) == (15, 4)


@pytest.mark.parametrize(
    ("status", "sent", "expected_output"),
    [
        (200, 400, 100),  # no usage block: estimated from the bytes of a JSON answer
        (502, 400, 0),  # an error answer used nothing
        (0, 0, 0),  # the client left before any answer: the prompt is still charged
    ],
)
async def test_without_usage_the_answer_is_estimated(
    tmp_path: Path, status: int, sent: int, expected_output: int
) -> None:
    proc = processor(policy_file(tmp_path))
    key = await handed(proc, "sk-demo-restricted")
    await proc.pending.settle(LoggedAnswer("req-1", key, status, {}, None, sent))
    [record] = proc._observer.recent
    assert record["output_tokens"] == expected_output
    assert (record["input_tokens"] > 0) is (status < 300)  # the prompt reached the provider
    assert record["usage_source"] == "estimate"


@pytest.mark.parametrize(
    ("sent", "expected_output"),
    [
        (6400, 100),  # a stream cut before its usage: one token per 64 bytes sent
        (10**9, 4096),  # never more than was reserved (the default output cap)
    ],
)
async def test_a_stream_without_usage_is_estimated_from_the_bytes_sent(
    tmp_path: Path, sent: int, expected_output: int
) -> None:
    proc = processor(policy_file(tmp_path))
    key = await handed(proc, "sk-demo-restricted", body={**CHAT, "stream": True})
    await proc.pending.settle(LoggedAnswer("req-1", key, 200, {}, None, sent))
    [record] = proc._observer.recent
    assert record["output_tokens"] == expected_output
    assert record["usage_source"] == "estimate"


async def test_a_record_that_never_comes_is_settled_as_reserved(tmp_path: Path) -> None:
    proc = processor(policy_file(tmp_path))
    await send(proc, "sk-demo-restricted")
    assert await proc.pending.expire(now=0.0) == 0  # not yet due
    assert await proc.pending.expire(now=float("inf")) == 1
    [record] = proc._observer.recent
    assert record["usage_source"] == "reserved"
    assert record["output_tokens"] == 4096  # the reservation: the default output cap


async def test_shutdown_settles_what_is_still_waiting(tmp_path: Path) -> None:
    proc = processor(policy_file(tmp_path))
    await send(proc, "sk-demo-restricted")
    await proc.pending.drain()
    assert len(proc.pending) == 0
    assert proc._observer.recent[0]["usage_source"] == "reserved"


def log_entry(
    request_id: str, status: int, usage: dict[str, float], key: str | None = None
) -> HTTPAccessLogEntry:
    entry = HTTPAccessLogEntry()
    entry.request.request_id = request_id
    if key is not None:  # from ext_proc's answer (the HTTP authorizer's: its own namespace)
        entry.common_properties.metadata.filter_metadata[EXCHANGE_NAMESPACE].update({"key": key})
    entry.response.response_code.value = status
    entry.response.response_body_bytes = 321
    entry.response.response_headers["x-gateway-served-by"] = "openai_primary"
    if usage:
        entry.common_properties.metadata.filter_metadata[USAGE_NAMESPACE].update(usage)
    return entry


def test_a_log_entry_reads_as_a_logged_answer() -> None:
    usage = {"prompt_tokens": 7.0, "completion_tokens": 3.0}
    logged = logged_answer(log_entry("r1", 200, usage, key="k1"))
    assert logged == LoggedAnswer(
        "r1", "k1", 200, {"prompt_tokens": 7, "completion_tokens": 3}, "openai_primary", 321
    )
    assert logged_answer(HTTPAccessLogEntry()) is None  # no request id: not one of ours
    entry = log_entry("r2", 200, {})
    entry.common_properties.metadata.filter_metadata[AUTHZ_NAMESPACE].update(
        {HEADER_EXCHANGE: "k2", HEADER_OWNER: "1"}
    )
    from_authorizer = logged_answer(entry)
    assert from_authorizer is not None
    assert (from_authorizer.key, from_authorizer.owner) == ("k2", 1)


async def test_a_caller_reusing_a_request_id_cannot_settle_another_exchange(
    tmp_path: Path,
) -> None:
    """Callers choose x-request-id: two exchanges waiting under one id stay apart."""
    proc = processor(policy_file(tmp_path))
    first = await handed(proc, "sk-demo-restricted")
    second = await handed(proc, "sk-demo-restricted", body={**CHAT, "max_tokens": 900})
    assert first != second and len(proc.pending) == 2
    usage = {"prompt_tokens": 4, "completion_tokens": 1}
    # A record without the key (or another exchange's) settles nothing.
    assert not await proc.pending.settle(LoggedAnswer("req-1", None, 200, usage, None, 9))
    assert await proc.pending.settle(LoggedAnswer("req-1", second, 200, usage, None, 9))
    [record] = proc._observer.recent
    assert record["output_tokens"] == 1 and len(proc.pending) == 1


async def test_log_streams_settle_each_record_and_end_when_closed(tmp_path: Path) -> None:
    proc = processor(policy_file(tmp_path))
    key = await handed(proc, "sk-demo-restricted")
    receiver = AccessLogReceiver(proc.pending)
    delivered = asyncio.Event()

    async def envoy() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        message = als_pb2.StreamAccessLogsMessage()
        entry = log_entry("req-1", 200, {"prompt_tokens": 4.0}, key=key)
        message.http_logs.log_entry.append(entry)
        yield message
        delivered.set()
        await asyncio.Event().wait()  # Envoy keeps its log stream open for good

    stream = asyncio.create_task(receiver.StreamAccessLogs(envoy(), None))
    await delivered.wait()
    await asyncio.sleep(0)
    assert len(proc.pending) == 0 and len(proc._observer.recent) == 1
    receiver.close()  # shutdown: the stream ends instead of holding the server open
    assert isinstance(await asyncio.wait_for(stream, 5), als_pb2.StreamAccessLogsResponse)


async def test_a_stream_that_ends_before_its_body_is_reported_by_the_stream(
    tmp_path: Path,
) -> None:
    """Marked for Envoy at the headers, but never handed over: the stream still reports it."""
    proc = processor(policy_file(tmp_path))
    headers = {"authorization": "Bearer sk-demo-restricted", "x-request-id": "req-1"}
    responses = await exchange(proc, [request_headers("/v1/chat/completions", headers)])
    assert not answers_asked(responses)  # the headers answer did hand the answer to Envoy
    assert len(proc.pending) == 0
    assert len(proc._observer.recent) == 1


async def test_a_record_reaching_the_wrong_worker_is_passed_to_its_owner(tmp_path: Path) -> None:
    """--workers 2: worker 0 holds the exchange, worker 1 gets Envoy's log stream."""
    owner, other = processor(policy_file(tmp_path)), processor(policy_file(tmp_path))
    key = await handed(owner, "sk-demo-restricted")
    assert len(owner.pending) == 1
    receivers: dict[int, AccessLogReceiver] = {}
    relays = [
        RecordRelay(tmp_path, index, lambda answers, i=index: receivers[i].settle(answers))
        for index in (0, 1)
    ]
    receivers[0] = AccessLogReceiver(owner.pending, relays[0])
    receivers[1] = AccessLogReceiver(other.pending, relays[1])
    for relay in relays:
        await relay.start()
    entry = log_entry("req-1", 200, {"prompt_tokens": 4.0, "completion_tokens": 2.0})
    entry.common_properties.metadata.filter_metadata[AUTHZ_NAMESPACE].update(
        {HEADER_OWNER: "0", HEADER_EXCHANGE: key}
    )
    assert logged_answer(entry) is not None and logged_answer(entry).owner == 0
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.append(entry)
    await receivers[1]._settle(message)
    for _ in range(100):
        if not owner.pending:
            break
        await asyncio.sleep(0.01)
    assert len(owner.pending) == 0, "the owner settled it"
    [record] = owner._observer.recent
    assert record["output_tokens"] == 2 and record["usage_source"] == "provider"
    assert not other._observer.recent
    # A worker that is gone: the record is let go, with a warning, not an error.
    await relays[1].forward(7, [logged_answer(entry)])  # type: ignore[list-item]
    for relay in relays:
        await relay.close()
