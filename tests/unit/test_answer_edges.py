"""Answers a provider should not send, and callers who leave at the worst moment: each
gets a defined outcome through the adapter (the fake Envoy of fake_envoy.py), never a
500, an unchecked text or a lost audit record."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from extproc.adapters.ext_proc import ExternalProcessor
from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.meter import Meter
from extproc.budgets.redis_store import _Batcher
from extproc.budgets.store import AdjustResult, Delta
from extproc.policy.store import PolicyStore
from extproc.stack import ROOT
from extproc.telemetry.audit import AuditLog
from extproc.telemetry.observer import Observer
from tests.unit.fake_envoy import (
    exchange,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

ADMIN = {"authorization": "Bearer sk-demo-admin"}
CHAT = "/v1/chat/completions"
EXAMPLE = ROOT / "policies" / "example.yaml"
MAIL = "write to jane.doe@example.com"


def _processor(
    policy: Path = EXAMPLE, store: MemoryStore | None = None
) -> tuple[ExternalProcessor, Observer]:
    observer = Observer(None, AuditLog([]))
    meter = Meter(store if store is not None else MemoryStore())
    return ExternalProcessor(PolicyStore(policy), meter, observer), observer


def _chat(stream: bool, model: str = "gpt-4o") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def _chunk(**delta: Any) -> bytes:
    choice = {"index": delta.pop("index", 0), "delta": delta, "finish_reason": None}
    return (
        b"data: " + orjson.dumps({"object": "chat.completion.chunk", "choices": [choice]}) + b"\n\n"
    )


ANSWER = orjson.dumps(
    {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": MAIL}}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13},
    }
)


def _immediate(answers: Sequence[Any]) -> tuple[int, dict[str, Any]]:
    [immediate] = [a.immediate_response for a in answers if a.HasField("immediate_response")]
    return immediate.status.code, orjson.loads(immediate.body)


def _sent(answers: Sequence[Any]) -> bytes:
    """What the caller receives of a streamed answer (each chunk as the service passed it)."""
    out = b""
    for answer in answers:
        if answer.HasField("response_body"):
            out += answer.response_body.response.body_mutation.body
    return out


@pytest.mark.parametrize(
    ("stream", "content_type", "more", "why"),
    [
        (False, "text/event-stream", {}, "it is a stream"),
        (True, "application/json", {}, "it is not a stream"),
        (False, "application/json", {"content-encoding": "gzip"}, "it is compressed"),
    ],
    ids=["json-asked-sse-sent", "stream-asked-json-sent", "compressed"],
)
async def test_an_answer_in_a_form_the_guards_cannot_read_is_a_502(
    stream: bool, content_type: str, more: dict[str, str], why: str
) -> None:
    """SDKs read a JSON answer whatever its content-type says: labelled a stream, it went
    past the output guards unread (its e-mail unmasked). Any such answer fails closed."""
    processor, observer = _processor()
    answers = await exchange(
        processor,
        [
            request_headers(CHAT, ADMIN),
            request_body(_chat(stream)),
            response_headers(200, content_type, **more),
            response_body(ANSWER),
        ],
    )
    status, error = _immediate(answers)
    assert status == 502 and error["error"]["code"] == "upstream_answer_unreadable"
    assert why in error["error"]["message"]
    assert b"jane.doe" not in _sent(answers)
    await processor.drain()
    [record] = observer.recent
    assert record["status"] == 502


async def test_a_cut_stream_keeps_its_guardrail_verdicts(tmp_path: Path) -> None:
    """SDKs close a stream at a block's error event, before the provider ends it: what the
    guard judged reaches the audit record all the same, a block as the exchange's error."""
    blocking = EXAMPLE.read_text().replace(
        "entities: [EMAIL_ADDRESS, CREDIT_CARD, IBAN_CODE, US_SSN]",
        "entities: [EMAIL_ADDRESS, { type: CREDIT_CARD, action: block }, IBAN_CODE, US_SSN]",
    )
    assert blocking != EXAMPLE.read_text()
    policy = tmp_path / "policy.yaml"
    policy.write_text(blocking)
    processor, observer = _processor(policy)
    answers = await exchange(
        processor,
        [
            request_headers(CHAT, ADMIN),
            request_body(_chat(True)),
            response_headers(200, "text/event-stream"),
            response_body(
                _chunk(content=MAIL + " and card 4111 1111 1111 1111"), end_of_stream=False
            ),
        ],
    )
    await processor.drain()
    assert b"guardrail_blocked" in _sent(answers) and b"4111" not in _sent(answers)
    [record] = observer.recent
    assert record["error"] == "guardrail_blocked"
    assert any(v["action"] == "blocked" for v in record["guardrails"])


