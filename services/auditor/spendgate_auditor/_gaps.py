"""Telling a gap that heals from a gap that persists. Pure: no I/O, the caller passes the time.

Gaps are normal for a moment: after a failed batch or a restart, the messages that were
in flight come back only after a nak delay or the ack wait, while later ones arrive at
once. A gap that stays open longer than the alarm threshold is not normal (the stream lost
an event, or the relay is stuck), and the auditor reports it as an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from spendgate_auditor._plan import Gap

GapStatus = Literal["new", "open", "alarm"]


@dataclass(slots=True)
class _OpenGap:
    expected_seq: int
    opened_at_s: float
    alarmed_at_s: float | None = None


class GapWatch:
    """Per partition, the gap that is open now and since when (at most one per partition)."""

    def __init__(self, alarm_after_s: float) -> None:
        assert alarm_after_s > 0
        self._alarm_after_s = alarm_after_s
        self._open: dict[int, _OpenGap] = {}

    def advanced(self, partitions: Iterable[int]) -> None:
        """These partitions' heads moved: whatever gap they had is closed."""
        for partition in partitions:
            self._open.pop(partition, None)

    def seen(self, gap: Gap, now_s: float) -> tuple[GapStatus, float]:
        """Record that ``gap`` was met at ``now_s``; return its status and seconds open.

        ``"new"``: first met (or a different gap in its partition). ``"alarm"``: open for
        the threshold, reported again at most once per threshold, so a stuck partition is
        reported steadily but not per redelivery. ``"open"``: otherwise.
        """
        current = self._open.get(gap.partition)
        if current is None or current.expected_seq != gap.expected_seq:
            self._open[gap.partition] = _OpenGap(gap.expected_seq, now_s)
            return "new", 0.0
        open_s = now_s - current.opened_at_s
        if open_s < self._alarm_after_s:
            return "open", open_s
        if current.alarmed_at_s is not None and now_s - current.alarmed_at_s < self._alarm_after_s:
            return "open", open_s
        current.alarmed_at_s = now_s
        return "alarm", open_s

    def stalled(self) -> list[int]:
        """Partitions whose open gap has been reported as an alarm (a gauge).

        Also read by the metrics collection thread: ``list()`` copies the items in one
        step, so the loop changing the dict meanwhile cannot break the iteration."""
        return sorted(p for p, gap in list(self._open.items()) if gap.alarmed_at_s is not None)
