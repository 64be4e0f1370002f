"""Suite-wide set-up: a Redis for the budget tests, whatever the machine runs.

``EXTPROC_TEST_REDIS_URL`` wins; otherwise the machine's Redis on 127.0.0.1:6379 (db 15)
if it answers; otherwise a private ``redis-server`` on a free port for this session, so
``make test`` needs nothing running beforehand.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _private_redis() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "the budget tests need Redis: install redis-server or set EXTPROC_TEST_REDIS_URL"
        )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    workdir = tempfile.mkdtemp(prefix="extproc-suite-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
    )
    atexit.register(proc.terminate)
    deadline = time.monotonic() + 10
    while not _answers(port):
        if time.monotonic() > deadline:
            raise RuntimeError("private redis-server did not start")
        time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0"


if "EXTPROC_TEST_REDIS_URL" not in os.environ:
    os.environ["EXTPROC_TEST_REDIS_URL"] = (
        "redis://127.0.0.1:6379/15" if _answers(6379) else _private_redis()
    )


@pytest.fixture(scope="module")
def cluster_server() -> Iterator[RedisServer]:
    """A private single-node Redis Cluster holding every slot, for one test module."""
    spawned = RedisServer(cluster=True)
    spawned.start()
    yield spawned
    spawned.stop()
