"""accounting: envoy in memory: which answers are handed to Envoy, and how records settle
from the tickets they carry."""

from __future__ import annotations

import asyncio
import base64
import functools
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.json_format import MessageToDict

from extproc import ticket as ticket_module
from extproc.accounting import EXCHANGE_NAMESPACE, HEADER_TICKET, Accountant, LoggedAnswer
from extproc.adapters import access_log
from extproc.adapters.access_log import (
    AUTHZ_NAMESPACE,
    USAGE_NAMESPACE,
    AccessLogReceiver,
    logged_answer,
)
from extproc.adapters.ext_proc import ANSWER_HEADERS_NAMESPACE, ExternalProcessor
from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.meter import Meter
from extproc.budgets.redis_store import RedisTarget
from extproc.budgets.store import BudgetStore
from extproc.budgets.tokens import count_prompt_tokens
from extproc.policy.store import PolicyStore
from extproc.server import follow_ticket_key
from extproc.stack import ROOT
from extproc.telemetry.audit import AuditLog
from extproc.telemetry.observer import Observer
from extproc.ticket import (
    LIFETIME_SECONDS,
    InvalidTicket,
    TicketSigner,
    shared_key,
    signing_key,
)
from tests.redis_server import free_port
from tests.unit.fake_envoy import exchange, headers_set, request_body, request_headers

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi a@b.com"}]}


def policy_file(
    tmp_path: Path,
    accounting: str = "envoy",
    output_guard: bool = False,
    exact_counts: bool = False,
) -> Path:
    """The example policy under ``accounting``; ``exact_counts``: every model counts its
    prompt exactly (Claude's tokenizer is an estimate there)."""
    policy = yaml.safe_load((ROOT / "policies" / "example.yaml").read_text())
    policy["settings"]["accounting"] = accounting
    if exact_counts:
        for model in policy["models"].values():
            if model.get("tokenizer") == "estimate":
                model["tokenizer"] = "o200k"
    for rule in policy["guardrails"]:
        if rule["name"] in ("mask-pii", "mask-secrets") and not output_guard:
            rule["stage"] = "input"
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


KEY = signing_key("shared by the service's processes")


def processor(
    path: Path,
    store: BudgetStore | None = None,
    key: bytes = KEY,
    refresh: Callable[[], bytes | None] | None = None,
) -> ExternalProcessor:
    return ExternalProcessor(
        PolicyStore(path),
        Meter(store if store is not None else MemoryStore()),
        Observer(None, AuditLog([])),
        tickets=TicketSigner(key, refresh),
    )


def accountant(proc: ExternalProcessor) -> Accountant:
    """What settles the access-log records of ``proc``'s process (as server.py builds it)."""
    return Accountant(proc._meter, proc._observer, proc._tickets)


def ticket_of(responses: list[pb.ProcessingResponse]) -> str | None:
    metadata = MessageToDict(responses[1].dynamic_metadata).get(EXCHANGE_NAMESPACE)
    return None if metadata is None else str(metadata["ticket"])


async def send(
    proc: ExternalProcessor, key: str, path: str = "/v1/chat/completions", body: object = CHAT
) -> list[pb.ProcessingResponse]:
    headers = {"authorization": f"Bearer {key}", "x-request-id": "req-1"}
    return await exchange(proc, [request_headers(path, headers), request_body(body)])


async def handed(proc: ExternalProcessor, key: str, **kw: Any) -> str:
    """Send a request Envoy will account for; the ticket Envoy is given for it."""
    ticket = ticket_of(await send(proc, key, **kw))
    assert ticket is not None
    return ticket


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
    assert ticket_of(responses) is not None
    assert not proc._observer.recent  # the access-log record will report it


