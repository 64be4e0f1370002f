"""One scenario's figures: a series of wrk runs with the kernel's CPU accounting around each.

For every run the harness samples ``utime + stime`` of each accounted group of processes
(the service and its workers, the gateway Envoy, Redis, a peer proxy) and Envoy's ext_proc
counters before and after, so each run carries its own CPU per request and gRPC messages
per request. The runs of a scenario, in order:

    warm-up                                  not reported
    concurrency 1                            latency with nothing queued
    concurrency sweep (e.g. 2, 4, 8)         the latency/throughput curve (chart)
    concurrency N ("load")                   throughput at fixed concurrency
    paced, e.g. 300 requests/s, three times  latency at a given load, below saturation
                                             (the run with the median p99 is reported)
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from bench import load as wrk
from bench.load import Load, LoadResult
from bench.procstat import CoreTimes, CpuSample

Counters = Callable[[], Mapping[str, int]]


@dataclass(frozen=True, slots=True)
class Plan:
    """How long and how hard each run of a scenario is."""

    warmup_s: int = 1
    c1_s: int = 5
    sweep: tuple[int, ...] = (2, 4, 8)
    sweep_s: int = 2
    load_connections: int = 16
    load_s: int = 6
    paced_rate: float = 300.0
    paced_connections: int = 8
    paced_s: int = 6
    paced_repeats: int = 3
    """Paced runs per scenario; the one with the median p99 is reported as ``paced``. A
    single 6 s run's p99 (its 18th-slowest request) moves several-fold with what else the
    shared machine is doing; the median of three is steadier."""
    profile_s: int = 6
    workers_connections: int = 32

    def runs(self) -> list[tuple[str, Load]]:
        return [
            ("c1", Load(1, self.c1_s)),
            *((f"c{c}", Load(c, self.sweep_s)) for c in self.sweep),
            ("load", Load(self.load_connections, self.load_s)),
            ("paced", Load(self.paced_connections, self.paced_s, self.paced_rate)),
        ]


FULL = Plan()
QUICK = Plan(
    warmup_s=1, c1_s=2, sweep=(4,), sweep_s=2, load_s=3, paced_s=3, paced_repeats=1, profile_s=3
)


@dataclass(frozen=True, slots=True)
class Target:
    """Where to send the scenario's request, and whose CPU to account."""

    url: str
    body: bytes
    headers: Mapping[str, str]
    groups: Mapping[str, Sequence[int]] = field(default_factory=dict)
    """Accounted processes by group name (``service``, ``envoy``, ``redis``, ...)."""
    counters: Counters | None = None
    """Envoy's ext_proc counters, when the request crosses the ext_proc filter."""
    server_cpus: Sequence[int] = ()
    """The cores the measured processes are pinned to, whose busy and stolen time each run
    reports: what else ran there (Redis, interrupts, other work on a shared machine)."""


@dataclass(frozen=True, slots=True)
class Run:
    name: str
    load: Load
    result: LoadResult
    cpu_us_per_request: dict[str, float]
    """CPU microseconds per completed request, by accounted group."""
    cpu_share: dict[str, list[float]]
    """Each group's CPU split over its processes (fractions; workers' balance)."""
    per_request: dict[str, float]
    """Envoy counter increments per completed request (e.g. ext_proc messages)."""
    repeats_p99: tuple[float, ...] = ()
    """For the paced run: the p99 of each repeat, in the order they ran."""
    server_core: dict[str, float] = field(default_factory=dict)
    """Shares of the run's wall time on the server cores: ``busy`` (anything), ``other``
    (busy, not in a measured process other than Redis), ``steal`` (the hypervisor's)."""

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "load": {
                "connections": self.load.connections,
                "seconds": self.load.seconds,
                "rate": self.load.rate,
            },
            "result": self.result.as_dict(),
            "cpu_us_per_request": {k: round(v, 1) for k, v in self.cpu_us_per_request.items()},
            "cpu_share": self.cpu_share,
            "per_request": {k: round(v, 3) for k, v in self.per_request.items()},
            **({"repeats_p99": list(self.repeats_p99)} if self.repeats_p99 else {}),
            **({"server_core": self.server_core} if self.server_core else {}),
        }


class BadAnswer(RuntimeError):
    """A load run saw errors or non-2xx answers: its figures would be meaningless."""


