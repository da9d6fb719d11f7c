"""One partition's loop: apply commands in order, group-commit their events, then reply.

NATS callbacks only hand requests to :meth:`PartitionWorker.submit` (never awaiting the
database). The loop takes every waiting request up to ``batch_commands_max`` commands,
decides and applies them one after another in memory, appends all their events in one
fenced transaction, and only then publishes the replies. If the append fails, nobody has
seen the batch's results: every caller gets an error and the in-memory state is rebuilt
from the log, which is the truth.

The loop overlaps deciding with the database's round trip and WAL flush: while a
batch's append is in flight, the requests that arrive are decided on top of it in memory
and gathered into the next batch, whose append starts as soon as the first one has
committed. So a request waits for at most the rest of the append in flight and its own
(a batch decided whole, then held until the append before it landed, made requests that
arrived just after it wait for three). Appends stay one at a time and in order, a batch's
replies wait for its own commit, and if an append fails the batch decided on top of it
fails too (nobody has seen either). Once the batch being gathered holds
``batch_commands_max`` commands, the loop waits for its append to start. A
snapshot is taken only when nothing is decided on top of the last commit (the state then
equals the log); when one is due the loop lets the appends land first.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgspec
from nats.errors import Error as NatsError

from spendgate_common.errors import FencedError, StoreUnavailableError
from spendgate_common.events_v1 import AnyEvent, decode_event, encode_event
from spendgate_common.ledger_v1 import AnyCommand, AnyResult, Failed, ResultBatch, encode_batch
from spendgate_ledger._relay import EventRelay
from spendgate_ledger._snapshot import SnapshotChildError, decode_snapshot, fork_save_snapshot
from spendgate_ledger._snapshot_store import SnapshotStore
from spendgate_ledger._state import PartitionState, Sweep
from spendgate_ledger._store import EventRow, Lease, LedgerStore
from spendgate_ledger._telemetry import BatchTrace, LedgerTelemetry, RequestTrace

_log = logging.getLogger(__name__)

Reply = Callable[[str, bytes], Awaitable[None]]

# NATS's default max_payload; the service passes the server's own figure.
NATS_PAYLOAD_BYTES_DEFAULT = 1_048_576
# Larger than any sequence number: "the newest snapshot, whatever its seq".
SEQ_MAX = 2**62
# The answer of a partition this replica was fenced from.
_NOT_OWNER = Failed("not_owner", "this ledger replica no longer owns the partition")
# Pause between attempts to rebuild state while Postgres is unreachable.
RELOAD_RETRY_PAUSE = timedelta(milliseconds=250)
# At most one snapshot per partition this often, however many events it takes. Every
# snapshot costs the loop: it waits for the append in flight (the state must equal the
# log), forks (2-4 ms for the process's page tables), then pays copy-on-write faults
# while the child lives. On a hot partition the event count alone (50,000) came every
# 2.3 s: an open loop at 11,500 pairs/s had p99 19.8-26.4 ms (p50 7.0-10.0) with it, and
# 12.6-23.5 ms (p50 4.6-7.6) with this floor, 3 alternating pairs of runs. A takeover
# replays at most this long's events on top of the interval: at 25,000 events/s about
# 1.1 s.
SNAPSHOT_SPACING_MIN = timedelta(seconds=10)


@dataclass(slots=True)
class PendingRequest:
    commands: Sequence[AnyCommand | Sweep]
    # Empty for internal requests (sweeps), which get no reply.
    reply_subject: str
    # The callers' trace context when tracing is on and the request carries one.
    trace: RequestTrace | None = None


@dataclass(frozen=True, slots=True)
class StateConfig:
    """What a partition's state needs besides its events."""

    partition_count: int
    hold_default: timedelta
    retention: timedelta
    settled_retention: timedelta

    def new_state(self, partition: int) -> PartitionState:
        return PartitionState(
            partition=partition,
            partition_count=self.partition_count,
            default_hold_ms=int(self.hold_default.total_seconds() * 1000),
            retention_ms=int(self.retention.total_seconds() * 1000),
            settled_retention_ms=int(self.settled_retention.total_seconds() * 1000),
        )


def event_type(event: AnyEvent) -> str:
    """The event's type tag (the ``type`` column of the log)."""
    kind = type(event)
    known = _EVENT_TAGS.get(kind)
    if known is not None:
        return known
    tag = kind.__struct_config__.tag
    assert isinstance(tag, str)
    _EVENT_TAGS[kind] = tag
    return tag