@pytest.mark.parametrize(("status", "charged"), [(200, True), (0, True), (429, False)])
async def test_an_embeddings_answer_is_accounted_from_the_counted_prompt(
    tmp_path: Path, status: int, charged: bool
) -> None:
    """Never read, even with output guardrails on (it holds no text): Envoy lifts nothing
    from it, so a batch's answer may pass the 8 MiB it would otherwise be held to."""
    proc = processor(policy_file(tmp_path, output_guard=True, exact_counts=True))
    body = {"model": "text-embedding-3-small", "input": ["one two three", "four five"]}
    responses = await send(proc, "sk-demo-admin", path="/v1/embeddings", body=body)
    assert not answers_asked(responses)
    ticket = ticket_of(responses)
    assert ticket is not None
    counted = count_prompt_tokens("cl100k", ["one two three", "four five"], 0)
    # Envoy lifts no usage; the answer's bytes would say nothing of its prompt either.
    logged = LoggedAnswer("req-1", ticket, status, {}, None, 5_000_000)
    assert await accountant(proc).settle(logged)
    [record] = proc._observer.recent
    assert record["usage_source"] == "counted"
    assert (record["input_tokens"], record["output_tokens"]) == (counted if charged else 0, 0)


async def test_an_embeddings_answer_is_read_when_the_callers_models_may_only_estimate(
    tmp_path: Path,
) -> None:
    """Decided at the request headers, before the model is known: a caller who may use a
    model that only estimates its prompt (Claude here) has the provider's count read."""
    proc = processor(policy_file(tmp_path))
    body = {"model": "text-embedding-3-small", "input": ["one two three"]}
    responses = await send(proc, "sk-demo-admin", path="/v1/embeddings", body=body)
    assert answers_asked(responses)
    assert ticket_of(responses) is None


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
    assert ticket_of(responses) is None


async def test_a_policy_recording_bodies_reads_every_answer(tmp_path: Path) -> None:
    """The audit record then holds the answer's text, which Envoy's log does not carry."""
    path = policy_file(tmp_path)
    policy = yaml.safe_load(path.read_text())
    policy["settings"].setdefault("audit", {})["record_bodies"] = True
    path.write_text(yaml.safe_dump(policy))
    responses = await send(processor(path), "sk-demo-restricted")
    assert answers_asked(responses) and ticket_of(responses) is None


async def test_a_refused_request_is_reported_by_its_stream(tmp_path: Path) -> None:
    proc = processor(policy_file(tmp_path))
    body = {**CHAT, "model": "gpt-4o"}  # not allowed for this key
    responses = await send(proc, "sk-demo-restricted", body=body)
    assert responses[1].immediate_response.status.code == 403
    [record] = proc._observer.recent
    assert record["error"] == "model_not_allowed"


async def settled_record(tmp_path: Path, usage: dict[str, int]) -> dict[str, Any]:
    """The audit record of one OpenAI chat answer settled from ``usage`` as Envoy lifts it
    (flat fields) and reports it with the exchange's ticket."""
    proc = processor(policy_file(tmp_path))
    ticket = await handed(proc, "sk-demo-restricted")
    logged = LoggedAnswer(
        request_id="req-1",
        ticket=ticket,
        status=200,
        usage=usage,
        served_by="openai_primary",
        response_bytes=300,
    )
    assert await accountant(proc).settle(logged)
    [record] = proc._observer.recent
    return record


async def test_lifted_usage_with_a_total_but_no_output_count_charges_the_output(
    tmp_path: Path,
) -> None:
    """An answer reporting the prompt and the total only (some OpenAI-compatible servers)
    was settled with no output at all."""
    record = await settled_record(tmp_path, {"prompt_tokens": 10, "total_tokens": 510})
    assert (record["input_tokens"], record["output_tokens"]) == (10, 500)


async def test_the_log_record_settles_and_reports_with_the_providers_usage(
    tmp_path: Path,
) -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 3, "cached_tokens": 1000}
    record = await settled_record(tmp_path, usage)
    assert (record["input_tokens"], record["output_tokens"]) == (1000, 3)
    # 1,000 cached prompt tokens at $0.075/M and 3 output tokens at $0.60/M, rounded up.
    assert record["cost_micro_usd"] == 77
    assert record["usage_source"] == "provider"
    assert record["served_by"] == "openai_primary" and record["status"] == 200


