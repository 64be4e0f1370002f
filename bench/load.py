"""The load generator: wrk, driven with ``bench/wrk/request.lua``, and its output parsed.

wrk is a C event loop, so the client spends little of the CPU being measured; it runs with
one thread, pinned (``taskset``) to the core the harness gives the client. Two shapes of load:

* closed loop: ``connections`` requests in flight, each sent as soon as the previous one on
  its connection answered - throughput at fixed concurrency, and latency at concurrency 1;
* paced: ``rate`` requests per second on a fixed schedule (the Lua ``delay()`` hook), for
  latency at a given load rather than at saturation.

The report is parsed from the ``BENCH-JSON`` line the script's ``done()`` prints (exact
microseconds); wrk's own text report is the fallback, so output recorded from a plain
``wrk --latency`` run parses too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

LUA_SCRIPT = Path(__file__).resolve().parent / "wrk" / "request.lua"
JSON_PREFIX = "BENCH-JSON "


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed something this module cannot read."""


@dataclass(frozen=True, slots=True)
class Load:
    connections: int
    seconds: int
    rate: float = 0.0
    """Requests per second on a fixed schedule; 0 means as fast as the server answers."""

    @property
    def label(self) -> str:
        paced = f" @ {self.rate:g}/s" if self.rate else ""
        return f"c={self.connections}{paced}, {self.seconds}s"


@dataclass(frozen=True, slots=True)
class Latency:
    """Latency in milliseconds."""

    p50: float
    p75: float
    p90: float
    p99: float
    p999: float | None
    max: float
    mean: float


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    seconds: float
    latency: Latency
    non_2xx: int
    socket_errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.non_2xx == 0 and self.socket_errors == 0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "rps": round(self.rps, 1)}


def wrk_argv(
    url: str,
    body_file: Path,
    load: Load,
    headers: Mapping[str, str],
    cpus: Sequence[int] | None = None,
) -> list[str]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise WrkError("wrk is not installed: apt-get install -y wrk")
    pinned = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
    return [
        *pinned,
        wrk,
        "-t1",
        f"-c{load.connections}",
        f"-d{load.seconds}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(body_file),
        f"{load.rate:g}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]


@dataclass
class Running:
    """A wrk run in the background (for profiling the server while it is under load)."""

    process: subprocess.Popen[str]
    body_file: Path
    seconds: int

    def wait(self) -> LoadResult:
        try:
            stdout, stderr = self.process.communicate(timeout=self.seconds + 60)
        finally:
            self.body_file.unlink(missing_ok=True)
        if self.process.returncode != 0:
            raise WrkError(f"wrk exited {self.process.returncode}: {stderr.strip() or stdout}")
        return parse(stdout)


def start(
    url: str,
    body: bytes,
    load: Load,
    headers: Mapping[str, str],
    cpus: Sequence[int] | None = None,
) -> Running:
    """Start wrk; :meth:`Running.wait` returns its parsed report."""
    with tempfile.NamedTemporaryFile(prefix="bench-body-", suffix=".json", delete=False) as file:
        file.write(body)
    argv = wrk_argv(url, Path(file.name), load, headers, cpus)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return Running(process, Path(file.name), load.seconds)


def run(
    url: str,
    body: bytes,
    load: Load,
    headers: Mapping[str, str],
    cpus: Sequence[int] | None = None,
) -> LoadResult:
    """Run wrk once and return its parsed report; raises :class:`WrkError` on failure."""
    return start(url, body, load, headers, cpus).wait()


def parse(output: str) -> LoadResult:
    """A wrk report: the script's ``BENCH-JSON`` line if present, else wrk's text."""
    for line in output.splitlines():
        if line.startswith(JSON_PREFIX):
            return _from_json(json.loads(line[len(JSON_PREFIX) :]))
    return _from_text(output)


def _from_json(data: dict[str, object]) -> LoadResult:
    lat = data["latency_us"]
    errors = data["errors"]
    assert isinstance(lat, dict) and isinstance(errors, dict)

    def ms(key: str) -> float:
        return float(lat[key]) / 1000.0

    duration = data["duration_us"]
    requests = data["requests"]
    assert isinstance(duration, int | float) and isinstance(requests, int)
    return LoadResult(
        requests=requests,
        seconds=duration / 1e6,
        latency=Latency(
            p50=ms("p50"),
            p75=ms("p75"),
            p90=ms("p90"),
            p99=ms("p99"),
            p999=ms("p99.9"),
            max=ms("max"),
            mean=ms("mean"),
        ),
        non_2xx=int(errors["status"]),
        socket_errors=sum(int(errors[k]) for k in ("connect", "read", "write", "timeout")),
    )


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_DURATION = r"([\d.]+)(us|ms|s|m)"


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def _from_text(output: str) -> LoadResult:
    """wrk's plain ``--latency`` report (percentiles rounded to wrk's display units)."""
    summary = re.search(r"(\d+) requests in " + _DURATION, output)
    if summary is None:
        raise WrkError(f"not a wrk report:\n{output}")
    percentiles = {
        float(p): _ms(v, u)
        for p, v, u in re.findall(r"^\s+([\d.]+)%\s+" + _DURATION + r"\s*$", output, re.M)
    }
    stats = re.search(r"Latency\s+" + _DURATION + r"\s+" + _DURATION + r"\s+" + _DURATION, output)
    if stats is None or not {50.0, 75.0, 90.0, 99.0} <= percentiles.keys():
        raise WrkError(f"wrk report without --latency percentiles:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return LoadResult(
        requests=int(summary.group(1)),
        seconds=_ms(summary.group(2), summary.group(3)) / 1000.0,
        latency=Latency(
            p50=percentiles[50.0],
            p75=percentiles[75.0],
            p90=percentiles[90.0],
            p99=percentiles[99.0],
            p999=None,
            max=_ms(stats.group(5), stats.group(6)),
            mean=_ms(stats.group(1), stats.group(2)),
        ),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in sockets.groups()) if sockets else 0,
    )
