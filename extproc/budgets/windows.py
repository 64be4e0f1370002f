"""Fixed budget windows in UTC: minute, hour, day and calendar month.

Windows are fixed (not sliding): every counter belongs to exactly one window, named by its
start, so a new window is simply a new counter key and nothing has to be reset. A window is
``[start, end)`` in UTC epoch seconds; months follow the calendar (28 to 31 days, December
rolls over into January of the next year). The current time is always passed in, so
rollover is testable with an injected clock.
"""

from __future__ import annotations

import calendar
import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final

_FIXED_SECONDS: Final = {"minute": 60, "hour": 3_600, "day": 86_400}


class Window(StrEnum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


def window_bounds(window: Window, now: datetime) -> tuple[int, int]:
    """``(start, end)`` of the window containing ``now``, as UTC epoch seconds."""
    return bounds_at(window, epoch_seconds(now))


def bounds_at(window: Window, epoch: int) -> tuple[int, int]:
    """:func:`window_bounds` of the UTC epoch second ``epoch`` (a request's several
    limits take ``now``'s once)."""
    seconds = _FIXED_SECONDS.get(window)
    if seconds is not None:
        # Epoch seconds have no leap seconds, so fixed windows are plain arithmetic.
        start = epoch // seconds * seconds
        return start, start + seconds
    utc = datetime.fromtimestamp(epoch, UTC)
    year, month = utc.year, utc.month
    start = calendar.timegm((year, month, 1, 0, 0, 0))
    next_year, next_month = (year + 1, 1) if month == 12 else (year, month + 1)
    return start, calendar.timegm((next_year, next_month, 1, 0, 0, 0))


def seconds_to_reset(window: Window, now: datetime) -> int:
    """Whole seconds until the window containing ``now`` ends, rounded up (at least 1).

    This is what a ``retry-after`` header says: retrying after it lands in the next window.
    """
    return resets_in(window, epoch_seconds(now))


def resets_in(window: Window, epoch: int) -> int:
    """:func:`seconds_to_reset` at the UTC epoch second ``epoch``."""
    return bounds_at(window, epoch)[1] - epoch


def reset_duration(seconds: int) -> str:
    """A duration the way OpenAI's ``x-ratelimit-reset-*`` headers write it (``"6m0s"``)."""
    hours, rest = divmod(max(seconds, 0), 3_600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def epoch_seconds(now: datetime) -> int:
    """Whole UTC epoch seconds of ``now`` (floored; what ``timegm`` of its UTC time gives)."""
    if now.tzinfo is None:
        raise ValueError("window arithmetic needs an aware datetime (UTC offset)")
    return math.floor(now.timestamp())
