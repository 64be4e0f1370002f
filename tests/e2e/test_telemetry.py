"""Metrics and the audit log after a scripted mix of traffic through real Envoy."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import yaml

from extproc.admin.v1 import admin_pb2, admin_pb2_grpc
from extproc.budgets.pricing import Price, cost_micro_usd, micro_to_usd
from extproc.stack import ROOT, Ports, Stack, running
from tests.e2e.conftest import ADMIN_KEY, EXAMPLE_POLICY, RESTRICTED_KEY, Http

pytestmark = pytest.mark.e2e

SECRET_EMAIL = "jane.doe.secret@example.org"
TOKEN_ENV = "EXTPROC_TEST_ADMIN_TOKEN"
ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    logs = tmp_path_factory.mktemp("telemetry")
    audit = logs / "audit.jsonl"
    os.environ[TOKEN_ENV] = ADMIN_TOKEN
    stack = Stack(
        policy=EXAMPLE_POLICY,
        ports=Ports.free(),
        log_dir=logs,
        serve_args=("--audit-file", str(audit), "--admin-token-env", TOKEN_ENV),
    )
    with running(stack):
        yield stack, audit


def records(path: Path, at_least: int = 0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= at_least or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def price_of(model: str) -> Price:
    prices = yaml.safe_load(EXAMPLE_POLICY.read_text())["models"][model]["pricing"]
    return Price.from_usd(
        input=str(prices["input"]),
        output=str(prices["output"]),
        cached_input=str(prices.get("cached_input", prices["input"])),
    )


def test_metrics_and_audit_after_a_mix_of_traffic(audited: tuple[Stack, Path]) -> None:
    stack, audit = audited
    url = f"http://127.0.0.1:{stack.ports.gateway}/v1"
    admin = openai.OpenAI(base_url=url, api_key=ADMIN_KEY, max_retries=0)
    usages: list[tuple[str, Any]] = []
    sent = 0

    for model, text in [("gpt-4o", "hello"), ("gpt-4o-mini", f"mail {SECRET_EMAIL} please")]:
        reply = admin.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}]
        )
        usages.append((model, reply.usage))
        sent += 1
    stream = admin.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "a streamed answer of words"}],
        stream=True,
    )
    chunks = list(stream)
    usages.append(("gpt-4o-mini", chunks[-1].usage))
    sent += 1

    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=url, api_key=RESTRICTED_KEY, max_retries=0).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "no"}]
        )
    sent += 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).models.list()
    sent += 1
    capped = openai.OpenAI(base_url=url, api_key="sk-demo-capped", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        for _ in range(10):
            reply = capped.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "story " * 100}],
                max_tokens=200,
            )
            usages.append(("gpt-4o-mini", reply.usage))
            sent += 1
    sent += 1  # the rate-limited one
    status, _, _ = Http(stack.ports.gateway).request(
        "POST",
        "/v1/chat/completions",
        b"{broken",
        {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"},
    )
    assert status == 400
    sent += 1

    found = records(audit, at_least=sent)
    assert len(found) == sent
    assert len({r["request_id"] for r in found}) == sent
    by_status: dict[int, int] = {}
    for record in found:
        by_status[record["status"]] = by_status.get(record["status"], 0) + 1
    assert by_status == {200: len(usages), 403: 1, 401: 1, 429: 1, 400: 1}
    allowed = [r for r in found if r["status"] == 200]
    assert all(r["usage_source"] == "provider" and r["team"] for r in allowed)
    assert {r["error"] for r in found if r["status"] == 429} == {"budget_exceeded"}
    assert sum(r["input_tokens"] for r in allowed) == sum(u.prompt_tokens for _, u in usages)
    raw = audit.read_text()
    for secret in (ADMIN_KEY, RESTRICTED_KEY, "sk-demo-capped", "sk-wrong", SECRET_EMAIL):
        assert secret not in raw
    assert all("prompt" not in r and "answer" not in r for r in found)  # not asked for

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports.admin}/metrics") as resp:
        metrics = resp.read().decode()
    input_total = metric_sum(metrics, "gen_ai_client_token_usage_sum", gen_ai_token_type="input")
    output_total = metric_sum(metrics, "gen_ai_client_token_usage_sum", gen_ai_token_type="output")
    assert input_total == sum(u.prompt_tokens for _, u in usages)
    assert output_total == sum(u.completion_tokens for _, u in usages)
    expected_cost = sum(
        cost_micro_usd(price_of(m), u.prompt_tokens, 0, u.completion_tokens) for m, u in usages
    )
    assert metric_sum(metrics, "extproc_cost_micro_usd_total") == expected_cost
    assert metric_sum(metrics, "extproc_budget_rejections_total", team="capped") == 1
    assert metric_sum(metrics, "extproc_requests_total", status="403") == 1
    assert (
        metric_sum(metrics, "extproc_phase_duration_seconds_count", phase="request_headers") >= sent
    )
    assert re.search(r'^extproc_policy_info\{version="[0-9a-f]{12}"\} 1\.0$', metrics, re.M)

    # The usage API agrees with the metrics: the global daily dollar budget holds every
    # exchange's cost, and the capped team's minute budget every token it used.
    usage = admin_usage(stack)
    (global_usd,) = [b for b in usage if b["scope"] == "global"]
    assert global_usd["used"] == micro_to_usd(int(expected_cost))
    (capped,) = [b for b in usage if b["scope_id"] == "capped"]
    # The capped budget is per minute: count what was recorded in the window it reports
    # (the test may straddle a minute boundary).
    ends = datetime.fromisoformat(capped["resets_at"].replace("Z", "+00:00"))
    in_window = [
        r
        for r in allowed
        if r["team"] == "capped"
        and ends - timedelta(minutes=1)
        <= datetime.fromisoformat(r["time"].replace("Z", "+00:00"))
        < ends
    ]
    assert int(capped["used"]) == sum(r["input_tokens"] + r["output_tokens"] for r in in_window)

    channel = grpc.insecure_channel(f"127.0.0.1:{stack.ports.grpc}")
    stub = admin_pb2_grpc.AdminStub(channel)
    rejected = stub.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(status=429),
        metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
    )
    assert [e.team for e in rejected.events] == ["capped"]
    assert json.loads(rejected.events[0].record_json)["error"] == "budget_exceeded"
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetUsage(admin_pb2.GetUsageRequest(), metadata=[("authorization", "Bearer nope")])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def admin_usage(stack: Stack) -> list[dict[str, Any]]:
    """``extproc usage --remote``: the CLI over the admin API."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "extproc",
            "usage",
            "--remote",
            f"127.0.0.1:{stack.ports.grpc}",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "EXTPROC_ADMIN_TOKEN": ADMIN_TOKEN},
        check=True,
    )
    return list(json.loads(result.stdout))


