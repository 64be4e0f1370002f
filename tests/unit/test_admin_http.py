"""The admin port (/healthz, /metrics) on its own HTTP server, over a real socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter

from extproc import admin_http, http_server
from extproc.policy.store import PolicyStore
from tests.unit.http_client import read_answers

State = dict[str, object]


class Probe:
    """What readiness answers; ``fail`` makes it raise."""

    def __init__(self) -> None:
        self.state: State = {"ready": True, "workers": 1}
        self.fail = False

    async def __call__(self) -> State:
        if self.fail:
            raise RuntimeError("store probe broke")
        return self.state


Admin = tuple[http_server.Server, Probe, PolicyStore]


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nmodels: { gpt-4o-mini: {} }\n")
    policies = PolicyStore(path)
    registry = CollectorRegistry()
    Counter("extproc_test_things", "Things.", registry=registry).inc(3)
    probe = Probe()
    server = await admin_http.start("127.0.0.1", 0, policies, probe, registry)
    yield server, probe, policies
    server.close()


async def ask(port: int, *requests: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(requests))
    try:
        return await read_answers(reader, len(requests))
    finally:
        writer.close()


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nhost: admin\r\n{extra}\r\n".encode()


async def test_healthz_reports_readiness_and_the_policy_version(admin: Admin) -> None:
    server, probe, policies = admin
    [(status, headers, body)] = await ask(server.port, get("/healthz"))
    assert status == 200 and headers["content-type"] == "application/json"
    state = orjson.loads(body)
    assert state["ready"] is True and state["policy_version"] == policies.current.version

    probe.state = {"ready": False, "budget_store": "unreachable"}
    [(status, _, body)] = await ask(server.port, get("/healthz?verbose=1"))
    assert status == 503 and orjson.loads(body)["budget_store"] == "unreachable"


async def test_metrics_are_the_registry_and_the_policy_state(admin: Admin) -> None:
    server, _, policies = admin
    [(status, headers, body)] = await ask(server.port, get("/metrics"))
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert "extproc_test_things_total 3.0" in text
    assert f'extproc_policy_info{{version="{policies.current.version}"}} 1.0' in text


async def test_head_answers_without_a_body_and_the_connection_stays_framed(
    admin: Admin,
) -> None:
    server, _, _ = admin
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(get("/healthz", "HEAD") + get("/healthz"))
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    assert head.startswith("HTTP/1.1 200 OK\r\n")
    assert int(head.split("content-length: ")[1].split("\r\n")[0]) > 0
    # The next bytes are the GET's answer, not a body of the HEAD's.
    assert await reader.readexactly(9) == b"HTTP/1.1 "
    head, body = (await reader.readuntil(b"\r\n\r\n")), await reader.read(1)
    writer.close()
    assert head.startswith(b"200 OK\r\n") and body == b"{"


async def test_other_paths_and_methods_are_refused_in_json(admin: Admin) -> None:
    server, _, _ = admin
    missing, wrong = await ask(server.port, get("/admin"), get("/metrics", "DELETE"))
    assert missing[0] == 404 and orjson.loads(missing[2]) == {"error": "not found"}
    assert orjson.loads(wrong[2]) == {"error": "use GET or HEAD"}
    assert wrong[0] == 405 and wrong[1]["allow"] == "GET, HEAD"


async def test_a_failing_probe_is_a_500_and_the_port_keeps_serving(admin: Admin) -> None:
    server, probe, _ = admin
    probe.fail = True
    failed, scraped = await ask(server.port, get("/healthz"), get("/metrics"))
    assert failed[0] == 500 and orjson.loads(failed[2]) == {"error": "internal error"}
    assert scraped[0] == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n", id="garbage"),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nx-never-ends: " + b"a" * (admin_http.MAX_REQUEST_BYTES + 1),
            id="endless-header",
        ),
        pytest.param(
            get("/healthz", "POST", f"content-length: {admin_http.MAX_REQUEST_BYTES + 1}\r\n")
            + b"a" * (admin_http.MAX_REQUEST_BYTES + 1),
            id="too-large-body",
        ),
    ],
)
async def test_an_unreadable_request_is_a_400_and_the_connection_closes(
    admin: Admin, request_bytes: bytes
) -> None:
    server, _, _ = admin
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request_bytes)
    answer = await asyncio.wait_for(reader.read(), 5)  # to the end: closed by the server
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b'{"error":"unreadable or too large HTTP request"}')


async def test_connection_close_is_honoured_after_the_answer(admin: Admin) -> None:
    server, _, _ = admin
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(get("/healthz", extra="connection: close\r\n"))
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"}")
