"""The service process itself: gRPC health, graceful SIGTERM, workers, policy hot reload."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import orjson
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.stack import ROOT, Ports, Stack, running
from tests.e2e.conftest import ADMIN_KEY, EXAMPLE_POLICY, RESTRICTED_KEY, policy_copy
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e


def serve_argv(policy: Path, ports: Ports, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "extproc", "serve",
        "--policy", str(policy),
        "--grpc", f"127.0.0.1:{ports.grpc}",
        "--authz", f"127.0.0.1:{ports.authz}",
        "--admin-port", str(ports.admin),
        "--reload-interval", "0.2",
        *args,
    ]  # fmt: skip


def serve(
    policy: Path, ports: Ports, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        serve_argv(policy, ports, *args),
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports.admin}/healthz") as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise TimeoutError(proc.communicate()[0].decode())


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Ports]]:
    ports = Ports.free()
    proc = serve(policy_copy(tmp_path), ports)
    yield proc, ports
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def headers_request(path: str, key: str) -> pb.ProcessingRequest:
    values = [(":path", path), (":method", "POST"), ("authorization", f"Bearer {key}")]
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values])
        )
    )


def body_request(payload: object) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(
        request_body=pb.HttpBody(body=orjson.dumps(payload), end_of_stream=True)
    )


async def test_grpc_health_reports_serving(service: tuple[subprocess.Popen[bytes], Ports]) -> None:
    _, ports = service
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_sigterm_lets_in_flight_stream_finish(
    service: tuple[subprocess.Popen[bytes], Ports],
) -> None:
    proc, ports = service
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(headers_request("/v1/chat/completions", ADMIN_KEY))
        first = await call.read()
        assert first.WhichOneof("response") == "request_headers"

        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)  # the server is now draining
        await call.write(
            body_request({"model": "mini", "messages": [{"role": "user", "content": "x"}]})
        )
        second = await call.read()
        await call.done_writing()
        assert second.WhichOneof("response") == "request_body"
        mutation = second.request_body.response.body_mutation.body
        assert orjson.loads(mutation)["model"] == "gpt-4o-mini-2024-07-18"

        # New streams are refused while draining.
        with pytest.raises(grpc.aio.AioRpcError):
            fresh = pb_grpc.ExternalProcessorStub(channel).Process()
            await fresh.write(headers_request("/v1/chat/completions", ADMIN_KEY))
            await fresh.read()
    assert proc.wait(timeout=20) == 0


def test_policy_reload_keeps_last_good(
    tmp_path: Path, service: tuple[subprocess.Popen[bytes], Ports]
) -> None:
    proc, ports = service
    policy = tmp_path / "policy.yaml"

    def version() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.admin}/healthz") as resp:
            return str(json.load(resp)["policy_version"])

    before = version()
    policy.write_text(policy.read_text() + "\n# an edit\n")
    deadline = time.monotonic() + 10
    while version() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    changed = version()
    assert changed != before

    policy.write_text("teams: {broken: {models: {allow: 1}}}\n")
    time.sleep(1.0)
    assert version() == changed
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=20)[0].decode()
    assert "policy reload rejected" in output
    assert "teams.broken.models.allow" in output


def test_reload_changes_access_through_envoy(tmp_path: Path) -> None:
    policy = policy_copy(tmp_path)
    with running(Stack(policy=policy, ports=Ports.free(), log_dir=tmp_path / "logs")) as stack:
        url = f"http://127.0.0.1:{stack.ports.gateway}/v1/models"

        def models() -> set[str]:
            req = urllib.request.Request(url, headers={"authorization": f"Bearer {RESTRICTED_KEY}"})
            with urllib.request.urlopen(req) as resp:
                return {m["id"] for m in json.load(resp)["data"]}

        assert models() == {"gpt-4o-mini"}
        text = policy.read_text().replace('allow: ["gpt-4o-mini"]\n', 'allow: ["*"]\n')
        policy.write_text(text)
        deadline = time.monotonic() + 10
        while models() == {"gpt-4o-mini"} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert models() == {"gpt-4o-mini", "claude-3-5-haiku"}


def test_workers_share_the_port(tmp_path: Path) -> None:
    ports = Ports.free()
    redis = os.environ["EXTPROC_TEST_REDIS_URL"]
    proc = serve(policy_copy(tmp_path), ports, "--workers", "2", "--redis-url", redis)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.admin}/healthz") as resp:
            health = json.load(resp)
        assert health["workers"] == 2 and health["ready"]
        children = set(
            subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
            ).stdout.split()
        )
        deadline = time.monotonic() + 20
        while len(listeners := _listening_pids(ports.grpc)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(listeners) == 2 and listeners <= children
        with grpc.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        # Each refusal goes over its own connection, so the kernel spreads them over both
        # workers; the supervisor's /metrics adds up what each worker counted.
        refusals = 12
        for _ in range(refusals):
            with grpc.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
                stream = pb_grpc.ExternalProcessorStub(channel).Process(
                    iter([headers_request("/v1/chat/completions", "sk-not-a-key")])
                )
                answer = next(iter(stream))
                assert answer.immediate_response.status.code == 401
        # A worker counts a refusal as its stream ends, just after answering: poll.
        deadline = time.monotonic() + 10
        while (counted := _refusals_counted(ports)) < refusals and time.monotonic() < deadline:
            time.sleep(0.1)
        assert counted == refusals
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


async def test_every_worker_stops_at_once_when_their_supervisor_is_killed(
    tmp_path: Path,
) -> None:
    """A supervisor killed outright must not leave workers serving its ports. Every worker
    notices at once and drains (here each with a stream open for its whole --grace): not
    one after the other, as when each one's pipe to the supervisor was held open by the
    workers forked after it (the last of three went at three times the grace)."""
    ports = Ports.free()
    redis = os.environ["EXTPROC_TEST_REDIS_URL"]
    grace = 2.0
    # A killed supervisor cannot remove its temporary directories: keep them in tmp_path.
    proc = serve(
        policy_copy(tmp_path), ports, "--workers", "3", "--grace", str(grace),
        "--redis-url", redis, env={"TMPDIR": str(tmp_path)},
    )  # fmt: skip
    listeners: set[str] = set()
    held: list[tuple[grpc.aio.Channel, object]] = []
    try:
        _until(lambda: len(_listening_pids(ports.grpc)) == 3, 20)
        listeners = _listening_pids(ports.grpc)
        assert len(listeners) == 3
        await _hold_a_stream_on_each(ports.grpc, listeners, held)
        proc.kill()
        proc.wait(timeout=10)
        killed = time.monotonic()
        _until(lambda: not any(map(_alive, listeners)), 4 * grace)
        took = time.monotonic() - killed
        assert not any(map(_alive, listeners))
        assert took < 2 * grace
        assert not _listening_pids(ports.grpc)
    finally:
        for channel, _ in held:
            await channel.close()
        proc.kill()
        for pid in filter(_alive, listeners):
            os.kill(int(pid), signal.SIGKILL)


async def _hold_a_stream_on_each(
    port: int, pids: set[str], held: list[tuple[grpc.aio.Channel, object]]
) -> None:
    """Open ext_proc streams, each on a connection of its own (the kernel spreads them over
    the workers), until every process of ``pids`` serves one; they stay open, waiting for
    a body, in ``held``."""
    for _ in range(64):
        if pids <= _connected_pids(port):
            return
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        held.append((channel, call))  # a call collected is cancelled
        await call.write(headers_request("/v1/chat/completions", ADMIN_KEY))
        await call.read()
    assert pids <= _connected_pids(port)


def _until(condition: Callable[[], bool], seconds: float) -> None:
    """Poll ``condition`` until it holds or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def _connected_pids(port: int) -> set[str]:
    """Processes holding an accepted connection on ``port``."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"sport = :{port}"],
        capture_output=True,
        text=True,
    )
    return set(re.findall(r"pid=(\d+)", out.stdout))


def _read_until(proc: subprocess.Popen[bytes], text: str) -> None:
    """Read the service's output until a line with ``text`` (it logs as it goes)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if text in line.decode():
            return
    raise AssertionError(f"the service exited without logging {text!r}")


