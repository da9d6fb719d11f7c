"""Open-loop load: calls started on a fixed schedule, whatever the replies do.

A closed loop (send, wait, send) slows down when the system does and so hides its worst
moments (coordinated omission). Here call ``n`` is due at ``start_at + n / rate`` and is
started then, even if earlier calls have not answered; its latency counts from that
scheduled time, so a stall delays every call scheduled during it, as real users would be.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import msgspec


class Window(msgspec.Struct, frozen=True):
    """Monotonic times (seconds): load starts at ``start_at``, is measured in [begin, end)."""

    start_at: float
    begin_at: float
    end_at: float

    def measures(self, at: float) -> bool:
        """True when ``at`` lies in the measured part [begin_at, end_at)."""
        return self.begin_at <= at < self.end_at


@dataclass(frozen=True, slots=True)
class OpenLoopCounts:
    # Calls not started because ``outstanding_max`` calls were still waiting.
    dropped: int
    # Calls still running at the drain deadline (cancelled).
    unfinished: int


async def sleep_until(at: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``at`` (at once when it is past)."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))


async def open_loop(
    call: Callable[[int, float], Coroutine[Any, Any, None]],
    *,
    start_at: float,
    end_at: float,
    rate_per_s: float,
    outstanding_max: int,
    drain_deadline_s: float,
) -> OpenLoopCounts:
    """Run ``call(n, scheduled_at)`` for every ``scheduled_at = start_at + n / rate_per_s``
    before ``end_at``; then wait up to ``drain_deadline_s`` for the calls still running.

    The calls must handle their own errors (an exception is only logged by asyncio).
    """
    assert rate_per_s > 0, rate_per_s
    assert outstanding_max > 0, outstanding_max
    outstanding: set[asyncio.Task[None]] = set()
    interval_s = 1.0 / rate_per_s
    dropped = 0
    index = 0
    next_at = start_at
    await sleep_until(next_at)
    while next_at < end_at:
        now = time.monotonic()
        # Start every call whose time has come (the loop may wake up late).
        while next_at <= now and next_at < end_at:
            if len(outstanding) >= outstanding_max:
                dropped += 1
            else:
                task = asyncio.create_task(call(index, next_at))
                outstanding.add(task)
                task.add_done_callback(outstanding.discard)
            index += 1
            next_at = start_at + index * interval_s
        await sleep_until(next_at)
    unfinished = 0
    if outstanding:
        _, pending = await asyncio.wait(outstanding, timeout=drain_deadline_s)
        unfinished = len(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return OpenLoopCounts(dropped, unfinished)
