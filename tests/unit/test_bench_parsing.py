"""The benchmark harness's parsing and reporting, on recorded output (no load is run)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from bench import load, measure, profile, report

# wrk 4.1 with bench/wrk/request.lua: the text report, then the script's BENCH-JSON line.
WRK_WITH_SCRIPT = """\
Running 2s test @ http://127.0.0.1:18001/v1/chat/completions
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.40ms    1.63ms  13.36ms   88.63%
    Req/Sec     3.70k     1.14k    5.08k    45.00%
  Latency Distribution
     50%  793.00us
     75%    1.11ms
     90%    3.51ms
     99%    8.49ms
  7373 requests in 2.00s, 5.30MB read
Requests/sec:   3678.69
Transfer/sec:      2.65MB
BENCH-JSON {"requests":7373,"duration_us":2004244,"bytes":5559242,"errors":{"connect":0,"read":0,"write":0,"status":0,"timeout":0},"latency_us":{"min":340,"max":13361,"mean":1399.8,"stdev":1631.7,"p50":793,"p75":1106,"p90":3510,"p99":8489,"p99.9":12274}}
"""

# Plain `wrk --latency` (no script), with failures, as wrk prints them.
WRK_PLAIN_WITH_ERRORS = """\
Running 10s test @ http://127.0.0.1:10000/v1/chat/completions
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    75.32ms   12.10ms    1.02s    91.00%
    Req/Sec   206.00     20.00   250.00     70.00%
  Latency Distribution
     50%   75.32ms
     75%   80.00ms
     90%  150.50us
     99%    1.01s
  2060 requests in 10.01s, 1.50MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:    205.79
