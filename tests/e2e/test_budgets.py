"""Budgets end to end: two service workers, one real Redis, real Envoy, real SDKs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml

from extproc.budgets.pricing import Price, cost_micro_usd
from extproc.budgets.tokens import count_prompt_tokens
from extproc.budgets.windows import Window, window_bounds
from extproc.stack import ROOT, Ports, Stack, running
from tests.e2e.conftest import Http, Mock
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e

POLICY = Path(__file__).with_name("budget_policy.yaml")
CASSETTES = ROOT.parent / "shared" / "data" / "cassettes" / "openai"


class Webhook(ThreadingHTTPServer):
    """Receives the budget alerts the service POSTs."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/alerts"


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    server = Webhook()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory, webhook: Webhook) -> Path:
    policy = yaml.safe_load(POLICY.read_text())
    policy["settings"]["budgets"]["alert_webhook"] = webhook.url
    path = tmp_path_factory.mktemp("budget-policy") / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer, policy_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("budget-stack")
    with running(
        Stack(
            policy=policy_file,
            ports=Ports.free(),
            log_dir=logs,
            workers=2,
            redis_url=redis_server.url,
        )
    ) as s:
        yield s


def client(stack: Stack, name: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{stack.ports.gateway}/v1",
        api_key=f"sk-test-{name}",
        max_retries=0,
    )


def counter(server: RedisServer, team: str, unit: str) -> int:
    start, _ = window_bounds(Window.MONTH, datetime.now(UTC))
    value = redis.Redis(port=server.port).get(f"{{budget}}:team:{team}:*:{unit}:month:{start}")
    return int(value or 0)


# --- exactness on real recorded traffic -----------------------------------------------------


def recorded_with_usage() -> list[Any]:
    cases = []
    for path in sorted(CASSETTES.glob("*.yaml")):
        interaction = yaml.safe_load(path.read_text())["interactions"][0]
        request, response = interaction["request"], interaction["response"]
        suffix = next(
            (
                s
                for s in ("/chat/completions", "/completions", "/embeddings")
                if request["url"].endswith(s)
            ),
            None,
        )
        if (
            suffix is None
            or response["code"] != 200
            or '"usage":{' not in response["body"].replace(" ", "")
        ):
            continue
        cases.append(
            pytest.param(path.stem, "/v1" + suffix, request["body"], response["body"], id=path.stem)
        )
    return cases


def recorded_usage(body: str) -> dict[str, Any]:
    if body.lstrip().startswith("data:"):
        usages = [
            json.loads(line[5:])["usage"]
            for line in body.splitlines()
            if line.startswith("data:") and '"usage":{' in line.replace(" ", "")
        ]
        return dict(usages[-1])
    return dict(json.loads(body)["usage"])


def test_cassettes_with_usage_are_found() -> None:
    assert len(recorded_with_usage()) >= 20, f"the shared data sets are missing: {CASSETTES}"


METERED_UNITS = ("input_tokens", "output_tokens", "requests", "usd")


def meter_counters(redis_server: RedisServer) -> dict[str, int]:
    """The ``meter`` team's counters, the ones a recorded exchange moves."""
    return {unit: counter(redis_server, "meter", unit) for unit in METERED_UNITS}


def charged_since(redis_server: RedisServer, before: dict[str, int]) -> dict[str, int]:
    """What the ``meter`` team was charged since ``before`` (:func:`meter_counters`)."""
    after = meter_counters(redis_server)
    return {unit: after[unit] - before[unit] for unit in METERED_UNITS}


def send_recorded(raw: Http, name: str, path: str, request_body: str) -> None:
    """Replay one recorded request as ``sk-test-meter``; the mock answers the recording."""
    status, _, _ = raw.request(
        "POST",
        path,
        request_body.encode(),
        {
            "authorization": "Bearer sk-test-meter",
            "content-type": "application/json",
            "x-mock-cassette": name,
        },
    )
    assert status == 200


