"""Every Envoy YAML we ship is accepted by the real Envoy binary."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