def test_sigterm_finishes_a_check_whose_body_is_still_arriving(tmp_path: Path) -> None:
    """Envoy sent the check before the SIGTERM; its body takes several reads to arrive. It
    is in flight: answered (and the connection then closed), not reset."""
    ports = Ports.free()
    proc = serve(policy_copy(tmp_path), ports, "--grace", "3")
    try:
        body = orjson.dumps(
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 200_000}]}
        )
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n"
            f"authorization: Bearer {ADMIN_KEY}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", ports.authz), timeout=10) as sock:
            sock.sendall(head + body[:1000])
            time.sleep(0.2)  # read by the service
            proc.send_signal(signal.SIGTERM)
            _read_until(proc, "stopping: draining")
            # Closed in the same step as the idle connections: this one's shutdown began.
            _until(lambda: not _listening_pids(ports.authz), 5)
            assert not _listening_pids(ports.authz)
            sock.sendall(body[1000:])
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 200
            assert response.getheader("connection") == "close"
            response.read()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


async def test_streams_that_outlast_the_grace_leave_the_access_log_time_to_drain(
    tmp_path: Path,
) -> None:
    """An ext_proc stream open past --grace: the access-log streams still end by draining
    what Envoy sent (not cancelled with it at the end of the grace, their buffered
    records lost), and the warning counts the stream still open."""
    ports = Ports.free()
    proc = serve(policy_copy(tmp_path), ports, "--grace", "2")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
            stream = pb_grpc.ExternalProcessorStub(channel).Process()
            await stream.write(headers_request("/v1/chat/completions", ADMIN_KEY))
            await stream.read()  # open, waiting for a body that never comes
            records = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs()
            await records.write(als_pb2.StreamAccessLogsMessage())
            await asyncio.sleep(0.2)  # read by the service
            proc.send_signal(signal.SIGTERM)
            reply = await asyncio.wait_for(records, 10)  # ended by the service, not cancelled
            assert isinstance(reply, als_pb2.StreamAccessLogsResponse)
        output = proc.communicate(timeout=20)[0].decode()
        assert "stopping with 1 streams and 0 checks open" in output
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_workers_health_follows_the_shared_budget_store(tmp_path: Path) -> None:
    """With --workers, /healthz probes the Redis the workers share, as one worker does."""
    redis = RedisServer()
    redis.start()
    ports = Ports.free()
    proc = serve(policy_copy(tmp_path), ports, "--workers", "2", "--redis-url", redis.url)
    try:
        redis.stop()  # fail_closed (the example's default): no admission, so not ready
        status, health = 0, {}
        deadline = time.monotonic() + 10
        while status != 503 and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports.admin}/healthz") as resp:
                    status, health = resp.status, json.load(resp)
            except urllib.error.HTTPError as error:
                status, health = error.code, json.load(error)
            time.sleep(0.1)
        assert status == 503
        assert health["budget_store"] == "unreachable" and health["workers"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def _refusals_counted(ports: Ports) -> float:
    """The 401s counted by all workers, as the supervisor's /metrics adds them up."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.admin}/metrics") as resp:
        exposition = resp.read().decode()
    counted = re.findall(
        r'^extproc_requests_total\{[^}]*status="401"[^}]*\} (\S+)$', exposition, re.M
    )
    return sum(float(n) for n in counted)


def _alive(pid: str) -> bool:
    """Running: neither gone nor a zombie (orphans' parent here may not reap them)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _listening_pids(port: int) -> set[str]:
    """Processes with a listening socket on ``port`` (SO_REUSEPORT gives one each)."""
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True)
    return set(re.findall(r"pid=(\d+)", out.stdout))


def extproc_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m extproc ARGS`` from the project root, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_a_password_in_a_redis_url_is_never_printed() -> None:
    result = extproc_cli(
        "serve", "--policy", "/nonexistent.yaml", "--redis-url", "redis//:hunter2@host:6379/0"
    )
    assert result.returncode == 2 and "hunter2" not in result.stderr


def test_a_second_service_on_the_same_ports_refuses_to_start(tmp_path: Path) -> None:
    """A lone process does not share its ports (SO_REUSEPORT is for one supervisor's
    workers): a stale second instance would have split Envoy's calls between two policies."""
    ports = Ports.free()
    first = serve(EXAMPLE_POLICY, ports)
    try:
        other = Ports.free(avoid=ports)
        for taken in (replace(other, grpc=ports.grpc), replace(other, authz=ports.authz)):
            result = extproc_cli(*serve_argv(EXAMPLE_POLICY, taken)[3:])  # after "-m extproc"
            assert result.returncode == 1, result.stderr
            assert "cannot start" in result.stderr and "Traceback" not in result.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.admin}/healthz") as resp:
            assert resp.status == 200  # the first one serves on
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)


