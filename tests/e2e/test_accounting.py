"""Answers settled from their tickets: requests the HTTP authorizer decides alone.

accounting: envoy — answers read by Envoy and settled from its gRPC access log: the same
real recorded OpenAI traffic as the budget tests, through real Envoy lifting the usage
(json_to_metadata, sse_to_metadata), with one service worker, two workers sharing one
Redis, and two separate replicas: one decides every request, the other gets Envoy's
access-log stream and settles them from their tickets.

accounting: service (``answer-report``) — the same requests, each answer reported by
Envoy's Lua filter before its end (status, bytes, lifted usage, ticket) to the service,
which settles it from the ticket there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from extproc.budgets.pricing import Price, cost_micro_usd
from extproc.budgets.tokens import count_prompt_tokens
from extproc.stack import GATEWAY_CONFIG, ROOT, Ports, Stack, running
from extproc.ticket import KEY_VARIABLE
from tests.e2e.conftest import Http, Mock
from tests.e2e.test_budgets import (
    POLICY,
    abandon_stream,
    charged_since,
    client,
    counter,
    meter_counters,
    recorded_charge,
    recorded_with_usage,
    send_recorded,
)
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e

PAST_THE_BUFFER = {"x-mock-pad-bytes": str(9 * 1024 * 1024)}
"""Has the mock pad its JSON answer past the 8 MiB Envoy holds of an answer it reads whole."""

REPLICA_AUDIT = "audit-replica.jsonl"
"""The audit file of the replica that settles what the other decided (two-replicas)."""


@pytest.fixture(
    scope="module", params=["one-worker", "two-workers", "two-replicas", "answer-report"]
)
def stack(
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[Stack]:
    """The HTTP authorizer decides these requests alone (no ext_proc stream). With two
    workers, an access-log record often reaches the worker that did not decide it; with
    two replicas, always."""
    tmp = tmp_path_factory.mktemp("accounting")
    policy = tmp / "policy.yaml"
    accounting = "service" if request.param == "answer-report" else "envoy"
    text = POLICY.read_text().replace("settings:\n", f"settings:\n  accounting: {accounting}\n")
    # Served through a catalogue backend, so answers name the endpoint that served them.
    text = text.replace("  gpt-4o-mini: {", "  gpt-4o-mini: { backend: { cluster: openai },")
    policy.write_text(text)
    setting = Stack(
        policy=policy,
        ports=Ports.free(),
        log_dir=tmp,
        workers=2 if request.param == "two-workers" else 1,
        redis_url=redis_server.url,
        serve_args=("--audit-file", str(tmp / "audit.jsonl")),
    )
    with ExitStack() as cleanup, pytest.MonkeyPatch.context() as env:
        if request.param == "two-replicas":
            # No EXTPROC_TICKET_KEY: the replicas find their key in the Redis they share.
            env.delenv(KEY_VARIABLE, raising=False)
            replica = Ports.free(avoid=setting.ports)
            cleanup.enter_context(serving_replica(policy, replica, redis_server.url, tmp))
            setting.envoy_config = tmp / "gateway-log-to-replica.yaml"
            setting.envoy_config.write_text(access_log_to(replica.grpc))
        yield cleanup.enter_context(running(setting))


def access_log_to(port: int) -> str:
    """envoy/gateway.yaml with its access log sent to the service on ``port`` only."""
    text = GATEWAY_CONFIG.read_text()
    logged = "grpc_service: { envoy_grpc: { cluster_name: extproc } }\n" + " " * 24
    logged += "buffer_flush_interval"
    assert text.count(logged) == 1
    text = text.replace(logged, logged.replace("cluster_name: extproc ", "cluster_name: replica "))
    return with_cluster(text, "replica", port)


def with_cluster(config: str, name: str, port: int, grpc: bool = True) -> str:
    """``config`` with one more cluster to ``port`` on loopback: gRPC (HTTP/2), or HTTP/1.1."""
    http2 = (
        "      typed_extension_protocol_options:\n"
        "        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n"
        '          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n'
        "          explicit_http_config: { http2_protocol_options: {} }\n"
    )
    cluster = (
        f"    - name: {name}\n      type: STATIC\n      connect_timeout: 1s\n"
        f"{http2 if grpc else ''}"
        f"      load_assignment:\n        cluster_name: {name}\n        endpoints:\n"
        "          - lb_endpoints:\n              - endpoint:\n                  address:\n"
        f"                    socket_address: {{ address: 127.0.0.1, port_value: {port} }}\n"
    )
    assert config.count("\n  clusters:\n") == 1
    return config.replace("\n  clusters:\n", "\n  clusters:\n" + cluster)


@contextmanager
def serving_replica(policy: Path, ports: Ports, redis_url: str, tmp: Path) -> Iterator[None]:
    """A second service on the same policy, Redis and ticket key, without an authorizer."""
    command = [
        *(sys.executable, "-m", "extproc", "serve", "--policy", str(policy)),
        *("--grpc", f"127.0.0.1:{ports.grpc}", "--authz", "off"),
        *("--admin-port", str(ports.admin), "--redis-url", redis_url),
        *("--audit-file", str(tmp / REPLICA_AUDIT), "--grace", "2"),
    ]
    log = tmp / "replica.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not ready(ports.admin):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the replica did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def audit(stack: Stack) -> Path:
    """The audit log's path (each worker writes its own file beside it)."""
    assert stack.log_dir is not None
    return stack.log_dir / "audit.jsonl"


