"""`make up`'s stack (extproc/stack.py) leaves nothing running when it cannot start."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from extproc import stack
from extproc.stack import Ports, Stack

pytestmark = pytest.mark.e2e


def test_without_envoy_nothing_is_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `pip install -e .` without the envoy extra: four children were left on their
    ports, and the next `make up` failed on them."""

    def no_envoy() -> str:
        raise FileNotFoundError("envoy: not installed")

    monkeypatch.setattr(stack, "envoy_binary", no_envoy)
    up = Stack(
        policy=stack.ROOT / "policies" / "example.yaml", ports=Ports.free(), log_dir=tmp_path
    )
    with pytest.raises(FileNotFoundError):
        up.start()
    assert up.processes == {}


def test_a_child_that_cannot_start_stops_the_others(tmp_path: Path) -> None:
    """The service cannot take its port: the mocks and the MCP demo started before it
    were left running."""
    ports = Ports.free()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports.grpc))
        taken.listen()
        up = Stack(policy=stack.ROOT / "policies" / "example.yaml", ports=ports, log_dir=tmp_path)
        with pytest.raises(RuntimeError, match="extproc exited"):
            up.start()
    assert {"mock", "extproc"} <= set(up.processes)
    assert all(proc.poll() is not None for proc in up.processes.values())
    assert not up.ready
