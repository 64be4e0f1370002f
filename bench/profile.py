"""Sampling the service under load with py-spy, and summing the samples into top costs.

Two recordings back to back while wrk keeps the load on: a flame graph (SVG, for people)
and the raw collapsed stacks (``frame;frame;... count``, for :func:`summarise`). Both use
``--native`` so time inside gRPC's C core, protobuf and hiredis shows up as such instead of
being charged to the Python line that called it. py-spy pauses the process for each
sample: the load run that carries a profile is never one whose figures are reported.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

RATE_HZ = 200
ENTRY_SHARE = 0.5
EVENT_LOOP_MARKERS = ("uv_run", "run (uvloop", "extproc/server.py")

# Areas of the code a sample's innermost frame belongs to, first match wins.
AREAS: tuple[tuple[str, str], ...] = (
    ("extproc", r"extproc/"),
    ("grpc (python + cython)", r"grpc/|cygrpc|_cython|grpc_health"),
    ("grpc C core", r"libgrpc|cygrpc.*\.so|grpc_core|absl"),
    ("protobuf", r"protobuf|_message|upb|google/protobuf"),
    ("redis client", r"redis/|hiredis"),
    ("tokenizer (bpe)", r"bpe|tiktoken"),
    ("json (orjson)", r"orjson"),
    ("asyncio / uvloop", r"asyncio/|uvloop|loop\.pyx|selector"),
    ("libc / kernel", r"libc\.so|libpthread|ld-linux|\[kernel\]|vdso"),
    ("python runtime", r"libpython|python3\.\d+ \(|\(python"),
)


@dataclass(frozen=True, slots=True)
class Cost:
    name: str
    share: float
    """Fraction of all samples (0..1)."""


@dataclass(frozen=True, slots=True)
class Summary:
    samples: int
    self_top: list[Cost]
    """Functions by time spent in themselves (innermost frame)."""
    inclusive_top: list[Cost]
    """Functions by time spent in them or anything they called (entry points that hold
    more than :data:`ENTRY_SHARE` of all samples are left out: they say nothing)."""
    areas: list[Cost]
    """Self time grouped by :data:`AREAS`."""
    threads: list[Cost]
    """Samples on the event loop's thread vs gRPC's poller (and any other) threads."""

    def as_dict(self) -> dict[str, object]:
        def rows(costs: list[Cost]) -> list[dict[str, object]]:
            return [{"name": c.name, "share": round(c.share, 4)} for c in costs]

        return {
            "samples": self.samples,
            "self_top": rows(self.self_top),
            "inclusive_top": rows(self.inclusive_top),
            "areas": rows(self.areas),
            "threads": rows(self.threads),
        }


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    if not Path(found).exists():
        raise FileNotFoundError("py-spy is not installed: pip install py-spy")
    return found


def record(pid: int, seconds: int, svg: Path, raw: Path) -> None:
    """A flame graph, then raw stacks, of ``pid`` for ``seconds`` each."""
    for out, fmt in ((svg, "flamegraph"), (raw, "raw")):
        subprocess.run(
            [
                py_spy(),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(seconds),
                "--rate",
                str(RATE_HZ),
                "--native",
                "--format",
                fmt,
                "--output",
                str(out),
            ],
            check=True,
            capture_output=True,
            timeout=seconds + 60,
        )


_LINE = re.compile(r" \(([^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """``handle (extproc/pipeline.py:120)`` -> ``handle (extproc/pipeline.py)``."""
    frame = frame.strip()
    match = _LINE.search(frame)
    if match is None:
        return frame
    where = match.group(1)
    for marker in ("site-packages/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    function = frame[: match.start()]
    if function.startswith("0x"):  # a native frame without symbols: name its library
        function = "[native]"
    return f"{function} ({where})"


def area(frame: str) -> str:
    for name, pattern in AREAS:
        if re.search(pattern, frame):
            return name
    return "other"


def summarise(raw: str, top: int = 15) -> Summary:
    """Self, inclusive and per-area shares from py-spy's raw (collapsed) output."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        areas[area(frames[-1])] += count
        on_loop = any(marker in frame for frame in frames for marker in EVENT_LOOP_MARKERS)
        threads["event loop thread" if on_loop else "other threads (gRPC poller, ...)"] += count
        for frame in set(frames):
            inclusive[frame] += count

    def costs(counter: Counter[str], n: int) -> list[Cost]:
        return (
            [Cost(name, value / total) for name, value in counter.most_common(n)] if total else []
        )

    inner = Counter({k: v for k, v in inclusive.items() if total and v / total <= ENTRY_SHARE})
    return Summary(
        total,
        costs(self_counts, top),
        costs(inner, top),
        costs(areas, len(AREAS) + 1),
        costs(threads, 2),
    )
