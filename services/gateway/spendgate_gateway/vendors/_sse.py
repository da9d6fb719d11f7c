"""Server-sent events split out of a byte stream as it arrives, for the stream meters.

Only what a meter needs: where each event ends (a blank line; lines end with LF or CRLF,
which is what every vendor we meter sends), its ``event:`` name and its ``data:``
(WHATWG HTML, "Interpreting an event stream"). The bytes of an event are never changed
here; a meter decides what the caller gets.
"""

from __future__ import annotations

import re

# Longest single event a meter holds while waiting for its end. A longer one stops the
# parsing of that stream (its bytes still pass through) and the meter settles it
# conservatively. The largest event the vendors send is a final response object.
EVENT_BYTES_MAX = 4 * 1_048_576
# Where an event ends: a line end followed by an empty line.
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_LINE_END_CHARS_MAX = 3


class EventTooLargeError(Exception):
    """An event grew past :data:`EVENT_BYTES_MAX` without ending."""


class EventSplitter:
    """Cuts a byte stream into complete events, keeping the unfinished tail (bounded)."""

    def __init__(self, event_bytes_max: int = EVENT_BYTES_MAX) -> None:
        assert event_bytes_max > 0
        self._event_bytes_max = event_bytes_max
        self._pending = bytearray()

    def push(self, chunk: bytes) -> list[bytes]:
        """The events that ``chunk`` completes, each with its terminating blank line.

        Raises :class:`EventTooLargeError` when the unfinished event exceeds the bound;
        the splitter is unusable afterwards (the caller passes the rest through).
        """
        # Re-scan only the few bytes before the chunk where a line end may have begun.
        search_from = max(0, len(self._pending) - _LINE_END_CHARS_MAX)
        self._pending += chunk
        events: list[bytes] = []
        start = 0
        while (found := _EVENT_END.search(self._pending, max(start, search_from))) is not None:
            events.append(bytes(self._pending[start : found.end()]))
            start = found.end()
        del self._pending[:start]
        if len(self._pending) > self._event_bytes_max:
            raise EventTooLargeError(f"an event is longer than {self._event_bytes_max} bytes")
        return events

    def take_pending(self) -> bytes:
        """The unfinished tail (bytes a rewriting meter still owes the caller)."""
        pending = bytes(self._pending)
        self._pending.clear()
        return pending


def event_name_and_data(event: bytes) -> tuple[str, bytes]:
    """An event's ``event:`` field ("" when absent) and its ``data:`` lines joined by LF."""
    name = ""
    data: list[bytes] = []
    for line in event.splitlines():
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return name, b"\n".join(data)
