"""The outbox relay: publishes a partition's committed events to JetStream, in order.

The event log is the outbox. Events are handed to the relay only after their batch has
committed; the relay publishes them with ``Nats-Msg-Id = <partition>:<seq>`` (so JetStream
drops a republish after a crash), waits for the acknowledgements, and advances the
partition's ``published_seq`` watermark in Postgres. What is not in its memory buffer
(after a restart, or after the buffer overflowed) it reads back from the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from datetime import timedelta

from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from spendgate_common.errors import StoreUnavailableError
from spendgate_common.subjects import (
    HEADER_MSG_ID,
    HEADER_PARTITION,
    HEADER_SEQ,
    event_msg_id,
    events_subject,
)
from spendgate_ledger._store import EventRow, LedgerStore

_log = logging.getLogger(__name__)

# How long to wait for JetStream to acknowledge a window of publishes.
PUBLISH_ACK_TIMEOUT = timedelta(seconds=5)
# Pause after a failed publish or watermark write before trying again.
RETRY_PAUSE = timedelta(milliseconds=500)


class EventRelay:
    def __init__(
        self,
        partition: int,
        jetstream: JetStreamContext,
        store: LedgerStore,
        published_seq: int,
        *,
        inflight_max: int,
        buffer_events_max: int,
    ) -> None:
        self.partition = partition
        self._jetstream = jetstream
        self._store = store
        self.published_seq = published_seq
        self.committed_seq = published_seq
        self._inflight_max = inflight_max
        self._buffer_events_max = buffer_events_max
        self._buffer: deque[EventRow] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def committed(self, rows: Sequence[EventRow], last_seq: int) -> None:
        """Called by the partition loop after a batch committed (never awaits)."""
        self.committed_seq = last_seq
        if len(self._buffer) + len(rows) <= self._buffer_events_max:
            self._buffer.extend(rows)
        else:
            # Too far behind (JetStream down?): forget and read back from the log later.
            self._buffer.clear()
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self, deadline: timedelta) -> bool:
        """Wait until everything committed so far is published; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), deadline.total_seconds())
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.published_seq < self.committed_seq:
                try:
                    await self._publish_next_window()
                except (NatsError, TimeoutError, StoreUnavailableError, OSError) as error:
                    _log.warning(
                        "partition %d: publishing events failed (%s), retrying",
                        self.partition,
                        error,
                    )
                    await asyncio.sleep(RETRY_PAUSE.total_seconds())
            self._idle.set()

    async def _next_window(self) -> list[EventRow]:
        while self._buffer and self._buffer[0].seq <= self.published_seq:
            self._buffer.popleft()
        if self._buffer and self._buffer[0].seq == self.published_seq + 1:
            count = min(len(self._buffer), self._inflight_max)
            return [self._buffer[index] for index in range(count)]
        async for page in self._store.read_events(self.partition, self.published_seq):
            return page[: self._inflight_max]
        return []

    async def _publish_next_window(self) -> None:
        window = await self._next_window()
        if not window:
            return
        subject = events_subject(self.partition)
        acks = []
        for row in window:
            headers = {
                HEADER_MSG_ID: event_msg_id(self.partition, row.seq),
                HEADER_PARTITION: str(self.partition),
                HEADER_SEQ: str(row.seq),
            }
            acks.append(await self._jetstream.publish_async(subject, row.body, headers=headers))
        try:
            await asyncio.wait_for(asyncio.gather(*acks), PUBLISH_ACK_TIMEOUT.total_seconds())
        except BaseException:
            for ack in acks:
                ack.cancel()
            raise
        await self._store.set_published_seq(self.partition, window[-1].seq)
        self.published_seq = window[-1].seq