class _SlowStore(MemoryStore):
    """Settlements go through the Redis store's batcher with a 50 ms round trip, so a
    caller can leave while one is in flight (the script still runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.settling = asyncio.Event()
        self.applied: list[bool] = []
        self._batcher: _Batcher[Any, AdjustResult] | None = None

    async def adjust(self, deltas: Sequence[Delta], *, token: str | None = None) -> AdjustResult:
        if self._batcher is None:
            self._batcher = _Batcher(self._send)
        self.settling.set()
        return await self._batcher((token, tuple(deltas)))

    async def _send(self, batch: list[Any]) -> list[AdjustResult]:
        await asyncio.sleep(0.05)
        results = []
        for token, deltas in batch:
            result = await MemoryStore.adjust(self, deltas, token=token)
            self.applied.append(result.applied)
            results.append(result)
        return results


async def test_a_caller_leaving_while_its_answer_settles_still_gets_one_audit_record() -> None:
    """The store applies a settlement whose caller left meanwhile; settled again, it found
    its token used and reported nothing: the exchange had no audit record at all."""
    store = _SlowStore()
    processor, observer = _processor(store=store)
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":5}}\n\n'

    async def envoy() -> AsyncIterator[Any]:
        yield request_headers(CHAT, ADMIN)
        yield request_body(_chat(True))
        yield response_headers(200, "text/event-stream")
        yield response_body(_chunk(content="hello") + usage + b"data: [DONE]\n\n")
        await asyncio.sleep(10)

    async def stream() -> None:
        async for _ in processor.Process(envoy(), None):
            pass

    running = asyncio.create_task(stream())
    await asyncio.wait_for(store.settling.wait(), 5)
    running.cancel()  # the caller leaves: Envoy resets the ext_proc stream
    await asyncio.gather(running, return_exceptions=True)
    await processor.drain()
    assert store.applied[:1] == [True]
    [record] = observer.recent
    assert record["output_tokens"] == 5


@pytest.mark.parametrize(
    "event",
    [
        b'data: {"choices":[{"index":[0],"delta":{"content":"mail jane.doe@example.com"}}]}\n\n',
        _chunk(function_call={"name": "send", "arguments": '{"to":"jane.doe@example.com"}'}),
    ],
    ids=["index-that-is-a-list", "legacy-function-call"],
)
async def test_odd_stream_chunks_are_guarded_not_failed(event: bytes) -> None:
    """A choice index that is no key failed the phase (a 500 mid-stream); the legacy
    ``function_call`` arguments went unread (the whole-answer path reads them)."""
    processor, _ = _processor()
    answers = await exchange(
        processor,
        [
            request_headers(CHAT, ADMIN),
            request_body(_chat(True)),
            response_headers(200, "text/event-stream"),
            response_body(event + b"data: [DONE]\n\n"),
        ],
    )
    assert not [a for a in answers if a.HasField("immediate_response")]
    sent = _sent(answers)
    assert b"jane.doe" not in sent and b"<EMAIL_ADDRESS>" in sent


async def test_a_streamed_iban_is_held_until_it_is_whole() -> None:
    """An IBAN's groups may be letters (a bank code): its start went out before the rest
    made it one (``GB82 WEST<IBAN_CODE>``)."""
    processor, _ = _processor()
    deltas = ["Pay", " to", " GB", "82", " WEST", " 123", "4", " 569", "8", " 765", "4", " 32", "!"]
    answers = await exchange(
        processor,
        [
            request_headers(CHAT, ADMIN),
            request_body(_chat(True)),
            response_headers(200, "text/event-stream"),
            *[response_body(_chunk(content=d), end_of_stream=False) for d in deltas],
            response_body(b"data: [DONE]\n\n"),
        ],
    )
    text = "".join(
        orjson.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in _sent(answers).split(b"\n")
        if line.startswith(b"data: {")
    )
    assert text == "Pay to <IBAN_CODE>!"


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"null",
        b'"ok"',
        b'{"type":"message","content":[{"type":"tool_use","input":'
        + b'{"a":' * 300
        + b"1"
        + b"}" * 300
        + b"}]}",
    ],
    ids=["list", "null", "string", "tool-input-nested-300-deep"],
)
async def test_a_translated_answer_that_is_no_message_is_a_502(body: bytes) -> None:
    """An Anthropic 2xx that is JSON but no message (or one nested past what can be
    written back) failed the phase with a 500, which SDKs retry: the provider billed it."""
    processor, _ = _processor()
    answers = await exchange(
        processor,
        [
            request_headers(CHAT, ADMIN),
            request_body(_chat(False, model="claude-3-5-haiku")),
            response_headers(200, "application/json"),
            response_body(body),
        ],
    )
    status, error = _immediate(answers)
    assert status == 502 and error["error"]["code"] == "upstream_answer_unreadable"


async def test_an_event_too_large_to_read_passes_audit_only_rules_unread(tmp_path: Path) -> None:
    """Audit rules hold nothing back, so an event past the 1 MiB a guard reads was held
    whole, without limit, and nothing reached the caller: it now passes as it comes."""
    audit_only = EXAMPLE.read_text().replace("mode: mutate", "mode: audit")
    assert audit_only.count("mode: audit") >= 2
    policy = tmp_path / "policy.yaml"
    policy.write_text(audit_only)
    processor, _ = _processor(policy)
    huge = b"data: " + b"x" * (2 * 1024 * 1024)
    answers = await exchange(
        processor,
        [
            request_headers(CHAT, ADMIN),
            request_body(_chat(True)),
            response_headers(200, "text/event-stream"),
            response_body(huge[: len(huge) // 2], end_of_stream=False),
            response_body(huge[len(huge) // 2 :], end_of_stream=False),
        ],
    )
    assert len(_sent(answers)) == len(huge)