# Event class -> its tag (read from the class's config once: a lookup per event otherwise).
_EVENT_TAGS: dict[type, str] = {}


class StateLoader:
    """Rebuilds a partition's state: newest usable snapshot, then the log after it."""

    def __init__(
        self,
        store: LedgerStore,
        snapshots: SnapshotStore,
        config: StateConfig,
        *,
        snapshot_every_events: int,
    ) -> None:
        self.store = store
        self.snapshots = snapshots
        self.config = config
        self.snapshot_every_events = snapshot_every_events

    async def load(self, partition: int, *, expected_last_seq: int | None) -> PartitionState:
        """The partition's state at the end of its log.

        ``expected_last_seq`` is the lease row's ``last_seq`` when known: the log must end
        exactly there (both are written in one transaction).
        """
        state = self.config.new_state(partition)
        ceiling = expected_last_seq if expected_last_seq is not None else SEQ_MAX
        for seq, body in await self.snapshots.newest(partition, ceiling):
            try:
                state = decode_snapshot(body, self.config.new_state(partition))
                break
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as error:
                _log.warning("partition %d: snapshot at %d unusable: %s", partition, seq, error)
        snapshot_seq = state.last_seq
        async for page in self.store.read_events(partition, state.last_seq):
            for row in page:
                state.apply(row.seq, decode_event(row.body))
        assert expected_last_seq is None or state.last_seq == expected_last_seq, (
            f"partition {partition}: log ends at {state.last_seq}, lease says {expected_last_seq}"
        )
        gc.freeze()  # see PartitionWorker._save_snapshot
        _log.info(
            "partition %d: recovered to seq %d (snapshot %d + %d events)",
            partition,
            state.last_seq,
            snapshot_seq,
            state.last_seq - snapshot_seq,
        )
        return state


# What replaces a result that made its reply too large for one NATS message.
REPLY_TOO_LARGE = Failed(
    "reply_too_large", "the answer does not fit in one NATS message; ask for a smaller page"
)
# Room for the batch's own framing when the results are fitted one by one.
_REPLY_FRAMING_BYTES = 64


def fit_results(results: list[AnyResult], bytes_max: int) -> list[AnyResult]:
    """``results`` with the largest ones replaced by ``reply_too_large`` until the reply
    fits in ``bytes_max``. Only answers to queries are large (a grant is a few hundred
    bytes), and a query changed nothing, so refusing it loses nothing."""
    sizes = [len(encode_batch(ResultBatch([result]))) for result in results]
    fitted = list(results)
    total = sum(sizes) + _REPLY_FRAMING_BYTES
    refusal_bytes = len(encode_batch(ResultBatch([REPLY_TOO_LARGE])))
    for index in sorted(range(len(results)), key=sizes.__getitem__, reverse=True):
        if total <= bytes_max:
            break
        fitted[index] = REPLY_TOO_LARGE
        total -= sizes[index] - refusal_bytes
    return fitted


def _failed(requests: Sequence[PendingRequest], failure: Failed) -> list[list[AnyResult]]:
    """The replies that answer every command of ``requests`` with ``failure``."""
    return [[failure] * len(request.commands) for request in requests]


@dataclass(slots=True)
class _Decided:
    """Requests decided and applied in memory, waiting for their append and replies."""

    requests: list[PendingRequest]
    first_seq: int
    rows: list[EventRow]
    replies: list[list[AnyResult]]
    traced: BatchTrace | None
    # The number of events after each command (which command produced which event, so
    # that each event carries its command's trace context).
    ends: list[int]
    commands: int = 0