Transfer/sec:    153.00KB
"""


def test_script_json_line_wins_over_the_rounded_text() -> None:
    result = load.parse(WRK_WITH_SCRIPT)
    assert result.requests == 7373
    assert result.seconds == pytest.approx(2.004244)
    assert result.rps == pytest.approx(7373 / 2.004244)
    assert result.latency.p50 == pytest.approx(0.793)
    assert result.latency.p99 == pytest.approx(8.489)
    assert result.latency.p999 == pytest.approx(12.274)
    assert result.latency.max == pytest.approx(13.361)
    assert result.ok


def test_plain_text_report_units_and_errors() -> None:
    result = load.parse(WRK_PLAIN_WITH_ERRORS)
    assert result.requests == 2060
    assert result.seconds == pytest.approx(10.01)
    assert result.latency.p50 == pytest.approx(75.32)
    assert result.latency.p90 == pytest.approx(0.1505)  # us -> ms
    assert result.latency.p99 == pytest.approx(1010.0)  # s -> ms
    assert result.latency.max == pytest.approx(1020.0)
    assert result.latency.p999 is None
    assert (result.non_2xx, result.socket_errors) == (7, 3)
    assert not result.ok


WITHOUT_LATENCY_FLAG = "\n".join(
    line
    for line in WRK_PLAIN_WITH_ERRORS.splitlines()
    if "Latency Distribution" not in line and not re.match(r"\s+[\d.]+%\s", line)
)


@pytest.mark.parametrize(
    "output",
    [
        pytest.param("unable to connect to 127.0.0.1:1 Connection refused\n", id="no-report"),
        pytest.param(WITHOUT_LATENCY_FLAG, id="no-percentiles"),
    ],
)
def test_unreadable_output_is_an_error(output: str) -> None:
    with pytest.raises(load.WrkError):
        load.parse(output)


def test_wrk_argv_pins_and_passes_script_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The argv only: the test suite does not need wrk installed.
    monkeypatch.setattr(load.shutil, "which", lambda name: f"/usr/bin/{name}")
    argv = load.wrk_argv(
        "http://127.0.0.1:1/x",
        tmp_path / "body.json",
        load.Load(8, 5, rate=300),
        {"Authorization": "Bearer k"},
        cpus=[0],
    )
    assert argv[:4] == ["taskset", "-c", "0", "/usr/bin/wrk"]
    assert "-c8" in argv and "-d5s" in argv and "--latency" in argv
    assert argv[-4:] == ["--", str(tmp_path / "body.json"), "300", "Authorization: Bearer k"]


def _run(
    name: str, connections: int, output: str, service_us: float, rate: float = 0
) -> dict[str, object]:
    result = load.parse(output)
    return {
        "name": name,
        "load": {"connections": connections, "seconds": 2, "rate": rate},
        "result": result.as_dict(),
        "cpu_us_per_request": {"service": service_us, "envoy": 300.0},
        "cpu_share": {},
        "per_request": {"ext_proc.stream_msgs_sent": 4.0, "ext_proc.stream_msgs_received": 4.0},
    }


def _doc() -> dict[str, object]:
    runs = [
        _run("c1", 1, WRK_WITH_SCRIPT, 650.0),
        _run("load", 16, WRK_WITH_SCRIPT, 640.0),
        _run("paced", 8, WRK_WITH_SCRIPT, 700.0, rate=300),
    ]
    baseline = [_run("c1", 1, WRK_WITH_SCRIPT.replace('"p50":793', '"p50":193'), 0.0)]
    return {
        "meta": {"date": "2026-11-26 22:00 UTC", "host": "test", "versions": {"envoy": "1.40.0"}},
        "plan": {"paced_rate": 300.0, "load_connections": 16},
        "layout": {"text": "core 0: wrk; core 1: gateway"},
        "scenarios": [
            {"key": "1", "title": "Envoy only", "runs": baseline},
            {
                "key": "5",
                "title": "full policy",
                "runs": runs,
                "peak_rss_mb": {"service": 160.0},
                "rss_mb": {"service": 120.0},
                "ready_s": 1.2,
            },
        ],
        "notes": ["recorded sample"],
    }


def test_targets_are_judged_from_the_document() -> None:
    verdicts = {t["name"]: t for t in report.targets(_doc())}
    assert verdicts["service CPU per request, scenario 5"]["met"] is True  # 640 us
    added = verdicts["added p50 latency, scenario 5 over 1, concurrency 1"]
    assert added["measured"] == pytest.approx(0.6)
    assert added["met"] is True
    paced = verdicts["p99 at 300 requests/s, scenario 5"]
    assert paced["met"] is False  # p99 8.5 ms > 5 ms
    assert verdicts["peak RSS per worker"]["met"] is False  # 160 MB at start-up
    assert verdicts["RSS per worker after the load runs"]["met"] is True  # 120 MB
    assert verdicts["CPU per request vs LiteLLM (master key), scenario 5"]["met"] is None
    assert not any("scenario 7" in name for name in verdicts)  # judged only when it ran


def test_report_writer_produces_markdown_json_and_png(tmp_path: Path) -> None:
    doc = _doc()
    doc["targets"] = report.targets(doc)
    json_path, md_path, png_path = report.write(doc, tmp_path, "sample")
    assert json.loads(json_path.read_text()) == doc
    text = md_path.read_text()
    assert "| 5 | full policy | 3,679 | 0.793 | 8.49 |" in text
    assert "640 / 700" in text and "4.0 / 4.0" in text and "| 160 / 120 |" in text
    assert "![latency vs throughput](sample.png)" in text
    assert png_path.read_bytes().startswith(b"\x89PNG")


def test_markdown_renders_without_matplotlib() -> None:
    doc = _doc()
    doc["targets"] = report.targets(doc)
    text = report.markdown(doc)
    assert "## Targets" in text and "| service CPU per request, scenario 5 | <= 700 us |" in text


def test_profile_summary_from_collapsed_stacks() -> None:
    raw = (
        "main (extproc/server.py:10);uv_run (core.c);Process (extproc/adapters/ext_proc.py:80);"
        "sendmsg (libc.so.6) 6\n"
        "main (extproc/server.py:10);uv_run (core.c);parse (extproc/dialects/openai_chat.py:12) 2\n"
        "Thread.run (threading.py:1);0x7f01 (grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so) 2\n"
    )
    summary = profile.summarise(raw)
    assert summary.samples == 10
    assert summary.self_top[0] == profile.Cost("sendmsg (libc.so.6)", 0.6)
    areas = {c.name: c.share for c in summary.areas}
    assert areas == {"libc / kernel": 0.6, "extproc": 0.2, "grpc (python + cython)": 0.2}
    threads = {c.name: c.share for c in summary.threads}
    assert threads == {"event loop thread": 0.8, "other threads (gRPC poller, ...)": 0.2}
    inclusive = {c.name for c in summary.inclusive_top}
    assert "main (extproc/server.py)" not in inclusive  # an entry point: > 50% of samples
    assert "parse (extproc/dialects/openai_chat.py)" in inclusive


def _paced(p99: float) -> measure.Run:
    latency = load.Latency(p50=1.0, p75=1.5, p90=2.0, p99=p99, p999=None, max=p99, mean=1.1)
    result = replace(load.parse(WRK_WITH_SCRIPT), latency=latency)
    return measure.Run("paced", load.Load(8, 6, 300.0), result, {"service": 700.0}, {}, {})


def test_paced_runs_report_the_one_with_the_median_p99() -> None:
    chosen = measure.median_paced([_paced(9.5), _paced(3.2), _paced(4.1)])
    assert chosen.result.latency.p99 == 4.1
    assert chosen.repeats_p99 == (9.5, 3.2, 4.1)  # in the order they ran
    doc = _doc()
    runs = doc["scenarios"][1]["runs"]  # type: ignore[index]
    runs[-1] = chosen.as_dict()
    paced = {t["name"]: t for t in report.targets(doc)}["p99 at 300 requests/s, scenario 5"]
    assert paced["met"] is True  # judged on the median run
    assert "median of 3 runs: 9.50, 3.20, 4.10 ms" in paced["detail"]
