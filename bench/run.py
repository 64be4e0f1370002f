"""``python -m bench.run [--quick] [--peers] [--only 0,3,5]``: run the benchmark, write results.

Order of a run (``--quick`` shortens every step to a few seconds):

1. the upstream: our aiohttp mock and an Envoy ``direct_response`` listener, each measured
   directly (JSON and 50-chunk SSE answers); the faster serves every later scenario;
2. scenarios 0-6 (:mod:`bench.scenarios`), each on a fresh stack: a check request, then the
   load series (:mod:`bench.measure`), a py-spy profile for scenarios 5 and 7, peak RSS, and
   the service's start-up time with that policy;
3. ``--workers 1`` vs ``--workers 2`` on scenario 5 (the full policy, decided by the HTTP
   authorizer, answers reported to it);
4. with ``--peers``, LiteLLM proxy in its two database-free modes (:mod:`bench.peers`).

Results go to ``bench/results/<date>-<host>[-quick].{md,json,png}``; the table is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from bench import load as wrk
from bench import machine, measure, payloads, peers, procstat, profile, report, services
from bench.load import Load
from bench.measure import Plan, Target
from bench.scenarios import Route, Scenario, by_key

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
LOGS = BENCH / ".logs"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
"""Database 14 of the local Redis: away from the tests' database 15 and from db 0."""
PROFILED = ("5", "7")
WORKERS_SCENARIO = "5"
"""Compared with --workers 1 and 2: the full policy under the default accounting. Not 7:
under ``accounting: envoy`` each Envoy worker's access-log stream is one gRPC stream on one
connection, which lands on one service worker, so the settlements did not spread (the
workers' CPU split 40/60 to 31/69 across runs). Answer reports are HTTP/1.1 requests on
many connections, spread by the kernel like the checks."""

Doc = dict[str, Any]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Layout:
    """Which cores the client side and the measured server side may use."""

    client: tuple[int, ...] | None
    server: tuple[int, ...] | None

    @classmethod
    def detect(cls) -> Layout:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            return cls(None, None)
        return cls((cores[0],), tuple(cores[1:]))

    def as_dict(self) -> Doc:
        if self.client is None or self.server is None:
            text = "one core: nothing pinned, client and server compete"
        else:
            c, s = _cores(self.client), _cores(self.server)
            text = (
                f"{c}: wrk (1 thread) and the upstream Envoy; {s}: the gateway Envoy and the "
                f"service (or LiteLLM). Scenario 0 puts the upstream on {s}. The workers "
                f"comparison lets the gateway and the service use every core. Redis is the "
                f"machine's own and is not pinned."
            )
        return {"client": self.client, "server": self.server, "text": text}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    plan = measure.QUICK if args.quick else measure.FULL
    scenarios = by_key(args.only)
    layout = Layout.detect()
    redis_url = os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    _preflight(redis_url, args.peers)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    suffix = "-quick" if args.quick else ""
    log_dir = LOGS / stamp
    doc: Doc = {
        "meta": {**machine.describe(redis_url), "quick": args.quick},
        "plan": asdict(plan),
        "layout": layout.as_dict(),
        "request": {
            "bytes": payloads.REQUEST_BYTES,
            "path": payloads.CHAT_PATH,
            "model": payloads.MODEL,
            "prompt_words": payloads.PROMPT_WORDS,
        },
        "scenarios": [],
        "notes": _notes(plan),
    }
    errors: list[str] = []
    started = time.monotonic()
    envoy_upstream = services.upstream_envoy(log_dir)
    mock_upstream = services.mock_upstream(log_dir)
    with (
        services.running(envoy_upstream, layout.server),
        services.running(mock_upstream, layout.server),
    ):
        upstream = _choose_upstream(doc, (envoy_upstream, mock_upstream), plan, layout, errors)
        upstream_port = services.port_of(upstream)
        if layout.client:
            procstat.pin(upstream.pid, layout.client)
        for scenario in scenarios:
            _log(f"scenario {scenario.key}: {scenario.title}")
            result = _guarded(
                errors, scenario.key, _scenario,
                scenario, upstream, upstream_port, plan, layout, redis_url, log_dir, args, suffix,
            )  # fmt: skip
            if result is not None:
                doc["scenarios"].append(result)
        if not args.no_workers and any(s.key == WORKERS_SCENARIO for s in scenarios):
            doc["workers"] = []
            for n in (1, 2):
                workers = _guarded(
                    errors, f"workers {n}", _workers,
                    n, upstream_port, plan, layout, redis_url, log_dir,
                )  # fmt: skip
                if workers is not None:
                    doc["workers"].append(workers)
        if args.peers:
            doc["meta"]["versions"]["litellm"] = peers.version()
            doc["peers"] = []
            for mode in peers.MODES:
                peer = _guarded(errors, mode.key, _peer, mode, upstream_port, plan, layout, log_dir)
                if peer is not None:
                    doc["peers"].append(peer)
    doc["meta"]["seconds"] = round(time.monotonic() - started)
    end_fingerprint = machine.code_fingerprint()
    if end_fingerprint != doc["meta"]["code_fingerprint"]:
        doc["meta"]["code_fingerprint_end"] = end_fingerprint
        doc["notes"].append(
            f"The service's code changed during this run (fingerprint "
            f"{doc['meta']['code_fingerprint']} at the start, {end_fingerprint} at the end): "
            "others were working in the same tree; later scenarios ran newer code."
        )
    doc["errors"] = errors
    doc["targets"] = report.targets(doc)
    host = str(doc["meta"]["host"])
    paths = report.write(doc, RESULTS, f"{stamp}-{host}{suffix}")
    print(report.markdown(doc))
    _log("wrote " + ", ".join(str(p.relative_to(BENCH.parent)) for p in paths))
    return 1 if errors else 0