class PartitionWorker:
    def __init__(
        self,
        lease: Lease,
        state: PartitionState,
        store: LedgerStore,
        relay: EventRelay,
        reply: Reply,
        *,
        batch_commands_max: int,
        queue_requests_max: int,
        loader: StateLoader,
        sweep_interval: timedelta,
        lease_fresh: Callable[[], bool],
        reply_bytes_max: int = NATS_PAYLOAD_BYTES_DEFAULT,
        telemetry: LedgerTelemetry | None = None,
        on_task_done: Callable[[asyncio.Task[Any]], None] | None = None,
    ) -> None:
        self.lease = lease
        # Called when a commit task ends, as for the service's own tasks: a broken
        # invariant there ends the process at once, not at the next batch.
        self._on_task_done = on_task_done
        # None when telemetry is off: then a batch pays nothing for it.
        self._telemetry = telemetry
        self.state = state
        self._store = store
        self._relay = relay
        self._reply = reply
        self._batch_commands_max = batch_commands_max
        self._loader = loader
        self._sweep_interval = sweep_interval
        self._lease_fresh = lease_fresh
        self._reply_bytes_max = reply_bytes_max
        self._snapshot_seq = state.last_seq
        self._snapshot_task: asyncio.Task[None] | None = None
        self._snapshot_forked_at = -math.inf  # time.monotonic() of the last fork
        self._queue: asyncio.Queue[PendingRequest] = asyncio.Queue(maxsize=queue_requests_max)
        self.fenced = False
        # Deciding requests (shutdown waits for it, as for the appends).
        self._deciding = False
        # The batch gathering on top of the append in flight, and the task appending and
        # answering batches one after another while there are any.
        self._next: _Decided | None = None
        self._committing: asyncio.Task[None] | None = None
        # While the committer rebuilds the state after a failed append: decide nothing.
        self._reloading = False
        # Set when the committer takes the gathered batch (the loop waits for it when
        # the batch is full).
        self._taken: asyncio.Future[None] | None = None

    @property
    def partition(self) -> int:
        return self.lease.partition

    def submit(self, request: PendingRequest) -> bool:
        """Queue a request; False when the queue is full (the caller answers "overloaded")."""
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            return False
        return True

    def queued(self) -> int:
        return self._queue.qsize()

    async def sweep_periodically(self) -> None:
        """Queue a sweep every interval (skipped while the queue is full: a later one runs),
        and take a snapshot that is due if the partition is idle.

        A sweep goes through the queue like any command, so its ReservationExpired
        events are ordered, batched and fenced exactly like the rest. A snapshot is
        otherwise considered only after an append: one held back by the spacing when a
        burst ended would wait for the next append, and a takeover meanwhile would
        replay the whole tail.
        """
        while not self.fenced:
            await asyncio.sleep(self._sweep_interval.total_seconds())
            if not self.busy and self._queue.empty():
                # Nothing decided and not appended: the state equals the log.
                self._maybe_snapshot()
            if self.state.holds:
                self.submit(PendingRequest([Sweep()], ""))

    @property
    def busy(self) -> bool:
        """Whether requests are being decided, or appended and answered."""
        return self._deciding or (self._committing is not None and not self._committing.done())

    async def run(self) -> None:
        """Process requests until fenced (or cancelled by the service on shutdown)."""
        try:
            while not self.fenced:
                batch = await self._take()
                if not await self._wait_to_decide():
                    await self._reply_all(batch, _failed(batch, _NOT_OWNER))
                    break
                if not self._lease_fresh():
                    # Our lease may have passed to another replica: even an answer that
                    # writes nothing (a query, an idempotent replay) could be stale.
                    stale = Failed(
                        "not_owner", "this ledger replica cannot confirm it owns the partition"
                    )
                    await self._reply_all(batch, _failed(batch, stale))
                    continue
                self._deciding = True
                try:
                    self._next = self._decide(batch, self._next)
                finally:
                    self._deciding = False
                if self._committing is None or self._committing.done():
                    self._committing = asyncio.create_task(
                        self._commit_while_decided(), name=f"commit-{self.partition}"
                    )
                    if self._on_task_done is not None:
                        self._committing.add_done_callback(self._on_task_done)
            if self._committing is not None:
                await self._committing
        finally:
            if self._committing is not None and not self._committing.done():
                self._committing.cancel()

    async def _take(self) -> list[PendingRequest]:
        """Every waiting request (at least one; at most ``batch_commands_max`` commands)."""
        batch = [await self._queue.get()]
        commands = len(batch[0].commands)
        while commands < self._batch_commands_max and not self._queue.empty():
            request = self._queue.get_nowait()
            batch.append(request)
            commands += len(request.commands)
        return batch

    async def _wait_to_decide(self) -> bool:
        """Wait while deciding now would be wrong or unbounded: the committer rebuilds
        the state after a failed append, a snapshot is due (the state must equal the log:
        let the appends land), or the gathered batch is full (let its append start).
        False when the partition was lost meanwhile (fenced)."""
        while (committing := self._committing) is not None and not committing.done():
            if self._reloading or self._snapshot_due():
                await asyncio.wait([committing])
            elif self._next is not None and self._next.commands >= self._batch_commands_max:
                if self._taken is None:
                    self._taken = asyncio.get_running_loop().create_future()
                await asyncio.wait([self._taken, committing], return_when=asyncio.FIRST_COMPLETED)
            else:
                break
        return not self.fenced

    def _decide(self, batch: list[PendingRequest], into: _Decided | None) -> _Decided:
        """Decide and apply ``batch`` in memory on top of the batch gathered so far
        (``into``), or as a new one (no awaits: nothing interleaves)."""
        now_ms = time.time_ns() // 1_000_000
        state = self.state
        decided = into or _Decided([], state.last_seq + 1, [], [], None, [])
        telemetry = self._telemetry
        if telemetry is not None and telemetry.tracing:
            decided.traced = telemetry.begin_batch(
                self.partition,
                [request.trace for request in batch],
                [len(request.commands) for request in batch],
                decided.traced,
                (len(decided.requests), decided.commands),
            )
        decided.requests.extend(batch)
        rows, ends = decided.rows, decided.ends
        for request in batch:
            results: list[AnyResult] = []
            for command in request.commands:
                decision = state.decide(command, now_ms)
                for event in decision.events:
                    seq = state.last_seq + 1
                    state.apply(seq, event)
                    rows.append(EventRow(seq, event_type(event), encode_event(event)))
                results.append(decision.result)
                ends.append(len(rows))
            decided.replies.append(results)
            decided.commands += len(results)
        return decided

    async def _commit_while_decided(self) -> None:
        """Append and answer the gathered batches one after another until none is left.

        After a failed append, the batch decided on top of it is answered the same
        failure, and after ``store_unavailable`` the state is rebuilt from the log (the
        append may or may not have landed) before anything else is decided.
        """
        while (decided := self._take_decided()) is not None:
            failure = await self._commit(decided)
            if failure is None:
                continue
            on_top = self._take_decided()
            if on_top is not None:
                await self._answer(on_top, failure, None)
            if self._reloading:
                try:
                    await self._reload()
                finally:
                    self._reloading = False

    def _take_decided(self) -> _Decided | None:
        decided, self._next = self._next, None
        if self._taken is not None:
            self._taken.set_result(None)
            self._taken = None
        return decided

    async def _commit(self, decided: _Decided) -> Failed | None:
        """Append ``decided``'s events, hand them to the relay, answer its requests; the
        failure every request got, if the append failed."""
        rows = decided.rows
        append_started_ns = time.time_ns()
        failure = await self._append(decided.first_seq, rows) if rows else None
        append_ns = (append_started_ns, time.time_ns())
        if failure is not None:
            # From here on nothing is decided until the state is rebuilt from the log
            # (the append may or may not have landed); what was decided on top of this
            # batch is answered the same failure.
            self._reloading = failure.code == "store_unavailable"
            await self._answer(decided, failure, append_ns)
            return failure
        if rows:
            traceparents = None
            if decided.traced is not None:
                traceparents = decided.traced.event_traceparents(rows, decided.ends)
            self._relay.committed(rows, rows[-1].seq, traceparents)
            if self.state.last_seq == rows[-1].seq:
                self._maybe_snapshot()  # nothing is decided on top: the state is the log
        await self._finish(decided, decided.replies, rows, append_ns, None)
        return None

    async def _answer(
        self, decided: _Decided, failure: Failed, append_ns: tuple[int, int] | None
    ) -> None:
        """Answer every request of ``decided`` with ``failure``: its append failed (it
        started and ended at ``append_ns``), or it was decided on top of one that did."""
        rows = decided.rows if append_ns is not None else []
        replies = _failed(decided.requests, failure)
        await self._finish(decided, replies, rows, append_ns or (0, 0), failure)

    async def _finish(
        self,
        decided: _Decided,
        replies: list[list[AnyResult]],
        rows: Sequence[EventRow],
        append_ns: tuple[int, int],
        failure: Failed | None,
    ) -> None:
        """Send ``decided``'s replies, then record the batch (metrics, end of its spans)."""
        await self._reply_all(decided.requests, replies)
        if self._telemetry is not None:
            commands = [request.commands for request in decided.requests]
            self._telemetry.end_batch(decided.traced, commands, replies, rows, append_ns, failure)

    async def _reply_all(self, batch: list[PendingRequest], replies: list[list[AnyResult]]) -> None:
        """Answer each request. A reply NATS refuses (the connection is closed or being
        re-established) is lost, not fatal: what was decided stands (it is in the log, or
        failed as a whole), and the caller times out and retries with its idempotency key."""
        lost: BaseException | None = None
        for request, results in zip(batch, replies, strict=True):
            if request.reply_subject:
                body = encode_batch(ResultBatch(results))
                if len(body) > self._reply_bytes_max:
                    body = encode_batch(ResultBatch(fit_results(results, self._reply_bytes_max)))
                try:
                    await self._reply(request.reply_subject, body)
                except (NatsError, OSError, RuntimeError) as error:
                    # RuntimeError: uvloop refuses a write on a transport that closed
                    # under nats-py during a reconnect.
                    lost = error
        if lost is not None:
            _log.warning("partition %d: replies not sent: %r", self.partition, lost)

    def _snapshot_interval(self) -> int:
        return max(self._loader.snapshot_every_events, self.state.entries() // 2)

    def _snapshot_due(self) -> bool:
        """Whether a snapshot is due and none is being written. (Asked before every
        batch while an append is in flight: the spacing, false on a hot partition nearly
        always, is checked before the interval, which counts the state's records.)"""
        writing = self._snapshot_task is not None and not self._snapshot_task.done()
        return (
            not writing
            and time.monotonic() - self._snapshot_forked_at >= SNAPSHOT_SPACING_MIN.total_seconds()
            and self.state.last_seq - self._snapshot_seq >= self._snapshot_interval()
        )

    def _maybe_snapshot(self) -> None:
        """Snapshot the state (the caller knows it equals the log) and write it in the
        background, one at a time, every ``snapshot_every_events`` events, or every half
        as many events as the state holds records when that is more, and at most once
        per ``SNAPSHOT_SPACING_MIN``.

        Encoding costs time in proportion to the state, so a fixed interval made a large
        state (a million settled ids kept for an hour) re-encode itself every few seconds
        under load: a core's worth of snapshot children competing with the loop. With the
        interval at least half the state's size, the cost per event stays bounded (two
        records encoded per event), and recovery (decode the snapshot, replay the tail)
        stays proportional to the state's size."""
        if not self._snapshot_due():
            return
        seq = self._snapshot_seq = self.state.last_seq
        partition, snapshots = self.partition, self._loader.snapshots
        forked_at = self._snapshot_forked_at = time.monotonic()
        saving = fork_save_snapshot(self.state, lambda body: snapshots.save(partition, seq, body))
        self._snapshot_task = asyncio.create_task(self._save_snapshot(seq, forked_at, saving))

    async def _save_snapshot(self, seq: int, forked_at: float, saving: Awaitable[None]) -> None:
        failure: Exception | None = None
        try:
            await saving
        except (StoreUnavailableError, SnapshotChildError) as error:
            failure = error
        duration_s = time.monotonic() - forked_at
        if self._telemetry is not None:
            self._telemetry.snapshot_done(failure is None, duration_s)
        if failure is not None:
            # Harmless: recovery uses an older snapshot and replays a longer tail.
            _log.warning("partition %d: snapshot at %d not saved: %s", self.partition, seq, failure)
            return
        _log.info("partition %d: snapshot at %d stored in %.2f s", self.partition, seq, duration_s)
        # Long-lived state need not be scanned by every full collection (tens of ms with
        # a large state): move what exists now out of the collector's generations.
        gc.freeze()

    async def _append(self, first_seq: int, rows: list[EventRow]) -> Failed | None:
        try:
            await self._store.append(self.lease, first_seq, rows)
        except FencedError:
            _log.error(
                "partition %d: fenced (epoch %d), dropping it", self.partition, self.lease.epoch
            )
            self.fenced = True
            return _NOT_OWNER
        except StoreUnavailableError as error:
            _log.warning("partition %d: append failed: %s", self.partition, error)
            return Failed("store_unavailable", "the ledger could not reach its database")
        return None

    async def _reload(self) -> None:
        """Rebuild state from the log after a failed append (it may or may not have landed)."""
        while not self.fenced:
            try:
                self.state = await self._loader.load(self.partition, expected_last_seq=None)
                self._snapshot_seq = self.state.last_seq
                self._relay.committed([], self.state.last_seq)
                return
            except StoreUnavailableError:
                await asyncio.sleep(RELOAD_RETRY_PAUSE.total_seconds())
