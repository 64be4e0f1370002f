"""`serve` and `usage` on a Redis Cluster, under a deployment's own key prefix.

Budgets, the ticket key of `accounting: envoy` and the audit stream all go to the cluster
the flags name, under `{acme}:` instead of the default `{budget}:`; `extproc usage` with the
same flags reads what the service counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from extproc.stack import ROOT, Ports, Stack, running
from tests.e2e.test_budgets import POLICY, client
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e

LAYOUT = ("--redis-cluster", "--redis-prefix", "acme")


@pytest.fixture(scope="module")
def stack(cluster_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("layout")
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY.read_text().replace("settings:\n", "settings:\n  accounting: envoy\n"))
    setting = Stack(
        policy=policy,
        ports=Ports.free(),
        log_dir=tmp,
        redis_url=cluster_server.url,
        serve_args=(*LAYOUT, "--audit-redis-stream", "audit"),
    )
    with running(setting) as s:
        yield s


def test_budgets_ticket_key_and_audit_go_to_the_cluster_under_the_prefix(
    stack: Stack, cluster_server: RedisServer
) -> None:
    answer = client(stack, "meter").chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "count me"}], max_tokens=5
    )
    assert answer.usage is not None
    store = redis.Redis.from_url(cluster_server.url)
    deadline = time.monotonic() + 10
    while not store.exists("audit"):  # written once the access-log record settled it
        assert time.monotonic() < deadline, "no audit record reached the cluster's stream"
        time.sleep(0.05)
    keys = {key.decode() for key in store.keys("*")}
    assert "{acme}:ticket-key" in keys
    assert any(key.startswith("{acme}:team:meter:*:output_tokens:month:") for key in keys)
    assert not any(key.startswith("{budget}:") for key in keys)

    command = [sys.executable, "-m", "extproc", "usage", "--policy", str(stack.policy)]
    command += ["--redis-url", cluster_server.url, *LAYOUT, "--team", "meter", "--json"]
    report = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    [output] = [line for line in json.loads(report.stdout) if line["unit"] == "output_tokens"]
    assert output["used"] == str(answer.usage.completion_tokens)