def post_chat(
    raw: Http, body: dict[str, Any], key: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    """POST ``body`` to /v1/chat/completions as ``key``, with ``headers`` besides."""
    return raw.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body).encode(),
        {"authorization": f"Bearer {key}", "content-type": "application/json", **headers},
    )


def eventually(check: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    """Settlement follows the answer by one access-log flush (50 ms); wait for it."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def ext_proc_messages(stack: Stack) -> int:
    url = f"http://127.0.0.1:{stack.ports.envoy_admin}/stats?filter=ext_proc.stream_msgs_sent"
    with urllib.request.urlopen(url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(int(line.rsplit(":", 1)[1]) for line in lines if line.strip())


def audit_records(audit: Path) -> list[dict[str, Any]]:
    files = sorted(audit.parent.glob(f"{audit.stem}*{audit.suffix}"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


@pytest.mark.parametrize(("name", "path", "request_body", "response_body"), recorded_with_usage())
def test_recorded_usage_is_accounted_exactly_from_envoy(
    redis_server: RedisServer,
    raw: Http,
    name: str,
    path: str,
    request_body: str,
    response_body: str,
) -> None:
    before = meter_counters(redis_server)
    send_recorded(raw, name, path, request_body)
    expected = recorded_charge(request_body, response_body)

    def settled() -> bool:
        return charged_since(redis_server, before) == expected

    eventually(settled, f"counters never settled to {expected}")


def test_usage_is_lifted_from_json_with_a_charset(
    stack: Stack, raw: Http, redis_server: RedisServer
) -> None:
    """``application/json; charset=utf-8`` is JSON to Envoy's usage lift too: the answer
    is charged its reported output, not an estimate from its size."""
    before = counter(redis_server, "meter", "output_tokens")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two three"}]}
    status, headers, answer = post_chat(raw, body, "sk-test-meter", {"x-mock-charset": "utf-8"})
    assert status == 200 and headers["content-type"] == "application/json; charset=utf-8"
    reported = json.loads(answer)["usage"]["completion_tokens"]
    assert reported != len(answer) // 4  # the estimate would differ
    eventually(
        lambda: counter(redis_server, "meter", "output_tokens") - before == reported,
        "the answer was not settled from its reported usage",
    )


def test_usage_with_a_total_but_no_output_count_charges_the_output(
    stack: Stack, raw: Http, redis_server: RedisServer
) -> None:
    """Some OpenAI-compatible servers report the prompt and the total only: Envoy lifted
    no total, and the answer was settled with no output at all."""
    before = counter(redis_server, "meter", "output_tokens")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two three"}]}
    status, _, answer = post_chat(raw, body, "sk-test-meter", {"x-mock-usage": "total-only"})
    usage = json.loads(answer)["usage"]
    assert status == 200 and "completion_tokens" not in usage
    output = usage["total_tokens"] - usage["prompt_tokens"]
    assert output > 0
    eventually(
        lambda: counter(redis_server, "meter", "output_tokens") - before == output,
        "the answer was not charged its output",
    )


def test_an_embeddings_batch_past_the_buffer_limit_passes_and_is_charged_its_prompt(
    stack: Stack, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    """1,200 inputs of 1,536 dimensions: a ~10 MB answer, over the 8 MiB Envoy holds a
    body it reads whole. It streams through: under ``service`` the authorizer, seeing a
    model that counts its prompt exactly, has it accounted from that count (the
    provider's own figure on every recorded embeddings exchange) and Envoy lifts
    nothing from it; under ``envoy`` the caller may use a model that only estimates
    (Claude), so ext_proc reads the provider's count from the answer as it streams."""
    inputs = [f"chunk {i} of a long document" for i in range(1200)]
    before = counter(redis_server, "meter", "input_tokens")
    reply = client(stack, "meter").embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=inputs, dimensions=1536
    )
    assert len(reply.content) > 8 * 1024 * 1024
    answer = reply.parse()
    assert len(answer.data) == 1200
    counted = count_prompt_tokens("cl100k", inputs, 0)
    expected = counted if answer_reported(request) else answer.usage.prompt_tokens
    assert counted != answer.usage.prompt_tokens  # the mock counts words: tells them apart
    eventually(
        lambda: counter(redis_server, "meter", "input_tokens") - before == expected,
        "the batch was not charged as expected",
    )


def answer_reported(request: pytest.FixtureRequest) -> bool:
    return bool(request.node.callspec.params["stack"] == "answer-report")


def test_the_authorizer_decides_the_request_alone(
    stack: Stack, audit: Path, request: pytest.FixtureRequest
) -> None:
    before = ext_proc_messages(stack)
    meter = client(stack, "meter")
    reply = meter.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "count me"}],
        extra_headers={
            "x-gateway-team": "forged",
            "x-gateway-processing": "forged",
            "x-gateway-stream-usage": "include",  # would have Envoy change the body
            "x-mock-ratelimit": "7",  # the provider's own x-ratelimit-limit-tokens
        },
    )
    assert ext_proc_messages(stack) == before  # no ext_proc stream, whatever the mode
    sent = Mock(stack.ports.mock).last()["headers"]
    assert sent["x-gateway-team"] == "meter"  # set by the gateway, not the client
    assert "x-gateway-processing" not in sent and "x-gateway-stream-usage" not in sent
    assert "stream_options" not in json.loads(Mock(stack.ports.mock).last()["body"])
    assert sent.get("authorization") != "Bearer sk-test-meter"  # never the gateway key
    # The budget headers the response phase would have set, added by Envoy in place of
    # the provider's.
    assert reply.headers.get_list("x-ratelimit-limit-tokens") == ["1000000000"]
    assert "x-ratelimit-remaining-usd" in reply.headers
    request_id = reply.headers["x-request-id"]
    answer = reply.parse()
    assert answer.usage is not None

    def recorded() -> bool:
        return any(r["request_id"] == request_id for r in audit_records(audit))

    eventually(recorded, "no audit record for the answer")
    record = next(r for r in audit_records(audit) if r["request_id"] == request_id)
    assert record["status"] == 200 and record["usage_source"] == "provider"
    assert record["output_tokens"] == answer.usage.completion_tokens
    # From the answer's x-gateway-served-by, carried by the access log.
    assert record["served_by"] == "openai_primary"
    if request.node.callspec.params["stack"] == "two-replicas":
        # Settled and reported by the replica that never saw the request.
        replica = audit_records(audit.with_name(REPLICA_AUDIT))
        assert [r["request_id"] for r in replica].count(request_id) == 1
        assert record["team"] == "meter" and record["budget"] == "reserved"


