"""What a detector reports, and the span arithmetic every detector shares.

A :class:`Finding` is a character span of one text with a label (an entity type, an
attack family, a topic) and a confidence. Findings carry offsets, never the matched
value, so nothing downstream can leak it into a verdict or a log line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Finding:
    start: int
    end: int
    label: str
    score: float

    def overlaps(self, other: Finding) -> bool:
        return self.start < other.end and other.start < self.end


def resolve_overlaps(findings: Iterable[Finding]) -> list[Finding]:
    """Keep the best of overlapping findings: higher score, then longer, then earlier.

    A validated card number (score 1.0) thus wins over the phone-shaped reading of the
    same digits, and the result is sorted by position with no two spans overlapping.
    Linear in the total length of the findings (a byte map of taken positions), so a
    text with hundreds of thousands of candidates costs no more than reading them.
    """
    ranked = sorted(findings, key=lambda f: (-f.score, -(f.end - f.start), f.start))
    kept: list[Finding] = []
    if len(ranked) <= _SMALL:
        for finding in ranked:
            if not any(finding.overlaps(other) for other in kept):
                kept.append(finding)
    else:
        taken = bytearray(max(f.end for f in ranked))
        for finding in ranked:
            if taken.find(1, finding.start, finding.end) == -1:
                taken[finding.start : finding.end] = b"\x01" * (finding.end - finding.start)
                kept.append(finding)
    kept.sort(key=lambda f: f.start)
    return kept


_SMALL = 16


def rewrite(text: str, findings: Sequence[Finding], replace: Callable[[Finding, str], str]) -> str:
    """``text`` with each (non-overlapping, sorted) finding replaced by ``replace``."""
    out: list[str] = []
    last = 0
    for finding in findings:
        out.append(text[last : finding.start])
        out.append(replace(finding, text[finding.start : finding.end]))
        last = finding.end
    out.append(text[last:])
    return "".join(out)


def merge_windows(
    spans: Iterable[tuple[int, int]], pad: int, length: int, max_window: int
) -> list[tuple[int, int]]:
    """Padded, merged windows around ``spans``, each at most ``max_window`` long.

    Long merged regions are cut into overlapping pieces (overlap ``2 * pad``), so a
    recognizer never sees more than ``max_window`` characters at once and the total
    work stays linear in the text length whatever the text looks like.
    """
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        lo, hi = max(0, start - pad), min(length, end + pad)
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    windows: list[tuple[int, int]] = []
    step = max(max_window - 2 * pad, 1)
    for lo, hi in merged:
        while hi - lo > max_window:
            windows.append((lo, lo + max_window))
            lo += step
        windows.append((lo, hi))
    return windows
