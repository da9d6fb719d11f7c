"""Budget windows: ``total`` (forever), ``daily`` and ``monthly``, calendar-aligned in an
IANA time zone. Pure functions of (window, zone, instant); times are ms since the epoch.

A daily window starts at local midnight and ends at the next local midnight, so around a
daylight-saving change it lasts 23 or 25 hours; a monthly window starts at local midnight
on the first of the month.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from spendgate_common.events_v1 import Window
from spendgate_common.timezones import zone

# End of the "total" window: far beyond any timestamp we produce.
FOREVER_MS = 2**62

__all__ = ["FOREVER_MS", "window_bounds_ms", "window_start_at_ms"]


def window_bounds_ms(window: Window, timezone: str, at_ms: int) -> tuple[int, int]:
    """``(start, end)`` of the window containing ``at_ms``: ``start <= at_ms < end``."""
    if window == "total":
        return 0, FOREVER_MS
    tz = zone(timezone)
    assert tz is not None, timezone  # validated before any window is computed
    local = datetime.fromtimestamp(at_ms // 1000, tz=UTC).astimezone(tz)
    if window == "daily":
        start_day = local.date()
        next_day = start_day + timedelta(days=1)
    else:
        assert window == "monthly", window
        start_day = local.date().replace(day=1)
        next_day = (start_day + timedelta(days=32)).replace(day=1)
    start = datetime(start_day.year, start_day.month, start_day.day, tzinfo=tz)
    end = datetime(next_day.year, next_day.month, next_day.day, tzinfo=tz)
    bounds = _ms(start), _ms(end)
    assert bounds[0] <= at_ms < bounds[1], (window, timezone, at_ms, bounds)
    return bounds


def window_start_at_ms(window: Window, timezone: str, at_ms: int) -> int:
    """Start of the window containing ``at_ms`` (0 for ``total``)."""
    return window_bounds_ms(window, timezone, at_ms)[0]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ms(moment: datetime) -> int:
    """Milliseconds since the epoch, in integer arithmetic."""
    return (moment - _EPOCH) // timedelta(milliseconds=1)
