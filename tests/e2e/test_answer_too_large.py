"""An answer past the 8 MiB Envoy holds an answer it reads whole: a 502 in the caller's
dialect that the SDKs do not retry, on a gateway of its own.

Known limit (README): on a gateway whose connections carried multi-megabyte exchanges just
before (the 4 MB prompt and 40 MB upload tests of test_gateway.py), such an answer was
seen to hang until the client's timeout instead; not understood yet.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest

from extproc.stack import Ports, Stack, running
from tests.e2e.conftest import ADMIN_KEY, EXAMPLE_POLICY, RESTRICTED_KEY, Mock

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("answer-too-large")
    with running(Stack(policy=EXAMPLE_POLICY, ports=Ports.free(), log_dir=logs)) as s:
        yield s


PAST_THE_BUFFER = {"x-mock-pad-bytes": str(9 * 1024 * 1024)}
"""Has the mock pad its JSON answer past the 8 MiB Envoy holds an answer it reads whole."""


@pytest.mark.parametrize("key", [ADMIN_KEY, RESTRICTED_KEY])
def test_an_answer_past_the_buffer_is_a_502_the_sdk_does_not_retry(
    stack: Stack, mock: Mock, key: str
) -> None:
    """Held whole (its usage lifted by Envoy, or checked by an output guardrail), an answer
    over 8 MiB cannot pass: the caller gets a 502 in its dialect, and the SDK does not
    retry it (``x-should-retry: false``): the provider has already billed it."""
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{stack.ports.gateway}/v1", api_key=key, max_retries=2
    )
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=PAST_THE_BUFFER,
        )
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_answer_too_large"  # type: ignore[index]
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(mock.requests()) == 1


def test_an_anthropic_answer_past_the_buffer_is_a_502_in_its_dialect(stack: Stack) -> None:
    client = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{stack.ports.gateway}", api_key=ADMIN_KEY, max_retries=2
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