async def test_openai_cache_writes_are_charged_at_their_price_beside_cache_reads(
    tmp_path: Path,
) -> None:
    """OpenAI reports both in ``prompt_tokens_details``; Envoy lifts them flat and both go
    back under it (the second nested field replaced the first)."""
    path = policy_file(tmp_path)
    policy = yaml.safe_load(path.read_text())
    policy["models"]["gpt-4o-mini"]["pricing"]["cache_write"] = 0.30
    path.write_text(yaml.safe_dump(policy))
    proc = processor(path)
    ticket = await handed(proc, "sk-demo-restricted")
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 3,
        "cached_tokens": 500,
        "cache_write_tokens": 500,
    }
    await accountant(proc).settle(LoggedAnswer("req-1", ticket, 200, usage, None, 300))
    [record] = proc._observer.recent
    # 500 x 0.075 (read) + 500 x 0.30 (written) + 3 x 0.60 = 189.3, rounded up.
    assert record["cost_micro_usd"] == 190


async def test_anthropic_usage_fields_are_read_as_anthropic_reports_them(tmp_path: Path) -> None:
    proc = processor(policy_file(tmp_path))
    body = {"model": "claude-3-5-haiku", "max_tokens": 20, "messages": CHAT["messages"]}
    ticket = await handed(proc, "sk-demo-admin", path="/v1/messages", body=body)
    usage = {
        "input_tokens": 5,
        "output_tokens": 4,
        "cache_read_input_tokens": 10,
        "cache_creation_input_tokens": 7,
    }
    await accountant(proc).settle(LoggedAnswer("req-1", ticket, 200, usage, None, 100))
    [record] = proc._observer.recent
    # Cache reads and writes are prompt tokens Anthropic counts apart: both are charged,
    # each at its price: 5 x 0.80 + 10 x 0.08 + 7 x 1.00 (cache_write) + 4 x 4.00 = 27.8.
    assert (record["input_tokens"], record["output_tokens"]) == (22, 4)
    assert record["cost_micro_usd"] == 28
    # The ticket carries the cache-write price apart from "price", which processes of an
    # earlier version read as three numbers.
    payload = orjson.loads(base64.urlsafe_b64decode(ticket.split(".")[1]))
    assert len(payload["price"]) == 3 and payload["cache_write"] == 1_000_000
    # A 1-hour write, lifted flat by Envoy, at twice the input price: 3 of the 7 above.
    usage = {**usage, "ephemeral_1h_input_tokens": 3}
    ticket = await handed(proc, "sk-demo-admin", path="/v1/messages", body=body)
    await accountant(proc).settle(LoggedAnswer("req-2", ticket, 200, usage, None, 100))
    # 5 x 0.80 + 10 x 0.08 + 4 x 1.00 + 3 x 1.60 + 4 x 4.00 = 29.6
    assert proc._observer.recent[-1]["cost_micro_usd"] == 30


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
    ticket = await handed(proc, "sk-demo-restricted")
    await accountant(proc).settle(LoggedAnswer("req-1", ticket, status, {}, None, sent))
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
    ticket = await handed(proc, "sk-demo-restricted", body={**CHAT, "stream": True})
    await accountant(proc).settle(LoggedAnswer("req-1", ticket, 200, {}, None, sent))
    [record] = proc._observer.recent
    assert record["output_tokens"] == expected_output
    assert record["usage_source"] == "estimate"


async def test_an_anthropic_stream_cut_before_its_output_count_is_estimated(
    tmp_path: Path,
) -> None:
    """Envoy lifted message_start's prompt count, and the stream was cut before the
    message_delta that counts the output: estimated from the bytes sent, not charged as
    a provider report of no output."""
    proc = processor(policy_file(tmp_path))
    body = {"model": "claude-3-5-haiku", "max_tokens": 500, "messages": CHAT["messages"]}
    ticket = await handed(proc, "sk-demo-admin", path="/v1/messages", body={**body, "stream": True})
    lifted = {"input_tokens": 25, "cache_read_input_tokens": 5}
    await accountant(proc).settle(LoggedAnswer("req-1", ticket, 200, lifted, None, 6400))
    [record] = proc._observer.recent
    assert record["usage_source"] == "estimate"
    assert record["output_tokens"] == 100  # 6,400 bytes at 64 a token