def recorded_charge(request_body: str, response_body: str) -> dict[str, int]:
    """What the recorded exchange must add to each counter: its usage at the policy's price."""
    usage = recorded_usage(response_body)
    prompt, completion = usage["prompt_tokens"], usage.get("completion_tokens", 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    prices = yaml.safe_load(POLICY.read_text())["models"][json.loads(request_body)["model"]][
        "pricing"
    ]
    price = Price.from_usd(
        input=str(prices["input"]),
        output=str(prices["output"]),
        cached_input=str(prices.get("cached_input", prices["input"])),
    )
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "requests": 1,
        "usd": cost_micro_usd(price, prompt, cached, completion),
    }


@pytest.mark.parametrize(("name", "path", "request_body", "response_body"), recorded_with_usage())
def test_recorded_usage_is_accounted_exactly(
    redis_server: RedisServer,
    raw: Http,
    name: str,
    path: str,
    request_body: str,
    response_body: str,
) -> None:
    before = meter_counters(redis_server)
    send_recorded(raw, name, path, request_body)
    assert charged_since(redis_server, before) == recorded_charge(request_body, response_body)


# --- limits under concurrency, headers, the SDK's view -------------------------------------


def test_no_overspend_under_concurrency(stack: Stack, redis_server: RedisServer) -> None:
    """50 clients race for 3,000 tokens across two workers sharing one Redis."""
    admitted: list[int] = []
    rejected: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            reply = client(stack, "pool").chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"client {i} " + "word " * 40}],
                max_tokens=60,
            )
        except openai.RateLimitError:
            with lock:
                rejected.append(i)
            return
        assert reply.usage is not None
        with lock:
            admitted.append(reply.usage.total_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(admitted) + len(rejected) == 50
    assert admitted and rejected, (admitted, rejected)
    assert sum(admitted) <= 3000
    assert counter(redis_server, "pool", "total_tokens") == sum(admitted)


def test_rate_limit_is_the_sdks_rate_limit_error(stack: Stack, mock: Mock) -> None:
    tight = client(stack, "tight")
    messages = [{"role": "user", "content": "hello there"}]
    first = tight.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "word " * 150}], max_tokens=100
    )
    remaining = int(first.headers["x-ratelimit-remaining-tokens"])
    assert first.headers["x-ratelimit-limit-tokens"] == "300"
    assert 0 < remaining < 300 - 100
    assert first.headers["x-ratelimit-reset-tokens"].endswith("s")

    # No max tokens, and the default cap (200) no longer fits: the request gets what is
    # left instead of a refusal, and the provider is told to stop there.
    mock.clear()
    tight.chat.completions.create(model="gpt-4o-mini", messages=messages)
    sent = json.loads(mock.last()["body"])
    assert 0 < sent["max_completion_tokens"] < 200

    with pytest.raises(openai.RateLimitError) as caught:
        tight.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=250)
    error = caught.value
    assert error.body["code"] == "budget_exceeded"  # type: ignore[index]
    assert "team 'tight'" in error.message
    retry_after = int(error.response.headers["retry-after"])
    assert 0 < retry_after <= 31 * 24 * 3600
    assert "x-ratelimit-remaining-tokens" in error.response.headers


def test_alerts_are_judged_on_what_was_used_not_on_what_was_reserved(
    stack: Stack, webhook: Webhook
) -> None:
    """A request may reserve 150 tokens of a 200-token budget and use a few: the webhook
    hears that 1 % is used (what the caller was charged), not that 50 % is."""
    reply = client(stack, "alerting").chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}], max_tokens=150
    )
    assert reply.usage is not None and 2 <= reply.usage.total_tokens < 100
    deadline = time.monotonic() + 10
    while not webhook.received and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a 50 % alert of the same settlement would follow the 1 % at once
    assert [(e["threshold_percent"], e["used"]) for e in webhook.received] == [
        (1, reply.usage.total_tokens)
    ]
    [event] = webhook.received
    assert (event["scope"], event["scope_id"], event["limit"]) == ("team", "alerting", 200)


def test_streamed_answer_is_settled_from_its_usage_chunk(
    stack: Stack, redis_server: RedisServer, mock: Mock
) -> None:
    before = counter(redis_server, "meter", "output_tokens")
    stream = client(stack, "meter").chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "one two three four five"}],
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four five"
    # The gateway asked for the usage chunk the caller did not request.
    assert json.loads(mock.last()["body"])["stream_options"] == {"include_usage": True}
    assert chunks[-1].usage is not None
    assert (
        counter(redis_server, "meter", "output_tokens") - before
        == chunks[-1].usage.completion_tokens
    )