def test_sigterm_under_load_loses_no_audit_record(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    stack = Stack(
        policy=EXAMPLE_POLICY,
        ports=Ports.free(),
        log_dir=tmp_path / "logs",
        serve_args=("--audit-file", str(audit)),
    )
    with running(stack):
        http = Http(stack.ports.gateway)
        answered: list[tuple[int, str]] = []
        lock = threading.Lock()

        def call(i: int) -> None:
            status, headers, _ = http.post_json(
                "/v1/chat/completions",
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"n{i}"}]},
                **{"x-mock-latency-ms": "600"},
            )
            with lock:
                answered.append((status, headers.get("x-request-id", "")))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)  # all twelve are in flight at the upstream
        stack.processes["extproc"].send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=30)
        assert stack.processes["extproc"].wait(timeout=30) == 0
    ok = {request_id for status, request_id in answered if status == 200}
    assert len(ok) == 12, answered  # in-flight streams were allowed to finish
    logged = [r["request_id"] for r in records(audit, at_least=12)]
    assert sorted(logged) == sorted(ok)


def _one_recorded_chat(tmp_path: Path, edit: Callable[[str], str], content: str) -> Any:
    """One chat through a stack whose policy records bodies (the example, ``edit``-ed):
    the SDK's answer, the audit record, and the audit file's text."""
    audit = tmp_path / "audit.jsonl"
    policy = tmp_path / "policy.yaml"
    text = EXAMPLE_POLICY.read_text().replace(
        "settings:\n", "settings:\n  audit: { record_bodies: true }\n", 1
    )
    policy.write_text(edit(text))
    stack = Stack(
        policy=policy, ports=Ports.free(), log_dir=tmp_path, serve_args=("--audit-file", str(audit))
    )
    with running(stack):
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{stack.ports.gateway}/v1", api_key=ADMIN_KEY, max_retries=0
        )
        answer = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": content}]
        )
        (record,) = records(audit, at_least=1)
    return answer, record, audit.read_text()