def log_entry(
    request_id: str, status: int, usage: dict[str, float], ticket: str | None = None
) -> HTTPAccessLogEntry:
    entry = HTTPAccessLogEntry()
    entry.request.request_id = request_id
    if ticket is not None:  # from ext_proc's answer (the HTTP authorizer's: its own namespace)
        metadata = entry.common_properties.metadata.filter_metadata
        metadata[EXCHANGE_NAMESPACE].update({"ticket": ticket})
    entry.response.response_code.value = status
    entry.response.response_body_bytes = 321
    entry.response.response_headers["x-gateway-served-by"] = "openai_primary"
    if usage:
        entry.common_properties.metadata.filter_metadata[USAGE_NAMESPACE].update(usage)
    return entry


def test_a_log_entry_reads_as_a_logged_answer() -> None:
    usage = {"prompt_tokens": 7.0, "completion_tokens": 3.0}
    logged = logged_answer(log_entry("r1", 200, usage, ticket="t1.a.b"))
    assert logged == LoggedAnswer(
        "r1", "t1.a.b", 200, {"prompt_tokens": 7, "completion_tokens": 3}, "openai_primary", 321
    )
    assert logged_answer(HTTPAccessLogEntry()) is None  # no request id: not one of ours
    entry = log_entry("r2", 200, {})
    entry.common_properties.metadata.filter_metadata[AUTHZ_NAMESPACE].update(
        {HEADER_TICKET: "t1.c.d"}
    )
    from_authorizer = logged_answer(entry)
    assert from_authorizer is not None and from_authorizer.ticket == "t1.c.d"
    # Not finite: not a count (the rest of the record, and of its batch, still reads).
    odd = logged_answer(log_entry("r3", 200, {"prompt_tokens": 7.0, "completion_tokens": math.inf}))
    assert odd is not None and odd.usage == {"prompt_tokens": 7}
    nan = logged_answer(log_entry("r4", 200, {"completion_tokens": math.nan}))
    assert nan is not None and nan.usage == {}


async def test_a_usage_report_past_belief_is_charged_as_an_estimate(tmp_path: Path) -> None:
    """A broken upstream's 10**19 tokens would overflow Redis's counters: it is not
    believed, the answer is estimated, and its audit record is written."""
    proc = processor(policy_file(tmp_path))
    ticket = await handed(proc, "sk-demo-restricted")
    usage = {"prompt_tokens": 9, "completion_tokens": 1e19}
    logged = logged_answer(log_entry("req-1", 200, usage, ticket=ticket))
    assert logged is not None
    await accountant(proc).settle(logged)
    [record] = proc._observer.recent
    assert record["usage_source"] == "estimate"
    assert record["output_tokens"] < 1000


async def test_an_answer_envoy_dropped_past_its_buffer_is_charged_from_its_bytes(
    tmp_path: Path,
) -> None:
    """Envoy's local reply (502, ``response_payload_too_large``) replaced a provider's 2xx
    answer it held whole to lift its usage: nothing was lifted, but the provider billed
    it. Charged its prompt and, from the bytes the provider sent, the reserved output;
    the record names the error (not a 502 that cost nothing)."""
    proc = processor(policy_file(tmp_path))
    ticket = await handed(proc, "sk-demo-restricted")
    entry = log_entry("req-1", 502, {}, ticket=ticket)
    entry.response.response_code_details = "response_payload_too_large"
    entry.common_properties.upstream_wire_bytes_received = 9 * 1024 * 1024
    logged = logged_answer(entry)
    assert logged is not None and logged.too_large
    assert logged.response_bytes == 9 * 1024 * 1024  # the provider's, not the 502's 321
    await accountant(proc).settle(logged)
    [record] = proc._observer.recent
    assert record["status"] == 502 and record["error"] == "upstream_answer_too_large"
    assert record["input_tokens"] > 0 and record["output_tokens"] == 4096  # the reserved cap
    assert record["usage_source"] == "estimate"