def test_streamed_answer_is_settled_from_its_usage_chunk(
    stack: Stack, redis_server: RedisServer
) -> None:
    meter = client(stack, "meter")
    before = counter(redis_server, "meter", "output_tokens")
    messages_before = ext_proc_messages(stack)
    chunks = list(
        meter.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "one two three four five"}],
            stream=True,
        )
    )
    usage = chunks[-1].usage  # asked for by the gateway (stream_options.include_usage)
    assert usage is not None
    # Envoy added it to the body (the authorizer decided the request).
    sent = Mock(stack.ports.mock).last()
    assert json.loads(sent["body"])["stream_options"] == {"include_usage": True}
    assert "x-gateway-stream-usage" not in sent["headers"]
    assert ext_proc_messages(stack) == messages_before
    eventually(
        lambda: counter(redis_server, "meter", "output_tokens") - before == usage.completion_tokens,
        "the stream was not settled from its usage chunk",
    )


def test_under_service_the_budget_is_settled_when_the_caller_has_the_end(
    stack: Stack, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    """accounting: service holds the answer's end until the service has settled it, so a
    caller who reads its budget right after the answer sees it settled; under envoy the
    access log settles it a flush later. (Were the report lost, the access log would
    still settle it, but only after the end.)"""
    meter = client(stack, "meter")
    for stream in (False, True):
        before = counter(redis_server, "meter", "output_tokens")
        messages = [{"role": "user", "content": "one two three four five"}]
        if stream:
            chunks = list(
                meter.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
            )
            usage = chunks[-1].usage
        else:
            usage = meter.chat.completions.create(model="gpt-4o-mini", messages=messages).usage
        assert usage is not None

        expected = before + usage.completion_tokens

        def settled(expected: int = expected) -> bool:
            return counter(redis_server, "meter", "output_tokens") == expected

        if answer_reported(request):
            assert settled(), f"stream={stream}: not settled when the answer ended"
        else:
            eventually(settled, f"stream={stream}: never settled")


def test_a_stream_handed_to_ext_proc_settles_from_its_ticket_and_drops_a_forged_mark(
    stack: Stack, raw: Http, redis_server: RedisServer
) -> None:
    """stream_options to merge: handed to ext_proc, which merges it, drops the client's copy
    of the mark before Envoy's Lua filter could act on it (it would add a second member),
    and hands the answer to Envoy with a ticket in its own metadata namespace (with two
    replicas, the one Envoy's log stream reaches settles it)."""
    before = counter(redis_server, "pool", "total_tokens")
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": False},
    }
    # Not the meter team: its answer settles a moment later, from the access log, and
    # must not move the counters the tests after this one read.
    status, _, answer = post_chat(raw, body, "sk-test-pool", {"x-gateway-stream-usage": "include"})
    assert status == 200
    sent = Mock(stack.ports.mock).last()
    assert sent["body"].count("stream_options") == 1
    assert json.loads(sent["body"])["stream_options"] == {"include_usage": True}
    assert "x-gateway-stream-usage" not in sent["headers"]
    [usage] = [
        event["usage"]
        for line in answer.decode().splitlines()
        if line.startswith("data: {") and (event := json.loads(line[6:])).get("usage")
    ]
    eventually(
        lambda: counter(redis_server, "pool", "total_tokens") - before == usage["total_tokens"],
        "the stream ext_proc handed to Envoy was not settled from its usage chunk",
    )


