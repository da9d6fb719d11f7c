"""The outbox relay: publishes a partition's committed events to JetStream, in order.

The event log is the outbox. Events are handed to the relay only after their batch has
committed; the relay publishes them as version 2 messages
(:mod:`spendgate_common.event_messages_v2`): the events of one appended batch travel
together, cut into runs of at most 128 events (about 64 KiB), each message with
``Nats-Msg-Id = <partition>:<first seq>-<last seq>`` (so JetStream drops a republish after
a crash). It waits for the acknowledgements and advances the partition's
``published_seq`` watermark in Postgres. What is not in its memory buffer (after a
restart, or after the buffer overflowed) it reads back from the log, which keeps one row
per append, so it cuts the same messages again.

Publishing is the relay's hot path, on the same core as the partition loops. One message
per event cost a third of the ledger's CPU and most of the NATS server's on a hot
partition (docs/decisions.md); one per run costs that divided by the run's length.
nats-py's ``publish_async`` costs about 17 us of CPU per message (a random token from
``os.urandom``, a future, a semaphore, a ``wait_for``, stdlib JSON and a dataclass per
acknowledgement), so the relay writes a whole window of ``HPUB`` frames to the connection
at once, each with the reply subject ``<inbox>.<window>.<index>``, and one subscription per
relay only counts the acknowledgements of the current window. Every message's
acknowledgement is awaited: only they prove that *every* message of the window was stored
(a single acknowledgement of the last one would not reveal a message lost in a leader
change before it), and the watermark moves only after all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, ConnectionDrainingError, OutboundBufferLimitError
from nats.errors import Error as NatsError

from spendgate_common.errors import StoreUnavailableError
from spendgate_common.event_messages_v2 import StreamedEvent, encode_events, split_runs
from spendgate_common.limits import EVENT_MESSAGE_BYTES_MAX
from spendgate_common.subjects import (
    HEADER_FIRST_SEQ,
    HEADER_LAST_SEQ,
    HEADER_MSG_ID,
    HEADER_PARTITION,
    events_subject,
)
from spendgate_ledger._store import EventRow, LedgerStore

_log = logging.getLogger(__name__)

# How long to wait for JetStream to acknowledge a window of publishes.
PUBLISH_ACK_TIMEOUT = timedelta(seconds=5)
# Pause after a failed publish or watermark write before trying again.
RETRY_PAUSE = timedelta(milliseconds=500)
# The published watermarks of all of a replica's partitions are written to Postgres
# together, in one statement, at most this often (WatermarkWriter), not by each relay
# after its windows: at low load, spread over 64 partitions, that was a transaction for
# every other batch. After a crash the next owner republishes at most this much more,
# which JetStream drops by message id (its duplicate window is minutes).
WATERMARK_PERSIST_INTERVAL = timedelta(milliseconds=200)


class PublishRefusedError(NatsError):
    """JetStream answered a publish of the window with an error (or no stream responded)."""

    def __init__(self, partition: int, answer: bytes) -> None:
        super().__init__(f"partition {partition}: JetStream refused an event: {answer[:200]!r}")
        self.partition = partition
        self.answer = answer


# A run of consecutive events of one appended batch: one stream message.
Run = Sequence[EventRow]


class EventRelay:
    def __init__(
        self,
        partition: int,
        nats: NatsClient,
        store: LedgerStore,
        published_seq: int,
        *,
        inflight_max: int,
        buffer_events_max: int,
    ) -> None:
        self.partition = partition
        self._store = store
        self.published_seq = published_seq
        self.committed_seq = published_seq
        # What outbox_watermarks holds (as far as this relay knows).
        self.persisted_seq = published_seq
        # Most messages (runs) published in one window.
        self._inflight_max = inflight_max
        self._buffer_events_max = buffer_events_max
        self._buffer: deque[Run] = deque()
        self._buffered_events = 0
        # seq -> traceparent of the command span that produced the event (traced events
        # only; carried in the message so the auditor's span links back). Emptied with the
        # buffer and as windows are published, so it never outgrows the buffer.
        self._traceparents: dict[int, str] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # nats-py has no public call that writes prepared frames (see the module docstring
        # for why we write them ourselves); tests/test_ledger_service.py checks subjects,
        # headers and bodies of what arrives in the stream.
        self._nats = nats
        self._subject = events_subject(partition).encode()
        # A message stays below the server's max_payload (an event alone is asserted to
        # fit); the cut depends on this, so every replica must see the same server limit.
        self._run_bytes_max = min(EVENT_MESSAGE_BYTES_MAX, nats.max_payload // 2)
        self._inbox = ""
        self._windows = itertools.count(1)
        # Acknowledgements of the window in flight: reply prefix, expected, counted, error.
        self._ack_prefix = ""
        self._acks_expected = 0
        self._acks_counted = 0
        self._ack_refusal: bytes | None = None
        # Resolved when every acknowledgement of the window in flight has arrived.
        self._acked: asyncio.Future[None] | None = None

    def committed(
        self,
        rows: Sequence[EventRow],
        last_seq: int,
        traceparents: Mapping[int, bytes] | None = None,
    ) -> None:
        """Called by the partition loop after a batch committed (never awaits): ``rows``
        are the batch's events. ``traceparents``: the trace context of traced events, by
        seq."""
        self.committed_seq = last_seq
        if self._buffered_events + len(rows) <= self._buffer_events_max:
            self._buffer.extend(split_runs(rows, bytes_max=self._run_bytes_max))
            self._buffered_events += len(rows)
            if traceparents:
                self._traceparents.update(
                    (seq, value.decode()) for seq, value in traceparents.items()
                )
        else:
            # Too far behind (JetStream down?): forget and read back from the log later.
            self._buffer.clear()
            self._buffered_events = 0
            self._traceparents.clear()
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self, deadline: timedelta) -> bool:
        """Wait until everything committed so far is published; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), deadline.total_seconds())
        except TimeoutError:
            return False
        # Handing over: let the next owner start where we stopped (a failure here only
        # costs it a few duplicates, which JetStream drops).
        seq = self.published_seq
        if self.persisted_seq < seq:
            with contextlib.suppress(StoreUnavailableError, OSError):
                await self._store.set_published_seqs([(self.partition, seq)])
                self.persisted_seq = seq
        return True

    async def run(self) -> None:
        self._inbox = self._nats.new_inbox()
        subscription = await self._nats.subscribe(f"{self._inbox}.>", cb=self._on_ack)
        try:
            await self._run()
        finally:
            with contextlib.suppress(NatsError, OSError):
                await subscription.unsubscribe()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                try:
                    if self.published_seq < self.committed_seq:
                        await self._publish_next_window()
                except (NatsError, TimeoutError, StoreUnavailableError, OSError) as error:
                    _log.warning(
                        "partition %d: publishing events failed (%s), retrying",
                        self.partition,
                        error,
                    )
                    await asyncio.sleep(RETRY_PAUSE.total_seconds())
                    continue
                if self.published_seq >= self.committed_seq:
                    break
            self._idle.set()

    async def _next_window(self) -> list[Run]:
        """The next runs to publish, in order from ``published_seq + 1`` (at most
        ``inflight_max``): from memory when it holds them, else from the log."""
        buffer = self._buffer
        while buffer and buffer[0][-1].seq <= self.published_seq:
            self._buffered_events -= len(buffer.popleft())
        if buffer and buffer[0][0].seq == self.published_seq + 1:
            # Only a contiguous run of runs: after an append that committed unseen
            # (reported as failed, found on reload) the buffer has a hole that the log
            # must fill.
            window: list[Run] = []
            next_seq = self.published_seq + 1
            for run in itertools.islice(buffer, self._inflight_max):
                if run[0].seq != next_seq:
                    break
                window.append(run)
                next_seq = run[-1].seq + 1
            return window
        batches = await self._store.read_batches(self.partition, self.published_seq)
        runs = [run for rows in batches for run in split_runs(rows, bytes_max=self._run_bytes_max)]
        return runs[: self._inflight_max]

    async def _publish_next_window(self) -> None:
        window = await self._next_window()
        if not window:
            return
        await self._publish(window)
        self.published_seq = window[-1][-1].seq
        if self._traceparents:
            for run in window:
                for row in run:
                    self._traceparents.pop(row.seq, None)

    async def _publish(self, window: Sequence[Run]) -> None:
        """Publish ``window`` (a message per run) and return once JetStream stored (or
        deduplicated) all of it.

        Raises a NATS error when the connection refuses the write, :class:`TimeoutError`
        when acknowledgements are missing after PUBLISH_ACK_TIMEOUT, and
        :class:`PublishRefusedError` when JetStream answered one message with an error.
        Late acknowledgements of an abandoned attempt do not count for the next one: each
        attempt has its own reply prefix.
        """
        nats = self._nats
        prefix = f"{self._inbox}.{next(self._windows)}."
        frames = self._frames(prefix.encode(), window)
        if nats.is_closed:
            raise ConnectionClosedError
        if nats.is_draining_pubs:
            raise ConnectionDrainingError
        if not nats.is_connected and (
            nats._pending_data_size + len(frames) > nats._max_pending_size
        ):
            raise OutboundBufferLimitError
        self._ack_prefix = prefix
        self._acks_expected = len(window)
        self._acks_counted = 0
        self._ack_refusal = None
        # A future, not an Event: waiting on Event.wait() with a timeout wraps a coroutine
        # in a task, once per window (per batch at low load).
        acked = self._acked = asyncio.get_running_loop().create_future()
        # What Client.publish does after building its frame, once for the whole window.
        try:
            await nats._send_command(frames)
            if nats._flush_queue is not None and nats._flush_queue.empty():
                await nats._flush_pending()
        except RuntimeError as error:
            # uvloop refuses a write on a transport that closed under nats-py during a
            # reconnect (it writes inline when its flusher task is gone): the
            # connection's failure, retried as such.
            raise ConnectionClosedError from error
        try:
            await asyncio.wait_for(acked, PUBLISH_ACK_TIMEOUT.total_seconds())
        finally:
            self._ack_prefix = ""
        if self._ack_refusal is not None:
            raise PublishRefusedError(self.partition, self._ack_refusal)

    def _frames(self, prefix: bytes, window: Sequence[Run]) -> bytes:
        """The ``HPUB`` frames of ``window``, exactly as ``Client.publish`` would write them."""
        partition = self.partition
        subject = self._subject
        payload_max = self._nats.max_payload
        traceparents = self._traceparents
        frames = bytearray()
        for index, run in enumerate(window):
            first_seq, last_seq = run[0].seq, run[-1].seq
            body = encode_events(
                [
                    StreamedEvent(row.seq, msgspec.Raw(row.body), traceparents.get(row.seq))
                    for row in run
                ]
            )
            headers = b"NATS/1.0\r\n%s: %d:%d-%d\r\n%s: %d\r\n%s: %d\r\n%s: %d\r\n\r\n" % (
                _MSG_ID,
                partition,
                first_seq,
                last_seq,
                _PARTITION,
                partition,
                _FIRST_SEQ,
                first_seq,
                _LAST_SEQ,
                last_seq,
            )
            size = len(headers) + len(body)
            # Runs are cut far below max_payload, and an event is a few hundred bytes; the
            # server would close the connection on a larger message, so it never sees one.
            assert size <= payload_max, f"events {partition}:{first_seq}-{last_seq}: {size} bytes"
            frames += b"HPUB %s %s%d %d %d\r\n%s%s\r\n" % (
                subject,
                prefix,
                index,
                len(headers),
                size,
                headers,
                body,
            )
        return bytes(frames)

    async def _on_ack(self, msg: Msg) -> None:
        """Count an acknowledgement of the current window (a cheap check per message).

        A PubAck is ``{"stream":..,"seq":..}`` (with ``"duplicate":true`` for a republish
        JetStream dropped); a refusal carries ``"error"``, and "no stream" arrives as an
        empty 503 status message.
        """
        if not self._ack_prefix or not msg.subject.startswith(self._ack_prefix):
            return
        data = msg.data
        if (not data or b'"error"' in data) and self._ack_refusal is None:
            self._ack_refusal = data or f"status {msg.header}".encode()
        self._acks_counted += 1
        acked = self._acked
        if self._acks_counted >= self._acks_expected and acked is not None and not acked.done():
            acked.set_result(None)