# --- steps ---------------------------------------------------------------------------------


def _choose_upstream(
    doc: Doc,
    candidates: tuple[services.Process, services.Process],
    plan: Plan,
    layout: Layout,
    errors: list[str],
) -> services.Process:
    """Measure each upstream directly (JSON and SSE answers); return the faster on JSON."""
    names = {candidates[0].name: "Envoy direct_response", candidates[1].name: "aiohttp mock"}
    short = Plan(
        warmup_s=plan.warmup_s,
        c1_s=plan.c1_s,
        sweep=(),
        sweep_s=0,
        load_connections=plan.load_connections,
        load_s=plan.load_s,
        paced_s=0,
    )
    measured: list[Doc] = []
    for proc in candidates:
        name = names[proc.name]
        for stream in (False, True):
            _log(f"upstream candidate: {name}, {'SSE' if stream else 'JSON'}")
            scenario = Scenario("0", "upstream", "", Route.UPSTREAM, stream=stream)
            target = Target(
                f"http://127.0.0.1:{services.port_of(proc)}{payloads.CHAT_PATH}",
                scenario.body,
                scenario.headers,
                {"upstream": procstat.tree(proc.pid)},
                server_cpus=layout.server or (),
            )
            runs = _guarded(
                errors, f"upstream {name}", _checked_series, target, short, layout, stream
            )
            if runs is not None:
                measured.append(
                    {
                        "key": "0",
                        "upstream": name,
                        "process": proc.name,
                        "answer": "SSE x50" if stream else "JSON",
                        "title": f"{name} ({'SSE' if stream else 'JSON'})",
                        "check": runs[0],
                        "runs": [r.as_dict() for r in runs[1]],
                    }
                )
    doc["upstream_choice"] = measured
    json_rps = {
        c["process"]: report.rps(report.run_of(c, "load")) or 0.0
        for c in measured
        if c["answer"] == "JSON"
    }
    best = max(json_rps, key=lambda k: json_rps[k]) if json_rps else candidates[0].name
    chosen = next(p for p in candidates if p.name == best)
    doc["upstream_chosen"] = names[chosen.name]
    return chosen


