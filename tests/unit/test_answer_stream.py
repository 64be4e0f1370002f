"""accounting: service through the HTTP authorizer: an answer-only ext_proc stream reads
the answer and settles the exchange from the ticket the authorizer issued."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import yaml
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.json_format import MessageToDict

from extproc.accounting import (
    ANSWERED,
    AUTHZ_NAMESPACE,
    EXCHANGE_NAMESPACE,
    HEADER_TICKET,
    Accountant,
)
from extproc.adapters import ext_authz_http
from extproc.adapters.access_log import logged_answer
from extproc.adapters.ext_proc import ExternalProcessor
from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.meter import Meter
from extproc.policy.store import PolicyStore
from extproc.telemetry.audit import AuditLog
from extproc.telemetry.observer import Observer
from extproc.ticket import TicketSigner
from tests.unit.fake_envoy import exchange, response_body, response_headers
from tests.unit.test_accounting import KEY, log_entry, policy_file

USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 3,
    "prompt_tokens_details": {"cached_tokens": 1000},
}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
"""Nothing to mask: the body goes up unchanged, so the authorizer decides it."""
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
    "usage": USAGE,
}


class Processes:
    """The authorizer of one process and the ext_proc of another, sharing a budget store
    (the Redis of several replicas) and the ticket key."""

    def __init__(self, tmp_path: Path) -> None:
        path = policy_file(tmp_path, "service")
        policy = yaml.safe_load(path.read_text())
        # The example sends gpt-4o-mini up under a dated name: a body rewrite, which only a
        # whole ext_proc stream makes. Called by its own name, the body goes up unchanged.
        del policy["models"]["gpt-4o-mini"]["backend"]["model"]
        path.write_text(yaml.safe_dump(policy))
        self.store = MemoryStore()
        self.authorizer = ext_authz_http.HttpAuthorizer(
            PolicyStore(path), Meter(self.store), Observer(None, AuditLog([])), TicketSigner(KEY)
        )
        self.processor = ExternalProcessor(
            PolicyStore(path),
            Meter(self.store),
            Observer(None, AuditLog([])),
            tickets=TicketSigner(KEY),
        )

    async def decide(self) -> str:
        """Send a chat request to the authorizer; the ticket it answers Envoy with."""
        headers = {
            ":method": "POST",
            ":path": "/v1/chat/completions",
            "authorization": "Bearer sk-demo-restricted",
            "x-request-id": "req-1",
        }
        written: list[bytes] = []
        check = ext_authz_http.Check(headers, [orjson.dumps(CHAT)])
        await self.authorizer.answer(check, lambda data: written.append(data) is None)
        head = written[0].decode().split("\r\n\r\n")[0].split("\r\n")[1:]
        answer = dict(line.split(": ", 1) for line in head)
        assert answer[ext_authz_http.HEADER_PROCESSING] == ext_authz_http.PROCESSING_ANSWER
        return answer[HEADER_TICKET]

    @property
    def recent(self) -> list[dict[str, object]]:
        return list(self.processor._observer.recent)


def answer_headers(
    ticket: str | None, status: int = 200, content_type: str = "application/json"
) -> pb.ProcessingRequest:
    """The response headers as the answer-only filter sends them, with the ticket Envoy
    forwards from the authorizer's metadata."""
    message = response_headers(status, content_type)
    if ticket is not None:
        message.metadata_context.filter_metadata[AUTHZ_NAMESPACE].update({HEADER_TICKET: ticket})
    return message


def marked(response: pb.ProcessingResponse) -> bool:
    """Whether ``response`` marks the exchange as reported by this stream."""
    metadata = MessageToDict(response.dynamic_metadata).get(EXCHANGE_NAMESPACE)
    return metadata == {ANSWERED: "ext_proc"}


def body_chunk(data: bytes, end: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end))


async def test_the_answer_settles_the_reservation_with_the_providers_usage(
    tmp_path: Path,
) -> None:
    processes = Processes(tmp_path)
    ticket = await processes.decide()
    [(counter, (reserved, _))] = processes.store._entries.items()  # the global USD limit
    responses = await exchange(processes.processor, [answer_headers(ticket), response_body(ANSWER)])
    first, last = responses
    assert first.mode_override.response_body_mode == ProcessingMode.STREAMED
    assert not first.HasField("dynamic_metadata")  # not marked until the answer's end
    assert marked(last)
    assert not first.response_headers.response.HasField("header_mutation")  # unchanged
    assert not responses[1].response_body.response.HasField("body_mutation")
    [record] = processes.recent
    assert record["team"] == "apps" and record["status"] == 200
    assert (record["input_tokens"], record["output_tokens"]) == (1000, 3)
    assert record["cost_micro_usd"] == 77 and record["usage_source"] == "provider"
    assert reserved > 77 and processes.store._entries[counter][0] == 77


