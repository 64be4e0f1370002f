"""The results document (plain JSON data) rendered as Markdown and a latency/load chart.

Everything here is a pure function of the document ``run.py`` builds, so a recorded
``results/*.json`` renders the same way again (and the unit test renders a small one).
Target verdicts are computed from the document too, by :func:`targets`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Doc = dict[str, Any]

LOAD_RUNS = ("c1", "c2", "c4", "c8", "load")


def write(doc: Doc, directory: Path, stem: str) -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.{ext}" for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps(doc, indent=2) + "\n")
    paths[1].write_text(markdown(doc, chart=paths[2].name))
    chart(doc, paths[2])
    return paths


# --- lookups -------------------------------------------------------------------------------


def run_of(scenario: Doc, name: str) -> Doc | None:
    return next((r for r in scenario.get("runs", []) if r["name"] == name), None)


def scenario_of(doc: Doc, key: str, section: str = "scenarios") -> Doc | None:
    return next((s for s in doc.get(section, []) if s["key"] == key), None)


def latency(run: Doc | None, which: str) -> float | None:
    return None if run is None else float(run["result"]["latency"][which])


def rps(run: Doc | None) -> float | None:
    return None if run is None else float(run["result"]["rps"])


def cpu(run: Doc | None, group: str) -> float | None:
    if run is None:
        return None
    value = run["cpu_us_per_request"].get(group)
    return None if value is None else float(value)


# --- targets -------------------------------------------------------------------------------


FULL_POLICY = ("5", "7")
"""The full-policy scenarios the targets are judged on: 5 (accounting: service, the
default) and 7 (accounting: envoy)."""


def targets(doc: Doc) -> list[Doc]:
    """Each target of the issue: goal, what this run measured, met or not (None: not run)."""
    s1 = scenario_of(doc, "1")
    verdicts: list[Doc] = []

    def add(name: str, goal: str, value: float | None, met: bool | None, detail: str) -> None:
        verdicts.append(
            {"name": name, "goal": goal, "measured": value, "met": met, "detail": detail}
        )

    peer = scenario_of(doc, "litellm-master-key", "peers")
    peer_cpu = cpu(run_of(peer, "load"), "peer") if peer else None
    for key in FULL_POLICY:
        full = scenario_of(doc, key)
        if full is None and key != FULL_POLICY[0]:
            continue
        load = run_of(full, "load") if full else None
        value = cpu(load, "service")
        paced_cpu = cpu(run_of(full, "paced"), "service") if full else None
        add(
            f"service CPU per request, scenario {key}",
            "<= 700 us",
            value,
            None if value is None else value <= 700,
            f"{_num(value)} us under load (c={_conn(load)}), {_num(paced_cpu)} us at the paced "
            "rate",
        )

        added = None
        if s1 and full:
            a, b = latency(run_of(full, "c1"), "p50"), latency(run_of(s1, "c1"), "p50")
            added = None if a is None or b is None else a - b
        add(
            f"added p50 latency, scenario {key} over 1, concurrency 1",
            "<= 1.5 ms",
            added,
            None if added is None else added <= 1.5,
            f"{_num(added, 2)} ms",
        )

        paced = run_of(full, "paced") if full else None
        p99, achieved = latency(paced, "p99"), rps(paced)
        rate = float(paced["load"]["rate"]) if paced else 0.0
        add(
            f"p99 at {rate:g} requests/s, scenario {key}",
            "<= 5 ms",
            p99,
            None if p99 is None or achieved is None else p99 <= 5 and achieved >= 0.95 * rate,
            f"p99 {_num(p99, 2)} ms at {_num(achieved, 0)} requests/s achieved" + _repeats(paced),
        )

        ratio = peer_cpu / value if peer_cpu and value else None
        # Also at one connection, where neither batches anything: under load the service
        # batches its Redis calls and LiteLLM, saturated at ~100 req/s, cannot.
        peer_c1 = cpu(run_of(peer, "c1"), "peer") if peer else None
        value_c1 = cpu(run_of(full, "c1"), "service") if full else None
        ratio_c1 = peer_c1 / value_c1 if peer_c1 and value_c1 else None
        add(
            f"CPU per request vs LiteLLM (master key), scenario {key}",
            ">= 10x less",
            ratio,
            None if ratio is None else ratio >= 10,
            "not measured: run make bench-peers"
            if ratio is None
            else f"LiteLLM {_num(peer_cpu)} us vs service {_num(value)} us: {ratio:.1f}x "
            f"under load (c={_conn(load)}); at c=1 {_num(peer_c1)} vs {_num(value_c1)} us: "
            + (f"{ratio_c1:.1f}x" if ratio_c1 else "—"),
        )

    for field, name, what in (
        ("peak_rss_mb", "peak RSS per worker", "largest VmHWM (start-up included)"),
        ("rss_mb", "RSS per worker after the load runs", "largest VmRSS after the load runs"),
    ):
        rss = [
            mb
            for section in ("scenarios", "workers")
            for s in doc.get(section, [])
            for process, mb in s.get(field, {}).items()
            if process.startswith(("service", "worker"))
        ]
        worst = max(rss) if rss else None
        add(
            name,
            "<= 150 MB",
            worst,
            None if worst is None else worst <= 150,
            f"{what} of any service process in any scenario: {_num(worst)} MB",
        )

    ready = [s["ready_s"] for s in doc.get("scenarios", []) if s.get("ready_s") is not None]
    slowest = max(ready) if ready else None
    add(
        "ready after start",
        "<= 2 s",
        slowest,
        None if slowest is None else slowest <= 2,
        f"slowest policy: {_num(slowest, 2)} s (one worker)",
    )

    one = scenario_of(doc, "workers-1", "workers")
    two = scenario_of(doc, "workers-2", "workers")

    def scaling(run: str) -> tuple[float | None, float | None, float | None]:
        r1 = rps(run_of(one, run)) if one else None
        r2 = rps(run_of(two, run)) if two else None
        return r1, r2, (r2 / r1 if r1 and r2 else None)

    a1, a2, alone = scaling("authorizer")
    g1, g2, whole = scaling("load")
    add(
        "--workers 2 throughput vs 1 (Redis)",
        ">= 1.7x",
        whole,
        None if whole is None else whole >= 1.7,
        f"the whole gateway, which shares the cores with Envoy and the upstream: "
        f"{_num(g1, 0)} -> {_num(g2, 0)} requests/s, {_num(whole, 2)}x; the service's "
        f"decisions alone (wrk to its HTTP authorizer, no settlement): {_num(a1, 0)} -> "
        f"{_num(a2, 0)}, {_num(alone, 2)}x",
    )
    return verdicts


# --- markdown ------------------------------------------------------------------------------


def _memory_split(by_process: dict[str, float]) -> str:
    if not by_process:
        return "—"
    return f"{', '.join(f'{mb:g}' for mb in by_process.values())} ({sum(by_process.values()):g})"


def _server_core_table(scenarios: list[Doc]) -> list[str]:
    """The server core's busy, other and stolen shares of each scenario's runs: how much
    else ran where the measured processes did (none in a quiet run)."""

    def shares(run: Doc | None) -> str:
        core = run.get("server_core") if run else None
        if not core:
            return "—"
        return " / ".join(f"{round(100 * core[k])} %" for k in ("busy", "other", "steal"))

    rows = [
        [s["key"], shares(run_of(s, "c1")), shares(run_of(s, "load")), shares(run_of(s, "paced"))]
        for s in scenarios
        if any(r.get("server_core") for r in s.get("runs", []))
    ]
    if not rows:
        return []
    return [
        "",
        "## Server core (busy / other / steal, as shares of each run's wall time)",
        "",
        "busy: anything ran; other: busy outside Envoy, the service, the upstream or the peer "
        "(Redis, interrupts, other work on the machine); steal: the hypervisor ran another "
        "tenant.",
        "",
        *_table(["#", "c=1", "c=16", "paced"], rows),
    ]


def markdown(doc: Doc, chart: str | None = None) -> str:
    meta = doc["meta"]
    lines = [
        f"# Benchmark {meta['date']} on {meta['host']}{' (quick)' if meta.get('quick') else ''}",
        "",
        _meta_line(meta),
        "",
        "Latency in ms, CPU in microseconds per completed request (from each process's "
        "utime + stime), RSS: peak = VmHWM (start-up included), after = VmRSS once the "
        "load runs are over. `c=N`: N connections, closed loop; "
        f"paced: {doc['plan']['paced_rate']:g} requests/s on a fixed schedule. "
        f"Cores: {doc['layout']['text']}",
        "",
        "## Scenarios",
        "",
        *_scenario_table(doc.get("scenarios", []), doc["plan"]),
    ]
    lines += _server_core_table(doc.get("scenarios", []) + doc.get("peers", []))
    if doc.get("upstream_choice"):
        lines += ["", "## Upstream choice (scenario 0 with each candidate)", ""]
        lines += _table(
            ["upstream", "answer", "req/s c=16", "p50 c=1", "p99 c=16", "upstream CPU us/req"],
            [
                [
                    c["upstream"],
                    c["answer"],
                    _num(rps(run_of(c, "load")), 0),
                    _num(latency(run_of(c, "c1"), "p50"), 3),
                    _num(latency(run_of(c, "load"), "p99"), 2),
                    _num(cpu(run_of(c, "load"), "upstream")),
                ]
                for c in doc["upstream_choice"]
            ],
        )
        lines += ["", f"Chosen: {doc.get('upstream_chosen', '?')}."]
    if doc.get("workers"):
        lines += [
            "",
            "## Workers (scenario 5 on all cores; decisions alone: wrk to the HTTP authorizer)",
            "",
        ]
        lines += _table(
            [
                "workers",
                "req/s",
                "decisions alone req/s",
                "p50",
                "p99",
                "service CPU us/req (decisions alone)",
                "CPU split over processes",
                "RSS MB peak (after)",
                "PSS MB (total)",
            ],
            [
                [
                    w["title"],
                    _num(rps(run_of(w, "load")), 0),
                    _num(rps(run_of(w, "authorizer")), 0),
                    _num(latency(run_of(w, "load"), "p50"), 2),
                    _num(latency(run_of(w, "load"), "p99"), 2),
                    f"{_num(cpu(run_of(w, 'load'), 'service'))} "
                    f"({_num(cpu(run_of(w, 'authorizer'), 'service'))})",
                    ", ".join(
                        f"{x:.0%}"
                        for x in (run_of(w, "load") or {}).get("cpu_share", {}).get("service", [])
                    ),
                    ", ".join(
                        f"{_num(mb)} ({_num(w.get('rss_mb', {}).get(name))})"
                        for name, mb in w.get("peak_rss_mb", {}).items()
                    ),
                    _memory_split(w.get("pss_mb", {})),
                ]
                for w in doc["workers"]
            ],
        )
    if doc.get("peers"):
        lines += ["", "## Peers", ""]
        lines += _scenario_table(doc["peers"], doc["plan"], group="peer")
        lines += ["", *_peer_ratios(doc)]
    for s in doc.get("scenarios", []):
        if s.get("profile"):
            lines += ["", *_profile(s)]
    lines += ["", "## Targets", ""]
    lines += _table(
        ["target", "goal", "measured", "met"],
        [
            [
                t["name"],
                t["goal"],
                t["detail"],
                {True: "yes", False: "**no**", None: "not run"}[t["met"]],
            ]
            for t in doc.get("targets", [])
        ],
    )
    if doc.get("notes"):
        lines += ["", "## Notes", "", *(f"- {n}" for n in doc["notes"])]
    if chart:
        lines += ["", f"![latency vs throughput]({chart})"]
    return "\n".join(lines) + "\n"


def _scenario_table(scenarios: Iterable[Doc], plan: Doc, group: str = "service") -> list[str]:
    c = plan["load_connections"]
    header = [
        "#",
        "scenario",
        f"req/s c={c}",
        "p50 c=1",
        "p99 c=1",
        f"p50 c={c}",
        f"p99 c={c}",
        "p50 paced",
        "p99 paced (req/s)",
        f"{group} CPU us/req c={c} / paced",
        "Envoy CPU us/req",
        "ext_proc msgs/req",
        "RSS MB peak / after",
        "ready s",
    ]
    rows = []
    for s in scenarios:
        c1, load, paced = run_of(s, "c1"), run_of(s, "load"), run_of(s, "paced")
        msgs = (load or {}).get("per_request", {})
        sent, received = (
            msgs.get("ext_proc.stream_msgs_sent"),
            msgs.get("ext_proc.stream_msgs_received"),
        )
        own = cpu(load, group)
        peak, serving = s.get("peak_rss_mb", {}), s.get("rss_mb", {})
        rows.append(
            [
                s["key"],
                s["title"],
                _num(rps(load), 0),
                _num(latency(c1, "p50"), 3),
                _num(latency(c1, "p99"), 2),
                _num(latency(load, "p50"), 2),
                _num(latency(load, "p99"), 2),
                _num(latency(paced, "p50"), 3),
                f"{_num(latency(paced, 'p99'), 2)} ({_num(rps(paced), 0)})",
                "—" if own is None else f"{_num(own)} / {_num(cpu(paced, group))}",
                _num(cpu(load, "envoy")),
                "—" if sent is None else f"{sent:.1f} / {received:.1f}",
                f"{_num(max(peak.values()) if peak else None)}"
                f" / {_num(max(serving.values()) if serving else None)}",
                _num(s.get("ready_s"), 2),
            ]
        )
    return _table(header, rows)


def _peer_ratios(doc: Doc) -> list[str]:
    lines = []
    for peer in doc.get("peers", []):
        for key in ("3", "5", "7"):
            ours = scenario_of(doc, key)
            if ours is None:
                continue
            p_load, o_load = run_of(peer, "load"), run_of(ours, "load")
            p_cpu, o_cpu = cpu(p_load, "peer"), cpu(o_load, "service")
            o_env = cpu(o_load, "envoy")
            lines.append(
                f"- {peer['title']} vs scenario {key}: CPU per request "
                f"{_ratio(p_cpu, o_cpu)} of the service's "
                f"({_ratio(p_cpu, (o_cpu or 0) + (o_env or 0))} of service + Envoy); "
                f"p50 at c=1 {_ratio(_p50_c1(peer), _p50_c1(ours))}; "
                f"p99 under load {_ratio(latency(p_load, 'p99'), latency(o_load, 'p99'))}; "
                f"throughput {_ratio(rps(o_load), rps(p_load))} in our favour"
            )
    return lines


def _p50_c1(scenario: Doc) -> float | None:
    return latency(run_of(scenario, "c1"), "p50")


def _profile(s: Doc) -> list[str]:
    prof = s["profile"]
    lines = [f"## Profile, scenario {s['key']} ({prof['samples']} samples, py-spy --native)", ""]
    lines += _table(
        ["self time", "share", "inclusive time", "share", "area (self)", "share"],
        [
            [
                *(_cost(prof["self_top"], i)),
                *(_cost(prof["inclusive_top"], i)),
                *(_cost(prof["areas"], i)),
            ]
            for i in range(10)
        ],
    )
    threads = ", ".join(f"{t['name']} {t['share']:.0%}" for t in prof.get("threads", []))
    if threads:
        lines += ["", f"Samples by thread: {threads}."]
    if prof.get("svg"):
        lines += ["", f"Flame graph: `{prof['svg']}`"]
    return lines


def _cost(costs: list[Doc], i: int) -> list[str]:
    if i >= len(costs):
        return ["", ""]
    return [f"`{costs[i]['name'][:90]}`", f"{costs[i]['share']:.1%}"]


def _meta_line(meta: Doc) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    return (
        f"Machine: {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, "
        f"{meta.get('kernel', '?')}. Versions: {versions}. "
        f"Service code fingerprint {meta.get('code_fingerprint', '?')}."
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _repeats(paced: Doc | None) -> str:
    repeats = paced.get("repeats_p99", []) if paced else []
    if len(repeats) < 2:
        return ""
    each = ", ".join(_num(p99, 2) for p99 in repeats)
    return f" (median of {len(repeats)} runs: {each} ms)"


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _conn(run: Doc | None) -> str:
    return "?" if run is None else str(run["load"]["connections"])


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.1f}x"


# --- chart ---------------------------------------------------------------------------------


def chart(doc: Doc, path: Path) -> None:
    """p50 and p99 latency against achieved throughput, one line per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [*doc.get("scenarios", []), *doc.get("peers", [])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    for ax, which in zip(axes, ("p50", "p99"), strict=True):
        for s in series:
            points = [r for r in (run_of(s, n) for n in LOAD_RUNS) if r is not None]
            points.sort(key=lambda r: r["load"]["connections"])
            if not points:
                continue
            label = f"{s['key']}: {s['title']}"
            (line,) = ax.plot(
                [rps(r) for r in points],
                [latency(r, which) for r in points],
                marker="o",
                markersize=3,
                label=label,
            )
            paced = run_of(s, "paced")
            if paced is not None:
                ax.plot(
                    [rps(paced)],
                    [latency(paced, which)],
                    marker="x",
                    markersize=8,
                    color=line.get_color(),
                    linestyle="none",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (requests/s, log)")
        ax.set_ylabel(f"{which} latency (ms, log)")
        ax.set_title(
            f"{which} latency vs load (o: c=1..{doc['plan']['load_connections']}, x: paced)"
        )
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
    meta = doc["meta"]
    fig.suptitle(f"extproc benchmark {meta['date']} - {meta['host']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report results/<run>.json``: render a recorded run again."""
    import sys

    for name in argv if argv is not None else sys.argv[1:]:
        path = Path(name)
        doc = json.loads(path.read_text())
        for written in write(doc, path.parent, path.stem):
            print(written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
