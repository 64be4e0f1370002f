"""Every Envoy YAML we ship is accepted by the real Envoy binary."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from extproc.stack import ROOT, Ports, envoy_binary, render_envoy_config

pytestmark = pytest.mark.e2e

SHIPPED = sorted((ROOT / "envoy").rglob("*.yaml"))
ENVOY_CONFIGS = [p for p in SHIPPED if "static_resources" in p.read_text()]


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_there_are_configs_to_check() -> None:
    assert ROOT / "envoy" / "gateway.yaml" in ENVOY_CONFIGS


@pytest.mark.parametrize("path", ENVOY_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_envoy_accepts_shipped_config(path: Path) -> None:
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_accepts_rendered_test_config(tmp_path: Path) -> None:
    rendered = tmp_path / "gateway.yaml"
    ports = Ports.free()
    rendered.write_text(render_envoy_config((ROOT / "envoy" / "gateway.yaml").read_text(), ports))
    assert f"port_value: {ports.gateway}" in rendered.read_text()
    assert validate(rendered).returncode == 0


def test_envoy_rejects_a_broken_config(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text((ROOT / "envoy" / "gateway.yaml").read_text().replace("SEND", "SENDD", 1))
    assert validate(broken).returncode != 0


def test_envoy_accepts_every_kind_of_rendered_upstream(tmp_path: Path) -> None:
    """TLS to a provider by DNS name, a self-hosted server, fail-over and a canary split."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "teams: { t: {} }\n"
        "upstreams:\n"
        '  openai_api: { url: "https://api.openai.com" }\n'
        '  vllm: { url: "http://vllm.internal:8000", connect_timeout_ms: 500 }\n'
        '  ollama: { url: "http://[::1]:11434" }\n'
        "  chat: { failover: [openai_api, vllm] }\n"
        "  canary: { split: { openai_api: 95, ollama: 5 } }\n"
        "models:\n"
        "  gpt-4o: { backend: { cluster: chat } }\n"
        "  llama: { backend: { cluster: canary, model: llama3 } }\n"
    )
    rendered = tmp_path / "envoy.yaml"
    with rendered.open("w") as out:
        subprocess.run(
            [sys.executable, "-m", "extproc", "envoy-config", str(policy)], stdout=out, check=True
        )
    assert "name: openai_api" in rendered.read_text()
    result = validate(rendered)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("path", "read"),
    [
        ("/v1/chat/completions", lambda a: a["error"]["code"]),
        ("/v1/messages", lambda a: a["type"] == "error" and a["error"]["type"]),
        ("/mcp", lambda a: a["jsonrpc"] == "2.0" and a["error"]["data"]["type"]),
    ],
    ids=["openai", "anthropic", "mcp"],
)
def test_a_gateway_without_its_service_fails_closed_in_the_callers_format(
    tmp_path: Path, path: str, read: Callable[[dict[str, Any]], Any]
) -> None:
    """The service down: Envoy answers 503 itself, in the envelope the caller's SDK reads
    (JSON-RPC's on an MCP path), and nothing goes upstream."""
    ports = Ports.free()
    config = tmp_path / "gateway.yaml"
    config.write_text(render_envoy_config((ROOT / "envoy" / "gateway.yaml").read_text(), ports))
    argv = [envoy_binary(), "-c", str(config), "--log-level", "error", "--disable-hot-restart"]
    envoy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_until_ready(ports.envoy_admin)
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports.gateway}{path}",
            data=b'{"model": "gpt-4o-mini", "jsonrpc": "2.0", "id": 1, "method": "ping"}',
            headers={"authorization": "Bearer sk-demo-admin", "content-type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 503
        answer = json.load(refused.value)
        assert read(answer) in ("service_unavailable", "api_error")
        assert "could not reach a required service" in json.dumps(answer)
    finally:
        envoy.terminate()
        envoy.wait(timeout=30)


def _wait_until_ready(admin_port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