def measured(target: Target, name: str, load: Load, client_cpus: Sequence[int]) -> Run:
    """One wrk run with CPU and counters sampled around it."""
    pids = [pid for group in target.groups.values() for pid in group]
    counters_before = dict(target.counters()) if target.counters else {}
    cpu_before = CpuSample.take(pids)
    cores_before, started = CoreTimes.take(target.server_cpus), time.monotonic()
    result = wrk.run(target.url, target.body, load, target.headers, client_cpus)
    used = CpuSample.take(pids).since(cpu_before)
    cores = CoreTimes.take(target.server_cpus).since(cores_before)
    wall = (time.monotonic() - started) * max(1, len(target.server_cpus))
    counters_after = dict(target.counters()) if target.counters else {}
    if not result.ok:
        raise BadAnswer(
            f"{name}: {result.non_2xx} non-2xx answers, {result.socket_errors} socket errors "
            f"in {result.requests} requests"
        )
    per_group = {g: sum(used.get(p, 0.0) for p in pids_) for g, pids_ in target.groups.items()}
    shares = {
        g: [round(used.get(p, 0.0) / per_group[g], 3) if per_group[g] else 0.0 for p in pids_]
        for g, pids_ in target.groups.items()
        if len(pids_) > 1
    }
    pinned = sum(seconds for group, seconds in per_group.items() if group != "redis")
    server_core = (
        {
            "busy": round(cores.busy / wall, 3),
            "other": round(max(0.0, cores.busy - pinned) / wall, 3),
            "steal": round(cores.steal / wall, 3),
        }
        if target.server_cpus
        else {}
    )
    return Run(
        name=name,
        load=load,
        result=result,
        server_core=server_core,
        cpu_us_per_request={g: s * 1e6 / result.requests for g, s in per_group.items()},
        cpu_share=shares,
        per_request={
            _short(k): (counters_after.get(k, 0) - v) / result.requests
            for k, v in counters_before.items()
            if k.endswith(("streams_started", "stream_msgs_sent", "stream_msgs_received"))
        },
    )


def series(target: Target, plan: Plan, client_cpus: Sequence[int]) -> list[Run]:
    """Warm up, then every run of ``plan`` in order."""
    wrk.run(
        target.url,
        target.body,
        Load(plan.load_connections, plan.warmup_s),
        target.headers,
        client_cpus,
    )
    runs = [measured(target, name, load, client_cpus) for name, load in plan.runs()]
    paced = [run for run in runs if run.name == "paced"]
    if paced:
        for _ in range(plan.paced_repeats - 1):
            paced.append(measured(target, "paced", paced[0].load, client_cpus))
        runs = [run for run in runs if run.name != "paced"] + [median_paced(paced)]
    return runs


def median_paced(runs: Sequence[Run]) -> Run:
    """The run with the median p99, named ``paced``, carrying every run's p99 (``repeats``)."""
    ordered = sorted(runs, key=lambda run: run.result.latency.p99)
    middle = ordered[(len(ordered) - 1) // 2]
    return replace(middle, repeats_p99=tuple(run.result.latency.p99 for run in runs))


def check(target: Target, expect_budget_headers: bool, stream: bool) -> str:
    """Send the request once and verify the answer is what the scenario claims to measure."""
    request = urllib.request.Request(
        target.url, data=target.body, headers=dict(target.headers), method="POST"
    )
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            status, headers, body = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        raise BadAnswer(f"{target.url}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
    if status != 200:
        raise BadAnswer(f"{target.url}: HTTP {status}")
    notes = [f"HTTP {status} {headers.get('content-type', '')}"]
    if stream:
        events = body.count(b"data: ")
        if not body.rstrip().endswith(b"data: [DONE]"):
            raise BadAnswer(f"{target.url}: the stream did not end with [DONE]")
        notes.append(f"{events} SSE events")
    elif b'"choices"' not in body:
        raise BadAnswer(f"{target.url}: not a chat completion: {body[:200]!r}")
    budget = [h for h in headers if h.lower().startswith("x-ratelimit-")]
    if expect_budget_headers and not budget:
        raise BadAnswer(f"{target.url}: no x-ratelimit-* headers: budgets did not run")
    if budget:
        notes.append(f"{len(budget)} x-ratelimit-* headers")
    return ", ".join(notes)


def _short(counter: str) -> str:
    """``http.gateway.ext_proc.stream_msgs_sent`` -> ``ext_proc.stream_msgs_sent``."""
    return counter[counter.index("ext_proc") :] if "ext_proc" in counter else counter