def _scenario(
    scenario: Scenario,
    upstream: services.Process,
    upstream_port: int,
    plan: Plan,
    layout: Layout,
    redis_url: str,
    log_dir: Path,
    args: argparse.Namespace,
    suffix: str,
) -> Doc:
    result: Doc = {
        "key": scenario.key,
        "title": scenario.title,
        "measures": scenario.measures,
        "policy": str(scenario.policy.relative_to(BENCH.parent)) if scenario.policy else None,
    }
    if scenario.route is Route.UPSTREAM:
        procstat.pin(upstream.pid, layout.server or ())
        try:
            target = Target(
                f"http://127.0.0.1:{upstream_port}{scenario.path}",
                scenario.body,
                scenario.headers,
                {"upstream": [upstream.pid]},
                server_cpus=layout.server or (),
            )
            result["check"] = measure.check(target, False, scenario.stream)
            result["runs"] = [r.as_dict() for r in _series(target, plan, layout)]
        finally:
            procstat.pin(upstream.pid, layout.client or ())
        return result
    with services.gateway(
        scenario, upstream_port, log_dir / f"s{scenario.key}", layout.server, redis_url
    ) as gw:
        groups = {"envoy": [gw.envoy_pid]}
        if scenario.service:
            groups["service"] = gw.service_pids
        if scenario.redis:
            groups["redis"] = machine.redis_server_pids()
        target = Target(
            gw.url(scenario.path),
            scenario.body,
            scenario.headers,
            groups,
            gw.envoy_counters if scenario.service else None,
            layout.server or (),
        )
        result["check"] = measure.check(target, scenario.redis, scenario.stream)
        result["runs"] = [r.as_dict() for r in _series(target, plan, layout)]
        if scenario.service:
            # Before the profile: py-spy pauses the process 200 times a second, and what
            # piles up meanwhile (Envoy's access-log batches) is not the service's memory.
            result["peak_rss_mb"] = _rss(gw.service_pids)
            result["rss_mb"] = _rss(gw.service_pids, now=True)
        if scenario.service and scenario.key in PROFILED and not args.no_profile:
            result["profile"] = _profile(
                target, gw.service_pids[0], plan, layout, f"profile-{scenario.key}{suffix}", log_dir
            )
        result["envoy_peak_rss_mb"] = round(procstat.peak_rss_bytes(gw.envoy_pid) / 2**20, 1)
    if scenario.service and scenario.policy is not None:
        alone = services.service_alone(
            scenario.policy,
            log_dir / f"s{scenario.key}-ready",
            redis_url if scenario.redis else None,
        )
        with services.running(alone):
            result["ready_s"] = round(alone.ready_seconds, 3)
    return result


def _workers(
    n: int, upstream_port: int, plan: Plan, layout: Layout, redis_url: str, log_dir: Path
) -> Doc:
    scenario = by_key(WORKERS_SCENARIO)[0]
    _log(f"workers: scenario {WORKERS_SCENARIO} with --workers {n}")
    with services.gateway(
        scenario, upstream_port, log_dir / f"workers-{n}", None, redis_url, workers=n
    ) as gw:
        pids = gw.service_pids
        target = Target(
            gw.url(scenario.path),
            scenario.body,
            scenario.headers,
            {"service": pids, "envoy": [gw.envoy_pid]},
            gw.envoy_counters,
        )
        measure.check(target, True, False)
        load = Load(plan.workers_connections, plan.load_s)
        wrk.run(
            target.url,
            target.body,
            Load(load.connections, plan.warmup_s),
            target.headers,
            layout.client,
        )
        run = measure.measured(target, "load", load, layout.client or ())
        _log(f"  {run.result.rps:.0f} req/s, CPU split {run.cpu_share.get('service')}")
        rss = _rss(pids)
        serving = _rss(pids, now=True)
        # Named like the RSS figures (same processes, same order).
        pss = {
            name: round(procstat.pss_bytes(pid) / 2**20, 1)
            for name, pid in zip(rss, pids, strict=True)
        }
    alone = services.service_alone(
        scenario.policy or Path(), log_dir / f"workers-{n}-ready", redis_url, workers=n
    )
    with services.running(alone):
        ready = round(alone.ready_seconds, 3)
        direct = _authorizer_alone(alone, scenario, plan)
    return {
        "key": f"workers-{n}",
        "title": f"--workers {n}",
        "runs": [run.as_dict(), direct.as_dict()],
        "peak_rss_mb": rss,
        "rss_mb": serving,
        "pss_mb": pss,
        "ready_s": ready,
    }


