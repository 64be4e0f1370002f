"""What the results were measured on: date, machine, versions, and the code's fingerprint."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import shutil
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from extproc.stack import ROOT, envoy_binary

FINGERPRINTED = ("extproc", "envoy/gateway.yaml", "bench/policies")


def describe(redis_url: str | None) -> dict[str, object]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "virtualisation": _virtualisation(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": _versions(redis_url),
        "code_fingerprint": code_fingerprint(),
    }


def code_fingerprint() -> str:
    """SHA-256 (12 hex) over the service's sources, the gateway config and bench policies:
    the tree changes while others work, so results say which code they measured."""
    digest = hashlib.sha256()
    for entry in FINGERPRINTED:
        base = ROOT / entry
        files = sorted(base.rglob("*")) if base.is_dir() else [base]
        for path in files:
            if path.is_file() and path.suffix in {".py", ".yaml"}:
                digest.update(str(path.relative_to(ROOT)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def redis_server_pids() -> list[int]:
    """Local redis-server processes (their CPU is accounted when budgets use Redis)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() == "redis-server":
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _virtualisation() -> str:
    try:
        cmdline = Path("/proc/cmdline").read_text()
    except OSError:
        return "unknown"
    if "firecracker" in cmdline:
        return "Firecracker microVM" + (" (nested)" if "nested" in cmdline else "")
    return "none detected"


def _versions(redis_url: str | None) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("grpcio", "protobuf", "uvloop", "redis", "orjson"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    versions["envoy"] = _first_match([envoy_binary(), "--version"], r"version: [0-9a-f]+/(\S+?)/")
    if shutil.which("wrk"):
        versions["wrk"] = _first_match(["wrk", "--version"], r"wrk (\S+)")
    if redis_url:
        try:
            import redis

            info = redis.Redis.from_url(redis_url, socket_timeout=2).info("server")
            versions["redis-server"] = str(info.get("redis_version", "?"))
        except Exception:  # a version string is not worth failing the run for
            versions["redis-server"] = "?"
    return versions


def _first_match(argv: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return "?"
    match = re.search(pattern, done.stdout + done.stderr)
    return match.group(1) if match else "?"