def test_missing_policy_file_fails_clearly(tmp_path: Path) -> None:
    result = extproc_cli("serve", "--policy", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    assert "cannot start, the policy is invalid" in result.stderr
    assert "cannot read" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--redis-cluster"], "--redis-cluster needs --redis-url"),
        (["--redis-url", "redis://127.0.0.1:1/0", "--redis-prefix", "a{b}"], "without braces"),
        (["--workers", "2"], "--workers 2 needs a budget store the workers share"),
        (["--audit-redis-stream", "audit"], "--audit-redis-stream needs --redis-url"),
        (["--authz", "nocolon"], "--authz must be HOST:PORT"),
        (["--grpc", "127.0.0.1:99999"], "--grpc must be HOST:PORT"),
        (["--redis-url", "notaurl"], "--redis-url must be a redis://"),
        (["--reload-interval", "0"], "--reload-interval must be more than 0"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--audit-file", "/"], "it is a directory"),
        (["--audit-file", "/nonexistent/dir/audit.jsonl"], "no directory"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_the_policy_is_read(
    flags: list[str], message: str
) -> None:
    """Exit 2 with what to change, at once: the policy (here a file that does not exist)
    is not even read."""
    result = extproc_cli(
        "serve",
        "--policy",
        "/nonexistent.yaml",
        *flags,
        env={k: v for k, v in os.environ.items() if k != "REDIS_URL"},
    )
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--redis-url", "notaurl"], "--redis-url must be a redis://"),
        (["--redis-url", "redis://127.0.0.1:1/0", "--redis-prefix", "a{b}"], "without braces"),
    ],
)
def test_usage_refuses_a_redis_it_cannot_open_with_a_clear_error(
    flags: list[str], message: str
) -> None:
    result = extproc_cli("usage", "--policy", "policies/example.yaml", *flags)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_usage_reads_a_policy_whose_provider_keys_are_not_here() -> None:
    """An operator's workstation has Redis access, not the production provider keys:
    `extproc usage` reads only the limits (the k8s policy names OPENAI_API_KEY)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "REDIS_URL")
    }
    redis_url = os.environ.get("EXTPROC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    result = extproc_cli(
        "usage", "--policy", "deploy/k8s/policy/policy.yaml", "--redis-url", redis_url, "--json",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)


def test_a_stdout_audit_pipe_nobody_reads_does_not_keep_the_service_alive(
    tmp_path: Path,
) -> None:
    """The log collector stopped reading: records then wait on a full pipe. The service
    must still drain, count what it could not write, and exit on SIGTERM (a write stuck in
    the default executor's thread once kept it alive after it logged "stopped")."""
    ports = Ports.free()
    log_file = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        serve_argv(EXAMPLE_POLICY, ports, "--audit-stdout", "--grace", "1"),
        cwd=ROOT,
        # Python's stdout buffered, as it is unless PYTHONUNBUFFERED is set: a write
        # blocked there would hold the lock the interpreter's exit needs.
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
        stdout=subprocess.PIPE,  # never read: it fills
        stderr=log_file,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports.admin}/healthz"):
                    break
            except OSError:
                time.sleep(0.05)
        refused = 0
        with grpc.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            for _ in range(600):  # one audit record each, far more than a pipe holds
                stream = stub.Process(iter([headers_request("/v1/chat/completions", "sk-no")]))
                refused += next(iter(stream)).immediate_response.status.code == 401
        assert refused == 600
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
    assert "stopped" in (tmp_path / "serve.log").read_text()
