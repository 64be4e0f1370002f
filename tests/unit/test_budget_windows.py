"""Budget windows: fixed UTC windows, calendar months, time to reset."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone

import pytest

from extproc.budgets.windows import Window, reset_duration, seconds_to_reset, window_bounds


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    """UTC epoch seconds, computed independently of the module under test."""
    return calendar.timegm((year, month, day, hour, minute, 0))


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


@pytest.mark.parametrize(
    ("window", "now", "start", "end"),
    [
        pytest.param(
            Window.MINUTE,
            at(2026, 3, 5, 10, 7, 59),
            ts(2026, 3, 5, 10, 7),
            ts(2026, 3, 5, 10, 8),
            id="minute",
        ),
        pytest.param(
            Window.HOUR,
            at(2026, 3, 5, 10, 59, 59),
            ts(2026, 3, 5, 10),
            ts(2026, 3, 5, 11),
            id="hour",
        ),
        pytest.param(
            Window.DAY,
            at(2026, 12, 31, 23, 59, 59),
            ts(2026, 12, 31),
            ts(2027, 1, 1),
            id="day-new-year",
        ),
        pytest.param(
            Window.MONTH,
            at(2026, 1, 31, 23, 59, 59),
            ts(2026, 1, 1),
            ts(2026, 2, 1),
            id="month-jan-31",
        ),
        pytest.param(
            Window.MONTH, at(2026, 2, 1), ts(2026, 2, 1), ts(2026, 3, 1), id="month-feb-1"
        ),
        pytest.param(
            Window.MONTH,
            at(2026, 12, 31, 23, 59, 59),
            ts(2026, 12, 1),
            ts(2027, 1, 1),
            id="month-dec-31",
        ),
        pytest.param(
            Window.MONTH, at(2027, 1, 1), ts(2027, 1, 1), ts(2027, 2, 1), id="month-jan-1"
        ),
        pytest.param(
            Window.MONTH, at(2028, 2, 29, 12), ts(2028, 2, 1), ts(2028, 3, 1), id="month-leap-feb"
        ),
        pytest.param(
            Window.MONTH, at(2100, 2, 28), ts(2100, 2, 1), ts(2100, 3, 1), id="month-2100-no-leap"
        ),
    ],
)
def test_window_bounds(window: Window, now: datetime, start: int, end: int) -> None:
    assert window_bounds(window, now) == (start, end)


@pytest.mark.parametrize(
    ("days_in_feb", "year"),
    [pytest.param(29, 2028, id="leap"), pytest.param(28, 2026, id="common")],
)
def test_february_length(days_in_feb: int, year: int) -> None:
    start, end = window_bounds(Window.MONTH, at(year, 2, 10))
    assert end - start == days_in_feb * 86_400


def test_rollover_with_an_injected_clock() -> None:
    last = at(2026, 1, 31, 23, 59, 59, micro=999_999)
    first = last + timedelta(microseconds=1)
    for window in Window:
        before, after = window_bounds(window, last), window_bounds(window, first)
        assert before[1] == after[0], window
        assert before != after


def test_other_offsets_are_converted_to_utc() -> None:
    # 00:30 in UTC+02:00 on Feb 1 is still January in UTC.
    local = datetime(2026, 2, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    assert window_bounds(Window.MONTH, local) == (ts(2026, 1, 1), ts(2026, 2, 1))


def test_naive_datetimes_are_rejected() -> None:
    with pytest.raises(ValueError, match="aware"):
        window_bounds(Window.DAY, datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("window", "now", "seconds"),
    [
        pytest.param(Window.MINUTE, at(2026, 3, 5, 10, 7, 0), 60, id="minute-at-start"),
        pytest.param(Window.MINUTE, at(2026, 3, 5, 10, 7, 59, micro=1), 1, id="minute-fraction-up"),
        pytest.param(Window.MINUTE, at(2026, 3, 5, 10, 7, 30, micro=500_000), 30, id="minute-half"),
        pytest.param(Window.HOUR, at(2026, 3, 5, 10, 50), 600, id="hour"),
        pytest.param(Window.DAY, at(2026, 3, 5, 23, 0), 3_600, id="day"),
        pytest.param(Window.MONTH, at(2026, 12, 31, 23, 59, 59), 1, id="month-new-year"),
        pytest.param(Window.MONTH, at(2028, 2, 1), 29 * 86_400, id="month-leap-feb"),
    ],
)
def test_seconds_to_reset(window: Window, now: datetime, seconds: int) -> None:
    assert seconds_to_reset(window, now) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (1, "1s"),
        (59, "59s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (3_661, "1h1m1s"),
        (31 * 86_400, "744h0m0s"),
    ],
)
def test_reset_duration_matches_openai_headers(seconds: int, text: str) -> None:
    assert reset_duration(seconds) == text