_MSG_ID = HEADER_MSG_ID.encode()
_PARTITION = HEADER_PARTITION.encode()
_FIRST_SEQ = HEADER_FIRST_SEQ.encode()
_LAST_SEQ = HEADER_LAST_SEQ.encode()


class WatermarkWriter:
    """Writes the published watermarks of a replica's relays, every
    ``WATERMARK_PERSIST_INTERVAL``, in one statement for all partitions that moved."""

    def __init__(self, store: LedgerStore, relays: Callable[[], list[EventRelay]]) -> None:
        self._store = store
        self._relays = relays

    async def run(self) -> None:
        interval_s = WATERMARK_PERSIST_INTERVAL.total_seconds()
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.write()
            except (StoreUnavailableError, OSError) as error:
                # A hint only: the next round writes it, and a crash meanwhile costs
                # republished events, which JetStream drops.
                _log.warning("writing the relays' watermarks failed: %s", error)

    async def write(self) -> None:
        """Write every watermark that moved since it was last written."""
        moved = [
            (relay, relay.published_seq)
            for relay in self._relays()
            if relay.persisted_seq < relay.published_seq
        ]
        if not moved:
            return
        await self._store.set_published_seqs([(relay.partition, seq) for relay, seq in moved])
        for relay, seq in moved:
            relay.persisted_seq = max(relay.persisted_seq, seq)