async def test_two_exchanges_under_one_request_id_settle_apart(tmp_path: Path) -> None:
    """Callers choose x-request-id: each record settles the reservation its ticket names,
    and the second is not taken for a repeat of the first."""
    store = MemoryStore()
    proc = processor(policy_file(tmp_path), store)
    first = await handed(proc, "sk-demo-restricted")  # both sent as x-request-id req-1
    second = await handed(proc, "sk-demo-restricted", body={**CHAT, "max_tokens": 900})
    usage = {"prompt_tokens": 1000, "completion_tokens": 3, "cached_tokens": 1000}
    # A record without a ticket settles nothing.
    assert not await accountant(proc).settle(LoggedAnswer("req-1", None, 200, usage, None, 9))
    for ticket in (first, second):
        assert await accountant(proc).settle(LoggedAnswer("req-1", ticket, 200, usage, None, 9))
    assert [r["cost_micro_usd"] for r in proc._observer.recent] == [77, 77]
    # The global daily USD counter holds both exchanges' cost, not a reservation.
    [(value, _)] = store._entries.values()
    assert value == 2 * 77


async def test_log_streams_settle_each_record_and_end_when_closed(tmp_path: Path) -> None:
    proc = processor(policy_file(tmp_path))
    ticket = await handed(proc, "sk-demo-restricted")
    receiver = AccessLogReceiver(accountant(proc))
    delivered = asyncio.Event()

    async def envoy() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        message = als_pb2.StreamAccessLogsMessage()
        entry = log_entry("req-1", 200, {"prompt_tokens": 4.0}, ticket=ticket)
        message.http_logs.log_entry.append(entry)
        yield message
        delivered.set()
        await asyncio.Event().wait()  # Envoy keeps its log stream open for good

    stream = asyncio.create_task(receiver.StreamAccessLogs(envoy(), None))
    await delivered.wait()
    await asyncio.sleep(0)
    assert len(proc._observer.recent) == 1
    receiver.close()  # shutdown: the stream ends instead of holding the server open
    assert isinstance(await asyncio.wait_for(stream, 5), als_pb2.StreamAccessLogsResponse)


async def test_records_envoy_sent_before_shutdown_are_settled_not_dropped(
    tmp_path: Path,
) -> None:
    """Shutdown ends the log streams, but a record Envoy had sent already (waiting in
    gRPC's buffers, never sent again) is still read and settled first."""
    proc = processor(policy_file(tmp_path))
    tickets = [await handed(proc, "sk-demo-restricted") for _ in range(2)]
    receiver = AccessLogReceiver(accountant(proc))
    first_read, closed = asyncio.Event(), asyncio.Event()

    def batch(i: int) -> als_pb2.StreamAccessLogsMessage:
        message = als_pb2.StreamAccessLogsMessage()
        entry = log_entry(f"req-{i}", 200, {"prompt_tokens": 4.0}, ticket=tickets[i])
        message.http_logs.log_entry.append(entry)
        return message

    async def envoy() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        yield batch(0)
        first_read.set()
        await closed.wait()
        yield batch(1)  # sent as the service began to stop
        await asyncio.Event().wait()

    stream = asyncio.create_task(receiver.StreamAccessLogs(envoy(), None))
    await first_read.wait()
    receiver.close()
    await asyncio.sleep(0.05)  # the stream has seen the close by now
    closed.set()
    await asyncio.wait_for(stream, 5)  # then ends: quiet for DRAIN_QUIET_SECONDS
    assert len(proc._observer.recent) == 2