def test_bodies_are_recorded_only_when_asked_and_always_redacted(tmp_path: Path) -> None:
    # Let the e-mail reach the provider unmasked: only the audit redaction stands between it
    # and the audit file.
    _, record, written = _one_recorded_chat(
        tmp_path,
        lambda text: text.replace(
            "  - name: mask-pii\n    stage: both\n", "  - name: mask-pii\n    stage: output\n"
        ),
        f"write to {SECRET_EMAIL} now",
    )
    assert record["prompt"] == [
        {"role": "user", "kind": "message", "text": "write to <EMAIL_ADDRESS> now"}
    ]
    assert record["answer"][0]["text"] == "write to <EMAIL_ADDRESS> now"
    assert SECRET_EMAIL not in written


def test_recorded_bodies_hold_the_answer_the_caller_got_and_no_assigned_secret(
    tmp_path: Path,
) -> None:
    """An output rule's rewrite, which the fixed audit redaction knows nothing of, is in the
    recorded answer (it held the provider's text), and so is the redaction of a password
    written as ``password=...`` (an opt-in secret type for prompt rules)."""
    answer, record, written = _one_recorded_chat(
        tmp_path,
        lambda text: text.replace(
            "guardrails:\n",
            "guardrails:\n"
            "  - name: mask-employee-ids\n    stage: output\n    mode: mutate\n"
            "    detector:\n      kind: pii\n      entities: [EMPLOYEE_ID]\n"
            "      custom: [{ name: EMPLOYEE_ID, pattern: 'EMP-[0-9]{6}' }]\n",
            1,
        ),
        "It is EMP-123456, db password=Hunter2Prod9",
    )
    assert answer.choices[0].message.content == "It is <EMPLOYEE_ID>, db password=Hunter2Prod9"
    assert record["answer"][0]["text"] == "It is <EMPLOYEE_ID>, db password=<ASSIGNED_SECRET>"
    # The prompt as the provider got it: the rule reads answers only.
    assert record["prompt"][0]["text"] == "It is EMP-123456, db password=<ASSIGNED_SECRET>"
    assert "Hunter2Prod9" not in written


def test_usage_remote_says_how_to_turn_the_admin_api_on(tmp_path: Path) -> None:
    """``make up`` serves no admin API without a token: the CLI said UNIMPLEMENTED, Method
    not found, and nothing of why."""
    stack = Stack(policy=EXAMPLE_POLICY, ports=Ports.free(), log_dir=tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("EXTPROC_ADMIN_TOKEN", raising=False)
        with running(stack):
            result = _usage_remote(stack)
    assert result.returncode == 1
    assert "started with EXTPROC_ADMIN_TOKEN set" in result.stderr


def _usage_remote(stack: Stack) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", "usage", "--remote", f"127.0.0.1:{stack.ports.grpc}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "EXTPROC_ADMIN_TOKEN"},
    )