async def test_a_stream_usage_is_read_from_its_events(tmp_path: Path) -> None:
    processes = Processes(tmp_path)
    ticket = await processes.decide()
    events = [
        {"choices": [{"index": 0, "delta": {"content": "hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2}},
    ]
    chunks = [b"data: " + orjson.dumps(event) + b"\n\n" for event in events] + [b"data: [DONE]\n\n"]
    messages = [answer_headers(ticket, content_type="text/event-stream")]
    messages += [body_chunk(chunk, i == len(chunks) - 1) for i, chunk in enumerate(chunks)]
    responses = await exchange(processes.processor, messages)
    assert len(responses) == 1 + len(chunks)
    [record] = processes.recent
    assert (record["input_tokens"], record["output_tokens"]) == (12, 2)
    assert record["usage_source"] == "provider"


async def test_an_error_answer_gives_the_reservation_back_without_reading_it(
    tmp_path: Path,
) -> None:
    processes = Processes(tmp_path)
    ticket = await processes.decide()
    [counter] = processes.store._entries
    responses = await exchange(processes.processor, [answer_headers(ticket, status=429)])
    assert not responses[0].HasField("mode_override")  # its body is not asked for
    assert marked(responses[0])
    [record] = processes.recent
    assert record["status"] == 429 and record["cost_micro_usd"] == 0
    assert processes.store._entries[counter][0] == 0


async def test_an_answer_cut_short_is_left_to_the_access_log(tmp_path: Path) -> None:
    """The caller left, or the upstream reset: Envoy ends the stream before the body's
    end. Unmarked, the exchange gets an access-log record, which settles it from the
    bytes Envoy sent; the stream settles nothing (it saw only part of what was sent)."""
    processes = Processes(tmp_path)
    ticket = await processes.decide()
    [(counter, (reserved, _))] = processes.store._entries.items()
    partial = orjson.dumps(ANSWER)[:40]
    responses = await exchange(
        processes.processor, [answer_headers(ticket), body_chunk(partial, False)]
    )
    await processes.processor.drain()
    assert not any(marked(response) for response in responses)
    assert processes.recent == []
    assert processes.store._entries[counter][0] == reserved


async def test_without_a_ticket_it_could_read_the_answer_passes_untouched(
    tmp_path: Path,
) -> None:
    processes = Processes(tmp_path)
    ticket = await processes.decide()
    for forged in (None, ticket[:-2] + ("AA" if not ticket.endswith("AA") else "BB")):
        [response] = await exchange(processes.processor, [answer_headers(forged)])
        assert response == pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    assert processes.recent == []


def test_the_access_log_leaves_an_answer_the_stream_took_to_the_stream() -> None:
    """Envoy logs every exchange whose caller left (DC): one an answer-only stream took is
    reported by that stream; one whose caller left before the answer began (no stream
    opened) only by its record."""
    entry = log_entry("r1", 0, {})
    entry.common_properties.metadata.filter_metadata[AUTHZ_NAMESPACE].update({HEADER_TICKET: "t"})
    before_the_answer = logged_answer(entry)
    assert before_the_answer is not None and before_the_answer.ticket == "t"
    entry.common_properties.metadata.filter_metadata[EXCHANGE_NAMESPACE].update(
        {ANSWERED: "ext_proc"}
    )
    assert logged_answer(entry) is None


class SlowStore(MemoryStore):
    """Holds every settlement until released: the caller leaves meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def adjust(self, deltas: Any, *, token: str | None = None) -> tuple[int, ...]:
        self.entered.set()
        await self.release.wait()
        return await super().adjust(deltas, token=token)


async def test_a_settlement_under_way_when_the_caller_leaves_completes(tmp_path: Path) -> None:
    """Envoy cancels the stream while the budget is being settled: the settlement goes on
    to the end (not cut short, not started a second time)."""
    processes = Processes(tmp_path)
    ticket = await processes.decide()
    slow = SlowStore()
    slow._entries = processes.store._entries  # the reservation the authorizer made
    processes.processor.accountant = Accountant(
        Meter(slow), processes.processor._observer, processes.processor._tickets
    )
    streaming = asyncio.ensure_future(
        exchange(processes.processor, [answer_headers(ticket), response_body(ANSWER)])
    )
    await asyncio.wait_for(slow.entered.wait(), 5)
    streaming.cancel()
    await asyncio.gather(streaming, return_exceptions=True)
    slow.release.set()
    await processes.processor.drain()
    [record] = processes.recent
    assert record["cost_micro_usd"] == 77
    [(reserved, _)] = slow._entries.values()
    assert reserved == 77