async def test_a_busy_stream_still_ends_within_its_drain_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Envoy keeps sending (other exchanges end meanwhile): the stream ends anyway once
    DRAIN_SECONDS have passed since the close, having settled what it read."""
    monkeypatch.setattr(access_log, "DRAIN_SECONDS", 0.3)
    proc = processor(policy_file(tmp_path))
    receiver = AccessLogReceiver(accountant(proc))
    sent = 0

    async def envoy() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        nonlocal sent
        while True:
            sent += 1
            yield als_pb2.StreamAccessLogsMessage()
            await asyncio.sleep(0.01)  # never quiet for DRAIN_QUIET_SECONDS

    stream = asyncio.create_task(receiver.StreamAccessLogs(envoy(), None))
    await asyncio.sleep(0.05)
    receiver.close()
    closed_at = asyncio.get_running_loop().time()
    await asyncio.wait_for(stream, 5)
    assert 0.3 <= asyncio.get_running_loop().time() - closed_at < 1.0
    assert sent > 20  # it kept reading while it drained


async def test_a_stream_ends_only_once_every_batch_it_read_is_settled(tmp_path: Path) -> None:
    """Batches are settled several at a time; a stream that ends (Envoy closing it) still
    returns only after the last of them is settled, so shutdown loses none."""
    proc = processor(policy_file(tmp_path))
    tickets = [await handed(proc, "sk-demo-restricted") for _ in range(10)]
    receiver = AccessLogReceiver(accountant(proc))
    settle = receiver.settle

    async def slow_settle(logged: Sequence[LoggedAnswer]) -> None:
        await asyncio.sleep(0.05)  # a Redis round trip on a busy machine
        await settle(logged)

    receiver.settle = slow_settle  # type: ignore[method-assign]

    async def envoy() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        for i, ticket in enumerate(tickets):
            message = als_pb2.StreamAccessLogsMessage()
            entry = log_entry(f"req-{i}", 200, {"prompt_tokens": 4.0}, ticket=ticket)
            message.http_logs.log_entry.append(entry)
            yield message

    await asyncio.wait_for(receiver.StreamAccessLogs(envoy(), None), 5)
    assert len(proc._observer.recent) == len(tickets)


async def test_a_stream_that_ends_before_its_body_is_reported_by_the_stream(
    tmp_path: Path,
) -> None:
    """Marked for Envoy at the headers, but never handed over: the stream still reports it."""
    proc = processor(policy_file(tmp_path))
    headers = {"authorization": "Bearer sk-demo-restricted", "x-request-id": "req-1"}
    responses = await exchange(proc, [request_headers("/v1/chat/completions", headers)])
    assert not answers_asked(responses)  # the headers answer did hand the answer to Envoy
    assert len(proc._observer.recent) == 1


async def test_another_process_of_the_service_settles_the_record_exactly(
    tmp_path: Path,
) -> None:
    """--workers or replicas: the process Envoy's log stream reaches never saw the request,
    yet its ticket settles the shared budget as the deciding process would have."""
    store = MemoryStore()  # stands in for the Redis the processes share
    deciding, other = (
        processor(policy_file(tmp_path), store),
        processor(policy_file(tmp_path), store),
    )
    ticket = await handed(deciding, "sk-demo-restricted")
    [(counter, (reserved, _))] = store._entries.items()  # the global daily USD limit
    usage = {"prompt_tokens": 1000, "completion_tokens": 3, "cached_tokens": 1000}
    assert await accountant(other).settle(LoggedAnswer("req-1", ticket, 200, usage, None, 9))
    assert not deciding._observer.recent
    [record] = other._observer.recent
    assert record["team"] == "apps" and record["model"] == "gpt-4o-mini"
    assert record["cost_micro_usd"] == 77 and record["usage_source"] == "provider"
    # The counter now holds what was used instead of what was reserved.
    assert reserved > 77 and store._entries[counter][0] == 77


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # signature changed
        lambda t: t.replace("t1.", "t1.e30", 1),  # payload changed
        lambda t: "t9" + t[2:],  # a version this service does not know
        lambda t: t + "é",  # not even ASCII
        lambda t: "t1.%%%." + t.rpartition(".")[2],  # not base64 (and not signed)
    ],
)
async def test_a_forged_or_foreign_ticket_settles_nothing(
    tmp_path: Path, tamper: Callable[[str], str]
) -> None:
    """The access-log port is the gRPC port: a forged record must not give budget back."""
    proc = processor(policy_file(tmp_path))
    ticket = await handed(proc, "sk-demo-restricted")
    usage = {"prompt_tokens": 1, "completion_tokens": 0}
    assert not await accountant(proc).settle(LoggedAnswer("r", tamper(ticket), 200, usage, None, 0))
    # Signed with another service's key (replicas without one EXTPROC_TICKET_KEY).
    stranger = processor(policy_file(tmp_path), key=signing_key("another service"))
    assert not await accountant(stranger).settle(LoggedAnswer("r", ticket, 200, usage, None, 0))
    assert not proc._observer.recent and not stranger._observer.recent


async def test_a_ticket_older_than_the_stores_memory_of_settlements_is_refused(
    tmp_path: Path,
) -> None:
    """A replay a day later could otherwise settle the same reservation a second time."""
    proc = processor(policy_file(tmp_path))
    ticket = proc._tickets.read(await handed(proc, "sk-demo-restricted"))
    text = await handed(proc, "sk-demo-restricted")
    day_later = ticket.started_ns + (LIFETIME_SECONDS + 60) * 10**9
    with pytest.raises(InvalidTicket, match="expired"):
        proc._tickets.read(text, now_ns=day_later)


async def test_the_process_that_issued_a_ticket_reads_what_any_other_process_would(
    tmp_path: Path,
) -> None:
    """It keeps the tickets it signed and hands them back without decoding them: what it
    settles from must be exactly what the text carries (here a reservation, its alert
    watches and a guardrail's verdict)."""
    proc = processor(policy_file(tmp_path))
    text = await handed(proc, "sk-demo-restricted")
    carried = processor(policy_file(tmp_path))._tickets.read(text)  # another process
    assert carried.settlement is not None and carried.record["guardrails"]
    assert proc._tickets.read(text) == carried
    # Handed back once: a second report of the exchange reads its text.
    assert not proc._tickets._kept
    assert proc._tickets.read(text) == carried


async def test_a_process_keeps_only_its_most_recent_tickets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tickets whose answers go to other processes (or never come) are not kept for ever;
    an older one is still read, from its text."""
    monkeypatch.setattr(ticket_module, "KEPT_TICKETS", 2)
    proc = processor(policy_file(tmp_path))
    texts = [await handed(proc, "sk-demo-restricted") for _ in range(3)]
    assert list(proc._tickets._kept) == texts[1:]
    assert proc._tickets.read(texts[0]).record["request_id"] == "req-1"


async def test_a_process_fetches_the_shared_key_again_for_a_ticket_it_cannot_read(
    tmp_path: Path,
) -> None:
    """Redis lost the key kept there: processes started since then sign with a new one."""
    old, new = signing_key("kept before Redis restarted"), signing_key("made after")
    path = policy_file(tmp_path)
    fetched: list[bytes] = []

    def fetch() -> bytes:
        fetched.append(new)
        return new

    running = processor(path, key=old, refresh=fetch)
    started_later = processor(path, key=new)
    usage = {"prompt_tokens": 4, "completion_tokens": 1}
    earlier = await handed(running, "sk-demo-restricted")  # signed with the old key
    ticket = await handed(started_later, "sk-demo-restricted")
    assert await accountant(running).settle(LoggedAnswer("r1", ticket, 200, usage, None, 9))
    assert fetched == [new]
    # Its own earlier tickets still settle, and it now signs with the new key.
    assert await accountant(running).settle(LoggedAnswer("r2", earlier, 200, usage, None, 9))
    started_later._tickets.read(await handed(running, "sk-demo-restricted"))
    # A forged ticket does not have it fetch again at once.
    forged = ticket[:-4] + ("AAAA" if not ticket.endswith("AAAA") else "BBBB")
    assert not await accountant(running).settle(LoggedAnswer("r3", forged, 200, usage, None, 9))
    assert fetched == [new]
    assert len(running._observer.recent) == 2


async def test_records_of_one_batch_signed_with_a_new_key_all_settle(tmp_path: Path) -> None:
    """Redis lost the key kept there: the records of one access-log batch, signed with the
    new one, each meet an unknown signature together, and wait for the one fetch under
    way. (Answered at once that nothing new came, all but the first were dropped: neither
    settled nor audited.)"""
    old, new = signing_key("kept before Redis restarted"), signing_key("made after")
    path = policy_file(tmp_path)
    fetched: list[bytes] = []

    def fetch() -> bytes:
        time.sleep(0.05)  # a round trip to Redis, in a thread
        fetched.append(new)
        return new

    running = processor(path, key=old, refresh=fetch)
    started_later = processor(path, key=new)
    tickets = [await handed(started_later, "sk-demo-restricted") for _ in range(5)]
    usage = {"prompt_tokens": 4, "completion_tokens": 1}
    batch = [LoggedAnswer(f"r{i}", t, 200, usage, None, 9) for i, t in enumerate(tickets)]
    settling = accountant(running)
    assert await asyncio.gather(*(settling.settle(logged) for logged in batch)) == [True] * 5
    assert fetched == [new]
    assert len(running._observer.recent) == 5


async def test_a_record_met_while_the_shared_key_cannot_be_fetched_is_not_settled(
    tmp_path: Path,
) -> None:
    """A Redis Cluster that does not answer: the record is refused (logged) as one signed
    with a key no one can tell, not an error out of the access log's batch."""
    path = policy_file(tmp_path)
    down = RedisTarget(f"redis://127.0.0.1:{free_port()}/0", cluster=True)
    running = processor(path, key=signing_key("own"), refresh=functools.partial(shared_key, down))
    ticket = await handed(processor(path, key=signing_key("shared")), "sk-demo-restricted")
    usage = {"prompt_tokens": 4, "completion_tokens": 1}
    assert not await accountant(running).settle(LoggedAnswer("r", ticket, 200, usage, None, 9))


async def test_a_fetch_of_the_shared_key_that_fails_is_logged_and_refuses_the_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only Redis errors: whatever the fetch raises ends as "no new key" for every
    record waiting on it, not as an error out of the access log's batch (and the shared
    fetch holds no error that nobody might read); the cause is in the log."""
    path = policy_file(tmp_path)

    def fetch() -> bytes:
        raise RuntimeError("the client library broke")

    running = processor(path, key=signing_key("own"), refresh=fetch)
    ticket = await handed(processor(path, key=signing_key("shared")), "sk-demo-restricted")
    usage = {"prompt_tokens": 4, "completion_tokens": 1}
    assert not await accountant(running).settle(LoggedAnswer("r", ticket, 200, usage, None, 9))
    assert "fetching the ticket key from Redis failed" in caplog.text
    assert "the client library broke" in caplog.text
    assert "access-log record for request r not settled" in caplog.text


async def test_a_process_follows_the_shared_key_without_meeting_a_ticket(
    tmp_path: Path,
) -> None:
    """One that only decides requests (its log stream goes elsewhere) and started with a
    key of its own while Redis was down comes to sign with the shared key."""
    shared = signing_key("kept in Redis")
    deciding = processor(policy_file(tmp_path), key=signing_key("own"), refresh=lambda: shared)
    following = asyncio.create_task(follow_ticket_key(deciding._tickets, every=0.01))
    try:
        await asyncio.sleep(0.2)
    finally:
        following.cancel()
    ticket = await handed(deciding, "sk-demo-restricted")
    TicketSigner(shared).read(ticket)  # the replicas using the shared key can read it


async def test_a_stream_cut_as_envoy_takes_the_answer_is_reported_once(tmp_path: Path) -> None:
    """Envoy drops the stream right after taking the ticket: the stream, not knowing it was
    taken, settles and reports the exchange itself, and the access-log record does too.
    Whichever settles second finds the reservation's token used and writes nothing."""
    headers = {"authorization": "Bearer sk-demo-restricted", "x-request-id": "req-1"}
    for log_first in (True, False):
        proc = processor(policy_file(tmp_path))

        async def envoy() -> AsyncIterator[pb.ProcessingRequest]:
            yield request_headers("/v1/chat/completions", headers)
            yield request_body(CHAT)

        stream = proc.Process(envoy(), None)
        responses = [await anext(stream), await anext(stream)]
        ticket = ticket_of(responses)
        assert ticket is not None
        logged = LoggedAnswer("req-1", ticket, 200, {"prompt_tokens": 9}, None, 9)
        if log_first:
            assert await accountant(proc).settle(logged)
        await stream.aclose()  # cut before the stream learns Envoy took the answer
        await proc.drain()
        if not log_first:
            assert await accountant(proc).settle(logged)
        assert len(proc._observer.recent) == 1, log_first
