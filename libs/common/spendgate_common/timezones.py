"""IANA time zone names: the one check shared by settings, the API and the ledger."""

from __future__ import annotations

import functools
import zoneinfo

# Longest zone name we look up; real IANA names are far shorter.
TIMEZONE_CHARS_MAX = 64


@functools.lru_cache(maxsize=256)
def zone(name: str) -> zoneinfo.ZoneInfo | None:
    """The zone called ``name``, or None when it is not an IANA time zone.

    ``ZoneInfo`` raises ZoneInfoNotFoundError for unknown names, ValueError for malformed
    ones, IsADirectoryError for "America" and other OSErrors for odd paths: all mean "no".
    """
    if not 0 < len(name) <= TIMEZONE_CHARS_MAX:
        return None
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return None
