"""What a process costs, read from the kernel's own accounting (``/proc``), and CPU pinning.

* CPU time: ``utime + stime`` from ``/proc/<pid>/stat`` (fields 14 and 15, in clock ticks;
  they include every thread of the process, live or exited). A measurement reads them for a
  set of processes before and after a load run; the difference divided by completed requests
  is CPU per request.
* Peak memory: ``VmHWM`` (the resident set's high-water mark) from ``/proc/<pid>/status``.
* Pinning: :func:`pin` sets the affinity of every thread of a process and its descendants
  (``taskset -a -p`` for a process tree), since a process's children may be started (and
  its threads created) before we get to pin it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (all its threads)."""
    stat = (PROC / str(pid) / "stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


@dataclass(frozen=True, slots=True)
class CoreTimes:
    """Seconds some cores spent busy (any process, the kernel included) and stolen (the
    hypervisor ran another tenant while they wanted to run), from ``/proc/stat``."""

    busy: float
    steal: float

    @classmethod
    def take(cls, cpus: Iterable[int]) -> CoreTimes:
        wanted = {f"cpu{n}" for n in cpus}
        busy = steal = 0
        for line in (PROC / "stat").read_text().splitlines():
            name, *values = line.split()
            if name in wanted:
                # user nice system idle iowait irq softirq steal ...
                ticks = [int(v) for v in values[:8]]
                busy += sum(ticks[:3]) + ticks[5] + ticks[6]
                steal += ticks[7]
        return cls(busy / CLOCK_TICKS, steal / CLOCK_TICKS)

    def since(self, before: CoreTimes) -> CoreTimes:
        return CoreTimes(self.busy - before.busy, self.steal - before.steal)


def peak_rss_bytes(pid: int) -> int:
    """``VmHWM``: the most resident memory the process has held since it started."""
    return _status_bytes(pid, "VmHWM")


def rss_bytes(pid: int) -> int:
    """``VmRSS``: the memory resident now (read after the load runs: while serving)."""
    return _status_bytes(pid, "VmRSS")


def _status_bytes(pid: int, field: str) -> int:
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: private pages plus a 1/n share of each page shared with n
    processes. Forked workers share the supervisor's tables, which RSS counts in full for
    every process; the PSS of all processes adds up to the memory they really use."""
    for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (over all its threads)."""
    found: list[int] = []
    for task in (PROC / str(pid) / "task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first."""
    pids, index = [pid], 0
    while index < len(pids):
        with contextlib.suppress(OSError):
            pids += children(pids[index])
        index += 1
    return pids


def role(pid: int, supervisor: int) -> str:
    """``supervisor`` or ``worker-<pid>``, for naming the processes of ``serve --workers N``
    (forked workers share the supervisor's command line); ``helper-<pid>`` for any other
    multiprocessing child, such as a resource tracker."""
    if pid == supervisor:
        return "supervisor"
    try:
        cmdline = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return f"gone-{pid}"
    if "resource_tracker" in cmdline:
        return f"helper-{pid}"
    return f"worker-{pid}"


def pin(pid: int, cpus: Iterable[int]) -> None:
    """Restrict every thread of ``pid`` and of its descendants to ``cpus``."""
    mask = set(cpus)
    for member in tree(pid):
        for task in (PROC / str(member) / "task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), mask)
            except (ProcessLookupError, OSError):
                continue


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds per process at one moment."""

    seconds: dict[int, float]

    @classmethod
    def take(cls, pids: Iterable[int]) -> CpuSample:
        readings: dict[int, float] = {}
        for pid in pids:
            try:
                readings[pid] = cpu_seconds(pid)
            except OSError:
                continue
        return cls(readings)

    def since(self, before: CpuSample) -> dict[int, float]:
        """CPU seconds each process used between ``before`` and this sample."""
        return {pid: now - before.seconds.get(pid, 0.0) for pid, now in self.seconds.items()}