def test_anthropic_answers_are_lifted_too(
    stack: Stack, raw: Http, redis_server: RedisServer
) -> None:
    upstream = Mock(stack.ports.mock)
    body = {
        "model": "claude-3-5-haiku",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "alpha beta gamma"}],
    }
    for stream in (False, True):
        before = meter_counters(redis_server)
        status, _, answer = raw.request(
            "POST",
            "/v1/messages",
            json.dumps({**body, "stream": stream}).encode(),
            {
                "x-api-key": "sk-test-meter",
                "content-type": "application/json",
                # 10 prompt tokens read from Anthropic's prompt cache, 7 written to it, 4
                # of them to its 1-hour cache (billed at twice the input price).
                "x-mock-cache-tokens": "10,7,4",
            },
        )
        assert status == 200, answer
        sent = json.loads(upstream.last()["body"])
        assert sent["stream"] is stream
        prompt = anthropic_prompt_usage(answer, stream)
        assert (prompt["cache_read_input_tokens"], prompt["cache_creation_input_tokens"]) == (10, 7)
        assert prompt["cache_creation"]["ephemeral_1h_input_tokens"] == 4
        # Cache reads and writes are prompt tokens Anthropic counts apart: both charged,
        # each at its own price (budget_policy.yaml: 0.08 read, 1.00 written, 0.8 input;
        # 1.60 for a 1-hour write, twice the input by default).
        charged = prompt["input_tokens"] + 10 + 7
        haiku = Price.from_usd(input="0.8", cached_input="0.08", cache_write="1.0", output="4")
        usd = cost_micro_usd(haiku, charged, 10, 3, 7, 4)
        assert usd > cost_micro_usd(haiku, charged, 10, 3, 7)  # what the 1-hour part adds

        def settled(
            start: dict[str, int] = before, expected: int = charged, dollars: int = usd
        ) -> bool:
            now = meter_counters(redis_server)
            return (
                now["output_tokens"] - start["output_tokens"],
                now["input_tokens"] - start["input_tokens"],
                now["usd"] - start["usd"],
            ) == (3, expected, dollars)

        eventually(
            settled, f"the Anthropic answer (stream={stream}) was not settled from its usage"
        )