def abandon_stream(
    gateway_port: int,
    key: str,
    events: int = 10,
    headers: Sequence[tuple[str, str]] = (("x-mock-chunk-delay-ms", "40"),),
    linger: float = 0.0,
) -> int:
    """Start a slow 200-token stream, leave after ``events`` SSE events (0: before any
    answer, ``linger`` seconds after sending); its prompt tokens."""
    words = " ".join(f"w{i}" for i in range(150))
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": words}],
            "max_tokens": 200,
            "stream": True,
        }
    ).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {key}\r\n{extra}content-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway_port), timeout=10) as sock:
        sock.sendall(head + body)
        received = b""
        while received.count(b"data: ") < events:
            chunk = sock.recv(65536)
            assert chunk, f"the gateway closed the stream early: {received!r}"
            received += chunk
        time.sleep(linger)
    return count_prompt_tokens("o200k", [words], 1)


def test_client_abort_mid_stream_settles_what_was_streamed(
    stack: Stack, redis_server: RedisServer
) -> None:
    prompt = abandon_stream(stack.ports.gateway, "sk-test-abort")
    # The caller is gone after ~10 events. The reservation (prompt + 200) must shrink to
    # the prompt plus what was streamed, not stay reserved.
    deadline = time.monotonic() + 10
    while counter(redis_server, "abort", "total_tokens") >= prompt + 200:
        assert time.monotonic() < deadline, "the reservation was never settled"
        time.sleep(0.1)
    time.sleep(0.5)
    settled = counter(redis_server, "abort", "total_tokens")
    assert prompt + 5 <= settled < prompt + 150


def test_usage_command_reports_the_live_counters(
    stack: Stack, redis_server: RedisServer, policy_file: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "usage", "--policy", str(policy_file),
         "--redis-url", redis_server.url, "--team", "pool", "--json"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    (line,) = json.loads(result.stdout)
    assert (line["scope"], line["scope_id"], line["unit"], line["limit"]) == (
        "team",
        "pool",
        "total_tokens",
        "3000",
    )
    assert int(line["used"]) == counter(redis_server, "pool", "total_tokens") > 0
    assert int(line["remaining"]) == 3000 - int(line["used"])
    table = subprocess.run(
        [sys.executable, "-m", "extproc", "usage", "--policy", str(policy_file),
         "--redis-url", redis_server.url],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout  # fmt: skip
    assert table.splitlines()[0].split()[:4] == ["SCOPE", "ID", "MODEL", "UNIT"]
    assert sum(1 for row in table.splitlines() if row.startswith("team ")) == 8


# --- Redis going away ---------------------------------------------------------------------


def _chat(stack: Stack, key: str) -> Any:
    return client(stack, key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "ping"}], max_tokens=5
    )


def _reload(policy_file: Path, mode: str, stack: Stack) -> None:
    text = POLICY.read_text().replace("on_store_error: fail_closed", f"on_store_error: {mode}")
    policy_file.write_text(text)
    time.sleep(2.5)  # both workers poll the file every second


def test_redis_outage_fail_closed_then_fail_open(
    stack: Stack, redis_server: RedisServer, policy_file: Path
) -> None:
    _chat(stack, "meter")
    redis_server.kill()
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            _chat(stack, "meter")
        assert caught.value.status_code == 503
        assert caught.value.body["code"] == "budget_store_unavailable"  # type: ignore[index]

        _reload(policy_file, "fail_open", stack)
        for _ in range(3):
            assert _chat(stack, "meter").choices[0].message.content == "ping"
    finally:
        redis_server.start()  # same port, empty: what was counted locally is written back
    deadline = time.monotonic() + 15
    while counter(redis_server, "meter", "requests") < 3:
        assert time.monotonic() < deadline, "requests admitted during the outage were lost"
        time.sleep(0.2)
    _reload(policy_file, "fail_closed", stack)
    assert _chat(stack, "meter").choices[0].message.content == "ping"
