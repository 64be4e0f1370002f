"""The ``extproc`` command's environment defaults and its admin API client."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from extproc import cli
from extproc.admin.v1 import admin_pb2, admin_pb2_grpc
from extproc.stack import ROOT

EXAMPLE = str(ROOT / "policies" / "example.yaml")


def _parse(*argv: str) -> Any:
    return cli._parser().parse_args(list(argv))


@pytest.mark.parametrize(
    ("variable", "value", "option"),
    [
        ("EXTPROC_ADMIN_PORT", "abc", "--admin-port"),
        ("EXTPROC_WORKERS", "two", "--workers"),
    ],
)
def test_a_bad_number_in_the_environment_fails_serve_alone_with_exit_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    option: str,
) -> None:
    """Read while the parser was built, it once stopped every command with a traceback."""
    monkeypatch.setenv(variable, value)
    assert cli.main(["check", EXAMPLE]) == 0
    with pytest.raises(SystemExit) as exited:
        _parse("serve")
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        f"extproc serve: error: argument {option}: invalid int value: '{value}' (from ${variable})"
    )


def test_a_bad_number_on_the_command_line_is_not_blamed_on_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXTPROC_ADMIN_PORT", "9999")
    assert _parse("serve").admin_port == 9999
    with pytest.raises(SystemExit):
        _parse("serve", "--admin-port", "x")
    assert capsys.readouterr().err.strip().endswith("argument --admin-port: invalid int value: 'x'")


@pytest.mark.parametrize(
    "variable",
    [
        "REDIS_URL",
        "EXTPROC_AUDIT_FILE",
        "EXTPROC_AUDIT_REDIS_STREAM",
        "EXTPROC_OTLP_ENDPOINT",
        "EXTPROC_GRPC",
        "EXTPROC_ADMIN_PORT",
        "EXTPROC_WORKERS",
    ],
)
def test_an_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    """Compose and Helm render an unset variable as an empty one: ``REDIS_URL=`` was
    refused as a URL, ``EXTPROC_AUDIT_FILE=`` as the directory ``.``."""
    monkeypatch.delenv(variable, raising=False)
    unset = vars(_parse("serve"))
    monkeypatch.setenv(variable, "")
    assert vars(_parse("serve")) == unset
    assert unset["redis_url"] is None and unset["audit_file"] is None


@pytest.mark.parametrize("grace", ["-1", "nan", "inf", "soon"])
def test_a_grace_that_is_no_duration_is_refused(
    capsys: pytest.CaptureFixture[str], grace: str
) -> None:
    """Negative, the supervisor killed its workers at once instead of letting them drain."""
    with pytest.raises(SystemExit) as exited:
        _parse("serve", f"--grace={grace}")
    assert exited.value.code == 2
    assert (
        f"argument --grace: must be seconds, 0 or more (got '{grace}')" in capsys.readouterr().err
    )
    assert _parse("serve", "--grace", "0").grace == 0.0


@pytest.mark.parametrize("level", ["verbose", "NOTSET", "warn"])
def test_an_unknown_log_level_stops_with_exit_2(
    level: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The levels the message lists are the ones taken: not Python's other names for
    them, nor ``NOTSET`` (every library's every record)."""
    monkeypatch.setenv("EXTPROC_LOG_LEVEL", level)
    with pytest.raises(SystemExit) as exited:
        cli._logging()
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "extproc: EXTPROC_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL "
        f"(got {level!r})\n"
    )


def test_serve_with_a_bad_environment_says_so_in_one_line() -> None:
    """The whole command, as an operator runs it: one line, exit 2, no traceback."""
    for variable, value in (("EXTPROC_ADMIN_PORT", "abc"), ("EXTPROC_LOG_LEVEL", "verbose")):
        result = subprocess.run(
            [sys.executable, "-m", "extproc", "serve", "--policy", EXAMPLE],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", variable: value},
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert variable in result.stderr.strip().splitlines()[-1]  # after argparse's usage


class _Admin(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    """Records the authorization each call carries."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []

    def GetUsage(self, request: Any, context: grpc.ServicerContext) -> Any:
        metadata = dict(context.invocation_metadata())
        self.authorizations.append(metadata.get("authorization", ""))
        return admin_pb2.GetUsageResponse()


@pytest.fixture
def admin() -> Iterator[tuple[_Admin, int]]:
    servicer = _Admin()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


def test_usage_remote_strips_the_token_as_the_service_does(
    admin: tuple[_Admin, int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Secret file's newline (what secretKeyRef gives) made gRPC refuse the header."""
    servicer, port = admin
    monkeypatch.setenv("EXTPROC_ADMIN_TOKEN", " s3cret\n")
    assert cli.main(["usage", "--remote", f"127.0.0.1:{port}"]) == 0, capsys.readouterr().err
    assert servicer.authorizations == ["Bearer s3cret"]
    assert capsys.readouterr().out.strip() == "no budgets configured"