def _authorizer_alone(alone: services.Process, scenario: Scenario, plan: Plan) -> measure.Run:
    """The service's decisions by themselves: wrk sends the scenario's request straight to
    the HTTP authorizer, as Envoy would, so the workers have the cores without Envoy and
    the upstream beside them (wrk and Redis still run on the same cores). No access-log
    record follows, so this leaves out settlement, audit and metrics: about a third of
    the service's work per request in the whole gateway."""
    url = f"http://127.0.0.1:{services.port_of(alone)}{scenario.path}"
    request = urllib.request.Request(url, scenario.body, dict(scenario.headers), method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        if answer.headers.get("x-gateway-processing"):
            raise measure.BadAnswer("the authorizer handed the request to ext_proc")
    groups = {"service": procstat.tree(alone.pid), "redis": machine.redis_server_pids()}
    target = Target(url, scenario.body, scenario.headers, groups)
    load = Load(plan.workers_connections, plan.load_s)
    wrk.run(url, scenario.body, Load(load.connections, plan.warmup_s), scenario.headers)
    run = measure.measured(target, "authorizer", load, ())
    _log(f"  authorizer alone: {run.result.rps:.0f} req/s")
    return run


def _peer(
    mode: peers.PeerMode, upstream_port: int, plan: Plan, layout: Layout, log_dir: Path
) -> Doc:
    _log(f"peer: {mode.title}")
    proc = peers.litellm(upstream_port, mode, log_dir)
    with services.running(proc, layout.server):
        procstat.pin(proc.pid, layout.server or ())
        target = Target(
            f"http://127.0.0.1:{services.port_of(proc)}{payloads.CHAT_PATH}",
            payloads.chat_request(),
            mode.headers,
            {"peer": procstat.tree(proc.pid)},
            server_cpus=layout.server or (),
        )
        check = measure.check(target, False, False)
        runs = _series(target, plan, layout)
        rss = _rss(procstat.tree(proc.pid), names=["peer"])
    return {
        "key": mode.key,
        "title": mode.title,
        "check": check,
        "runs": [r.as_dict() for r in runs],
        "peak_rss_mb": rss,
        "ready_s": round(proc.ready_seconds, 2),
    }


def _profile(target: Target, pid: int, plan: Plan, layout: Layout, stem: str, log_dir: Path) -> Doc:
    """py-spy on ``pid`` while wrk keeps the scenario's load on (not a reported run)."""
    _log(f"  profiling pid {pid} for {2 * plan.profile_s}s")
    svg, raw = RESULTS / f"{stem}.svg", log_dir / f"{stem}.txt"
    running = wrk.start(
        target.url,
        target.body,
        Load(plan.load_connections, 2 * plan.profile_s + 3),
        target.headers,
        layout.client,
    )
    try:
        time.sleep(1)
        profile.record(pid, plan.profile_s, svg, raw)
    finally:
        running.wait()
    summary = profile.summarise(raw.read_text())
    return {**summary.as_dict(), "svg": str(svg.relative_to(BENCH.parent))}


# --- helpers -------------------------------------------------------------------------------


def _checked_series(
    target: Target, plan: Plan, layout: Layout, stream: bool
) -> tuple[str, list[measure.Run]]:
    """The check request, then the c=1 and load runs (no sweep, not paced)."""
    return measure.check(target, False, stream), _series(target, plan, layout, paced=False)


def _series(target: Target, plan: Plan, layout: Layout, paced: bool = True) -> list[measure.Run]:
    runs = (
        measure.series(target, plan, layout.client or ())
        if paced
        else [
            measure.measured(target, name, load, layout.client or ())
            for name, load in plan.runs()
            if name in ("c1", "load")
        ]
    )
    for run in runs:
        r = run.result
        cpu = ", ".join(f"{g} {v:.0f}us" for g, v in run.cpu_us_per_request.items())
        _log(
            f"  {run.name:>5}: {r.rps:7.0f} req/s  p50 {r.latency.p50:7.3f}  "
            f"p99 {r.latency.p99:7.3f} ms  {cpu}"
        )
    return runs


def _rss(pids: list[int], names: list[str] | None = None, now: bool = False) -> dict[str, float]:
    """Peak RSS (MB), or with ``now`` the RSS at this moment, by process: ``service``
    alone, or the supervisor and its workers."""
    if names is None:
        names = ["service"] if len(pids) == 1 else [procstat.role(pid, pids[0]) for pid in pids]
    read = procstat.rss_bytes if now else procstat.peak_rss_bytes
    sizes: dict[str, float] = {}
    for index, (label, pid) in enumerate(zip(names, pids, strict=False)):
        key = label if label not in sizes else f"{label}-{index}"
        sizes[key] = round(read(pid) / 2**20, 1)
    return sizes


def _guarded(errors: list[str], name: str, step: Callable[..., T], *args: Any) -> T | None:
    """Run one step; a failure is recorded and the run goes on with the next step."""
    try:
        return step(*args)
    except Exception as exc:
        _log(f"FAILED {name}: {exc}")
        traceback.print_exc(file=sys.stderr)
        errors.append(f"{name}: {exc}")
        return None


def _preflight(redis_url: str, with_peers: bool) -> None:
    problems = []
    if shutil.which("wrk") is None:
        problems.append("wrk is not installed (apt-get install -y wrk)")
    try:
        profile.py_spy()
    except FileNotFoundError as exc:
        problems.append(str(exc))
    try:
        import redis

        redis.Redis.from_url(redis_url, socket_timeout=2).ping()
    except Exception as exc:
        problems.append(f"Redis at {redis_url} does not answer ({exc}); set BENCH_REDIS_URL")
    if with_peers and not peers.available():
        problems.append(f"LiteLLM is not installed in {peers.VENV} (make bench-peers does it)")
    if problems:
        raise SystemExit("bench: cannot run:\n" + "\n".join(f"  - {p}" for p in problems))


def _notes(plan: Plan) -> list[str]:
    return [
        f"Every scenario sends the same {payloads.REQUEST_BYTES}-byte chat request "
        f'({payloads.PROMPT_WORDS}-word last user message); scenario 6 adds "stream": true '
        "and gets 50 content chunks.",
        f"Paced runs: wrk with a Lua schedule ({plan.paced_connections} connections, one slot "
        f"every 1000/{plan.paced_rate:g} ms); latency counts from the actual send (no "
        "coordinated-omission correction), so the achieved rate is reported beside p99.",
        "CPU per request: utime + stime of the processes in /proc, sampled before and after "
        "each run, divided by completed requests; Redis is shared with other users of the "
        "machine, so its figure is approximate.",
    ]


def _cores(cpus: tuple[int, ...]) -> str:
    return ("core " if len(cpus) == 1 else "cores ") + ",".join(map(str, cpus))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds per step")
    parser.add_argument("--peers", action="store_true", help="also run LiteLLM (bench-peers)")
    parser.add_argument("--only", help="comma-separated scenario keys, e.g. 0,1,5")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy")
    parser.add_argument("--no-workers", action="store_true", help="skip the workers comparison")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
