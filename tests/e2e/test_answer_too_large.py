"""An answer past the 8 MiB Envoy holds of an answer it reads whole: a 502 in the caller's
dialect that the SDKs do not retry, never a hang and never the answer unchecked.

Two paths hold an answer whole. Here the service asks for it (an output guardrail checks
it, or it is translated): Envoy hands over what it holds before the end, and the service
answers the 502. Where Envoy lifts its usage (``json_to_metadata``), Envoy's own 500 is
turned into the same 502 by its ``local_reply_config`` (test_accounting.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from extproc.stack import Ports, Stack, running
from tests.e2e.conftest import ADMIN_KEY, EXAMPLE_POLICY, RESTRICTED_KEY, Mock
from tests.e2e.test_accounting import PAST_THE_BUFFER
from tests.e2e.test_telemetry import records

pytestmark = pytest.mark.e2e


TIMEOUT = 60.0
"""Such an answer once hung until the client's timeout (Envoy's BUFFERED mode); fail fast."""


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    """The example policy: every answer is checked by an output guardrail (ext_proc)."""
    logs = tmp_path_factory.mktemp("answer-too-large")
    audit = logs / "audit.jsonl"
    setting = Stack(
        policy=EXAMPLE_POLICY,
        ports=Ports.free(),
        log_dir=logs,
        serve_args=("--audit-file", str(audit)),
    )
    with running(setting) as stack:
        yield stack, audit


def _openai(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{stack.ports.gateway}/v1",
        api_key=key,
        max_retries=2,
        timeout=TIMEOUT,
    )


def _refused_chat(stack: Stack, key: str, model: str = "gpt-4o-mini") -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        _openai(stack, key).chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=PAST_THE_BUFFER,
        )
    return caught.value


def _record_of(audit: Path, request_id: str) -> dict[str, Any]:
    """The exchange's audit record, once written (records are written in batches)."""
    deadline = time.monotonic() + 10
    while True:
        found = [r for r in records(audit) if r["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("key", "model"),
    [(ADMIN_KEY, "gpt-4o-mini"), (RESTRICTED_KEY, "gpt-4o-mini"), (ADMIN_KEY, "claude-3-5-haiku")],
    ids=["guarded", "guarded-restricted", "translated"],
)
def test_an_answer_past_the_buffer_is_a_502_the_sdk_does_not_retry(
    guarded: tuple[Stack, Path], key: str, model: str
) -> None:
    """Held whole (an output guardrail checks it; Claude's is translated to OpenAI's
    format), an answer over 8 MiB cannot pass: the caller gets a 502 in its dialect, and
    the SDK does not retry it (``x-should-retry: false``): the provider has billed it.
    No usage was read, so it is charged its prompt and, from its size, the output
    reserved for it (the example policy's 4,096 tokens)."""
    stack, audit = guarded
    upstream = Mock(stack.ports.mock_anthropic if model.startswith("claude") else stack.ports.mock)
    before = len(upstream.requests())
    error = _refused_chat(stack, key, model)
    assert error.status_code == 502
    assert error.body["code"] == "upstream_answer_too_large"  # type: ignore[index]
    assert error.response.headers["x-should-retry"] == "false"
    assert len(upstream.requests()) == before + 1
    record = _record_of(audit, error.response.headers["x-request-id"])
    assert record["status"] == 502 and record["error"] == "upstream_answer_too_large"
    assert record["usage_source"] == "estimate"
    assert record["input_tokens"] > 0 and record["output_tokens"] == 4096


def test_an_anthropic_answer_past_the_buffer_is_a_502_in_its_dialect(
    guarded: tuple[Stack, Path],
) -> None:
    stack, _ = guarded
    client = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{stack.ports.gateway}",
        api_key=ADMIN_KEY,
        max_retries=2,
        timeout=TIMEOUT,
    )
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(
            model="claude-3-5-haiku",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=PAST_THE_BUFFER,
        )
    assert caught.value.status_code == 502
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_many_answers_past_the_buffer_never_hang(guarded: tuple[Stack, Path]) -> None:
    """The race that hung: the answer passes the limit before the service has answered
    Envoy about its headers. On loopback the mock sends 9 MB in a few milliseconds."""
    stack, _ = guarded
    for _ in range(20):
        assert _refused_chat(stack, ADMIN_KEY).status_code == 502
