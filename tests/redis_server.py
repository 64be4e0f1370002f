"""A throwaway ``redis-server`` for tests that must stop, restart or pause Redis."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a valid, free port too.

    Ephemeral ports go up to 60999, so a plain free port breaks the bus one time in five.
    """
    while True:
        port = free_port()
        if port + 10000 <= 65535 and _bindable(port + 10000):
            return port
        port = free_port() - 20000
        if port > 1024 and _bindable(port) and _bindable(port + 10000):
            return port


class RedisServer:
    """A ``redis-server`` child on a fixed port that a test can kill, restart and pause.

    Synchronous (it only waits for a local process); async tests call it via a thread.
    """

    def __init__(self, cluster: bool = False) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed (the test suite needs it)")
        self.port, self.cluster = (cluster_port() if cluster else free_port()), cluster
        self.workdir = Path(tempfile.mkdtemp(prefix="extproc-test-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir)]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        try:
            self._until(lambda: self.ask("PING") == b"+PONG\r\n")
            if self.cluster and b"cluster_state:ok" not in self.ask("CLUSTER INFO"):
                self.ask("CLUSTER ADDSLOTSRANGE 0 16383")
                self._until(lambda: b"cluster_state:ok" in self.ask("CLUSTER INFO"))
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def ask(self, command: str) -> bytes:
        """One inline command over a fresh socket; the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(command.encode() + b"\r\n")
            return sock.recv(65536)

    @staticmethod
    def _until(check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                if check():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not become ready")
            time.sleep(0.02)