def anthropic_prompt_usage(answer: bytes, stream: bool) -> dict[str, int]:
    """The prompt's usage an Anthropic answer reports: the body's, or ``message_start``'s."""
    if not stream:
        return dict(json.loads(answer)["usage"])
    [start] = [
        event["message"]["usage"]
        for line in answer.decode().splitlines()
        if line.startswith("data: {") and (event := json.loads(line[6:]))["type"] == "message_start"
    ]
    return dict(start)


def test_client_abort_mid_stream_settles_from_what_was_sent(
    stack: Stack, redis_server: RedisServer
) -> None:
    before = counter(redis_server, "abort", "total_tokens")
    prompt = abandon_stream(stack.ports.gateway, "sk-test-abort")
    # The caller left after ~10 events and no usage arrived: the reservation (prompt +
    # 200) is replaced by the prompt plus an estimate from the bytes Envoy sent.
    eventually(
        lambda: counter(redis_server, "abort", "total_tokens") - before < prompt + 200,
        "the reservation was never settled",
        seconds=10,
    )
    # ~10 events of 100+ bytes each were sent: more than 5 tokens' worth at 64 bytes each.
    assert counter(redis_server, "abort", "total_tokens") - before >= prompt + 5


@pytest.mark.parametrize(
    ("when", "control", "events"),
    [
        ("before the answer", ("x-mock-latency-ms", "1500"), 0),
        ("mid-stream", ("x-mock-chunk-delay-ms", "40"), 1),
    ],
)
def test_a_caller_who_leaves_is_settled_and_reported_once(
    stack: Stack, audit: Path, when: str, control: tuple[str, str], events: int
) -> None:
    """Envoy logs every exchange whose caller left, and the access log settles and reports
    it (an answer is marked only once its report, at its end, was settled): one audit
    record each, whether the caller leaves before the answer or in the middle of it."""
    request_id = f"leaves-{when.replace(' ', '-')}-{time.monotonic_ns()}"
    # Before the answer: leave once the authorizer has decided (the upstream still waits).
    linger = 0.3 if not events else 0.0
    headers = (("x-request-id", request_id), control)
    abandon_stream(stack.ports.gateway, "sk-test-abort", events, headers, linger)

    def reported() -> list[dict[str, Any]]:
        return [r for r in audit_records(audit) if r["request_id"] == request_id]

    eventually(lambda: bool(reported()), f"no audit record for a caller who left {when}", 10)
    time.sleep(0.3)  # a second report would come within a log flush (50 ms) or two
    [record] = reported()
    assert record["usage_source"] == "estimate" and record["budget"] == "reserved"
    if not events:
        # No answer: the prompt is charged, none of the 200 output tokens reserved.
        assert record["output_tokens"] == 0


def test_an_upstream_error_releases_the_reservation(
    raw: Http, audit: Path, redis_server: RedisServer
) -> None:
    before = counter(redis_server, "meter", "output_tokens")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    status, headers, _ = post_chat(raw, body, "sk-test-meter", {"x-mock-status": "503"})
    assert status == 503
    request_id = headers["x-request-id"]

    def reported() -> list[dict[str, Any]]:
        return [r for r in audit_records(audit) if r["request_id"] == request_id]

    eventually(lambda: bool(reported()), "no audit record for the failed call")
    time.sleep(0.3)  # a second report would come within a log flush (50 ms) or two
    [record] = reported()
    assert record["status"] == 503 and record["output_tokens"] == 0
    # The 200 output tokens reserved for it were given back.
    assert counter(redis_server, "meter", "output_tokens") == before


def test_an_answer_past_the_buffer_is_a_502_charged_up_to_the_reserved_output(
    raw: Http, audit: Path, redis_server: RedisServer
) -> None:
    """Held whole for its usage, an answer over 8 MiB cannot pass: Envoy's own 500,
    which its ``local_reply_config`` makes a 502 in the caller's dialect that the SDKs
    do not retry. The provider billed it, and no usage was read: it is charged its
    prompt and, from its size, the output reserved for it (the policy's 200 tokens)."""
    before = meter_counters(redis_server)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    status, headers, answer = post_chat(raw, body, "sk-test-meter", PAST_THE_BUFFER)
    assert status == 502 and headers["x-should-retry"] == "false"
    assert json.loads(answer)["error"]["code"] == "upstream_answer_too_large"
    request_id = headers["x-request-id"]

    def reported() -> list[dict[str, Any]]:
        return [r for r in audit_records(audit) if r["request_id"] == request_id]

    eventually(lambda: bool(reported()), "no audit record for the answer past the buffer")
    [record] = reported()
    assert record["status"] == 502 and record["error"] == "upstream_answer_too_large"
    assert record["input_tokens"] > 0 and record["output_tokens"] == 200
    eventually(
        lambda: (
            charged_since(redis_server, before)
            == {
                "input_tokens": record["input_tokens"],
                "output_tokens": 200,
                "requests": 1,
                "usd": record["cost_micro_usd"],
            }
        ),
        "the answer past the buffer was not charged as recorded",
    )


