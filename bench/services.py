"""The processes a benchmark run starts, how long each took to be ready, and stopping them.

The gateway (Envoy + service + our mock upstream) is the project's own
:class:`extproc.stack.Stack`, run on free ports with a config from :mod:`bench.envoy_configs`;
everything else (the ``direct_response`` upstream, the aiohttp mock measured against it,
the service alone for its start-up time, LiteLLM) is a :class:`Process` started here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import envoy_configs, payloads, procstat
from bench.scenarios import Route, Scenario
from extproc.stack import Ports, Stack, envoy_binary

IDLE_POLICY = Path(__file__).resolve().parent / "policies" / "s3-identity-rbac.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    """One child process with an HTTP readiness URL; ``ready_seconds`` is measured on start."""

    name: str
    argv: list[str]
    ready_url: str
    log_dir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    ready_seconds: float = 0.0

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} is not running"
        return self.popen.pid

    def start(self, timeout: float = 60.0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{self.name}.log").open("wb")
        started = time.monotonic()
        self.popen = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            cwd=Path(__file__).resolve().parent.parent,
        )
        while not http_ok(self.ready_url):
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}: {self.tail()}"
                )
            if time.monotonic() - started > timeout:
                self.stop()
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s: {self.tail()}")
            time.sleep(0.01)
        self.ready_seconds = time.monotonic() - started

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def tail(self, lines: int = 30) -> str:
        path = self.log_dir / f"{self.name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextmanager
def running(process: Process, cpus: Sequence[int] | None = None) -> Iterator[Process]:
    process.start()
    try:
        if cpus:
            procstat.pin(process.pid, cpus)
        yield process
    finally:
        process.stop()


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def upstream_envoy(log_dir: Path) -> Process:
    """Envoy answering with fixed bodies (``direct_response``), one worker thread."""
    port, admin = free_port(), free_port()
    config = log_dir / "upstream-envoy.yaml"
    log_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(envoy_configs.upstream(port, admin))
    argv = [
        envoy_binary(),
        "-c",
        str(config),
        "--concurrency",
        "1",
        "--log-level",
        "warn",
        "--disable-hot-restart",
    ]
    proc = Process("upstream-envoy", argv, f"http://127.0.0.1:{admin}/ready", log_dir)
    proc.env = {"BENCH_PORT": str(port)}
    return proc


def mock_upstream(log_dir: Path) -> Process:
    """The project's aiohttp mock upstream (echoes the prompt), for comparison."""
    port = free_port()
    argv = [sys.executable, "-m", "extproc", "mock-upstream", "--port", str(port)]
    proc = Process("mock-upstream", argv, f"http://127.0.0.1:{port}/healthz", log_dir)
    proc.env = {"BENCH_PORT": str(port)}
    return proc


def port_of(process: Process) -> int:
    return int(process.env["BENCH_PORT"])


def service_alone(
    policy: Path, log_dir: Path, redis_url: str | None, workers: int = 1, name: str = "service"
) -> Process:
    """``extproc serve`` on free ports: its start-up time is ``ready_seconds`` after start;
    :func:`port_of` gives its HTTP authorizer's port."""
    admin, authz = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "extproc",
        "serve",
        "--policy",
        str(policy),
        "--grpc",
        f"127.0.0.1:{free_port()}",
        "--authz",
        f"127.0.0.1:{authz}",
        "--admin-port",
        str(admin),
        "--workers",
        str(workers),
        # Requests sent straight to its authorizer leave answers waiting for access-log
        # records that never come: do not wait long for them when stopping.
        "--grace",
        "2",
        *(["--redis-url", redis_url] if redis_url else []),
    ]
    return Process(
        name, argv, f"http://127.0.0.1:{admin}/healthz", log_dir, {"BENCH_PORT": str(authz)}
    )


@dataclass
class Gateway:
    """A running :class:`Stack` and what the measurements read from it."""

    stack: Stack

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.stack.ports.gateway}{path}"

    @property
    def envoy_pid(self) -> int:
        return self.stack.processes["envoy"].pid

    @property
    def service_pids(self) -> list[int]:
        """The service process and its workers (``--workers N``), parents first."""
        return procstat.tree(self.stack.processes["extproc"].pid)

    def envoy_counters(self, contains: str = "ext_proc") -> dict[str, int]:
        """Envoy's counters whose name contains ``contains`` (admin ``/stats``)."""
        url = f"http://127.0.0.1:{self.stack.ports.envoy_admin}/stats?filter={contains}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        counters: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                counters[name] = int(value)
        return counters


@contextmanager
def gateway(
    scenario: Scenario,
    upstream_port: int,
    log_dir: Path,
    cpus: Sequence[int] | None,
    redis_url: str | None,
    workers: int = 1,
) -> Iterator[Gateway]:
    """The project's stack for ``scenario``: Envoy (config derived from the shipped one,
    pointed at ``upstream_port``) and the service with the scenario's policy."""
    assert scenario.route is not Route.UPSTREAM
    log_dir.mkdir(parents=True, exist_ok=True)
    template = log_dir / "gateway-template.yaml"
    template.write_text(
        envoy_configs.gateway(
            upstream_port,
            ext_proc=scenario.route is Route.GATEWAY,
            passthrough_route=scenario.path.startswith(payloads.PASSTHROUGH_PREFIX),
        )
    )
    # Scenario 1 has no policy: Envoy never calls the service, which idles beside it.
    policy = scenario.policy or IDLE_POLICY
    stack = Stack(
        policy=policy,
        ports=Ports.free(),
        envoy_config=template,
        log_dir=log_dir,
        workers=workers,
        redis_url=redis_url if scenario.redis or workers > 1 else None,
        # One worker thread per core it is given: two on one pinned core take turns on it.
        envoy_concurrency=len(cpus) if cpus else None,
        serve_args=("--audit-file", str(log_dir / "audit.jsonl")) if scenario.audit else (),
    )
    stack.start()
    try:
        if cpus:
            for name in ("envoy", "extproc"):
                procstat.pin(stack.processes[name].pid, cpus)
        yield Gateway(stack)
    finally:
        stack.stop()