def test_a_budget_store_outage_is_refused_in_the_callers_dialect(
    stack: Stack, redis_server: RedisServer
) -> None:
    """fail_closed: Envoy would take a 503 from the HTTP authorizer for the authorizer
    failing and drop its body, so the authorizer hands the request to ext_proc, whose
    refusal reaches the caller as sent."""
    before = ext_proc_messages(stack)
    redis_server.kill()
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            client(stack, "meter").chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=5
            )
    finally:
        redis_server.start()
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "budget_store_unavailable"  # type: ignore[index]
    assert ext_proc_messages(stack) > before  # handed over
    # Back to normal once the store's probe (backing off up to 2 s) finds Redis again.

    def admitted() -> bool:
        try:
            client(stack, "meter").chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "ping"}], max_tokens=5
            )
        except openai.InternalServerError:
            return False
        return True

    eventually(admitted, "requests were still refused after Redis came back", seconds=10)


@pytest.fixture(scope="module")
def unreachable_reports(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """accounting: service with the Lua filter reporting answers to a port nothing listens
    on: every report fails."""
    tmp = tmp_path_factory.mktemp("unreachable-reports")
    policy = tmp / "policy.yaml"
    text = POLICY.read_text().replace("settings:\n", "settings:\n  accounting: service\n")
    policy.write_text(text)
    config = GATEWAY_CONFIG.read_text()
    call = 'handle:httpCall("extproc_authz"'
    assert config.count(call) == 1
    config = config.replace(call, 'handle:httpCall("nowhere"')
    ports = Ports.free()
    nowhere = Ports.free(avoid=ports)  # held until chosen, then released: nothing listens
    config = with_cluster(config, "nowhere", nowhere.authz, grpc=False)
    setting = Stack(
        policy=policy,
        ports=ports,
        log_dir=tmp,
        redis_url=redis_server.url,
        serve_args=("--audit-file", str(tmp / "audit.jsonl")),
        envoy_config=tmp / "gateway-reports-unreachable.yaml",
    )
    setting.envoy_config.write_text(config)
    with running(setting) as stack:
        yield stack


def test_an_answer_whose_report_failed_is_settled_from_the_access_log(
    unreachable_reports: Stack,
) -> None:
    """The request was admitted and has gone up: the caller gets its answer, and the
    access log, seeing a ticket without the answered mark, settles and reports it from
    the same lifted usage."""
    stack = unreachable_reports
    reply = client(stack, "meter").chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "read me"}], max_tokens=20
    )
    assert reply.http_response.status_code == 200
    request_id = reply.headers["x-request-id"]
    assert stack.log_dir is not None
    audit = stack.log_dir / "audit.jsonl"

    def reported() -> list[dict[str, Any]]:
        return [r for r in audit_records(audit) if r["request_id"] == request_id]

    eventually(lambda: bool(reported()), "the unreported answer was never settled", 10)
    [record] = reported()
    assert record["status"] == 200 and record["usage_source"] == "provider"
    assert record["output_tokens"] == reply.parse().usage.completion_tokens


def access_log_records(stack: Stack) -> int:
    """Records Envoy's gRPC access log has written (sent or buffered)."""
    url = f"http://127.0.0.1:{stack.ports.envoy_admin}/stats?filter=grpc_access_log"
    with urllib.request.urlopen(url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(int(line.rsplit(":", 1)[1]) for line in lines if "logs_written" in line)


def test_a_reported_answer_has_no_access_log_record(
    stack: Stack, request: pytest.FixtureRequest
) -> None:
    """Only what the access log must settle goes to it: an answer reported before its end
    (marked) has no record; under accounting: envoy each exchange has one."""
    before = access_log_records(stack)
    client(stack, "meter").chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=5
    )
    time.sleep(0.2)  # a record would be written when the exchange ends
    expected = 0 if answer_reported(request) else 1
    assert access_log_records(stack) - before == expected
