"""The ledger service: leases, one worker and one relay per owned partition, NATS wiring.

Start: connect Postgres (apply migrations) and NATS (ensure the events stream), then the
lease loop claims free partitions; for each it replays the log, starts the partition loop
and the relay, and subscribes to the partition's command subject (queue group, so a
message reaches one replica even while ownership moves). A partition whose lease is lost
or whose append was fenced is dropped at once.

Stop (SIGTERM): unsubscribe, let the loops finish what is queued, let the relays publish
what is committed, give the leases up so another replica takes over without waiting,
drain NATS, close the pool, all within ``shutdown_deadline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from spendgate_common import nats_adapter, pg
from spendgate_common.errors import StoreUnavailableError
from spendgate_common.ledger_v1 import (
    Failed,
    ResultBatch,
    decode_command_batch,
    encode_batch,
)
from spendgate_common.limits import COMMANDS_PER_REQUEST_MAX
from spendgate_common.migrate import apply_migrations
from spendgate_common.ops_http import Check, ops_server_if_enabled
from spendgate_common.subjects import ledger_command_subject
from spendgate_common.telemetry import Telemetry
from spendgate_ledger._partition import PartitionWorker, PendingRequest, StateConfig, StateLoader
from spendgate_ledger._relay import EventRelay, WatermarkWriter
from spendgate_ledger._replicas import ReplicaRegistry, fair_share
from spendgate_ledger._settings import LedgerSettings
from spendgate_ledger._snapshot_store import SnapshotStore
from spendgate_ledger._store import Lease, LedgerStore
from spendgate_ledger._telemetry import LedgerTelemetry

_log = logging.getLogger(__name__)

QUEUE_GROUP = "spendgate-ledger"
# Bounds of one partition subscription's client-side buffer; beyond them NATS drops
# messages loudly (slow consumer) and the callers time out and retry.
SUBSCRIPTION_PENDING_MESSAGES_MAX = 100_000
SUBSCRIPTION_PENDING_BYTES_MAX = 256 * 1024 * 1024
# Events a relay keeps in memory before it falls back to reading the log.
RELAY_BUFFER_EVENTS_MAX = 200_000
CONNECT_DEADLINE = timedelta(seconds=30)
# Lease timing, as fractions of SPENDGATE_LEDGER_LEASE_MS. A lease row is valid for 3/4 of
# the lease after each renewal and rounds run every 1/4, so a dead owner's partitions are
# free at most 3/4 lease after its death and claimed at most 1/4 later: the takeover fits
# in one lease time. A replica that has not renewed for 1/2 lease stops answering itself,
# before anyone else can own its partitions (and its appends would be fenced anyway).
LEASE_ROUND_FRACTION = 0.25
LEASE_ROW_TTL_FRACTION = 0.75
SELF_DROP_FRACTION = 0.5
# Exit status of a process whose partition loop hit a broken invariant (EX_SOFTWARE).
EXIT_CODE_CRASHED = 70
# /healthz fails when the lease loop has not run a round for this many leases (at least
# LIVENESS_STALL_MIN): a stuck loop. Postgres being away does not stop the rounds.
LIVENESS_STALL_LEASES = 6
LIVENESS_STALL_MIN = timedelta(seconds=60)


@dataclass(slots=True)
class _Owned:
    worker: PartitionWorker
    relay: EventRelay
    subscription: Subscription
    tasks: tuple[asyncio.Task[None], ...]


class LedgerService:
    """One ledger replica. ``exit_on_crash``: a partition task that dies ends the process.

    A dying partition loop or relay means a broken invariant (STYLE rule 6). The process
    form (``python -m spendgate_ledger``) exits, the orchestrator restarts it, and the
    state is rebuilt from the log; in-process users (tests) get the partition dropped and
    the error re-raised by :meth:`stop`.
    """

    def __init__(
        self,
        settings: LedgerSettings,
        *,
        exit_on_crash: bool = False,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._settings = settings
        self._exit_on_crash = exit_on_crash
        self._telemetry = LedgerTelemetry(telemetry or Telemetry.disabled())
        self._ops = ops_server_if_enabled(
            settings.metrics_host,
            settings.metrics_port,
            self._telemetry.telemetry,
            live=self._live,
            ready=self._ready,
        )
        self._started = False
        self._lease_round_at = 0.0

        self.crash: BaseException | None = None
        self._owned: dict[int, _Owned] = {}
        self._stopping = asyncio.Event()
        self._renewed_at = 0.0
        self._pool: asyncpg.Pool | None = None
        self._nats: NatsClient | None = None
        self._store: LedgerStore | None = None
        self._replicas: ReplicaRegistry | None = None
        self._loader: StateLoader | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._watermark_task: asyncio.Task[None] | None = None

    @property
    def owned_partitions(self) -> list[int]:
        return sorted(self._owned)

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._close_connections(timedelta(seconds=5))
            raise

    async def _start(self) -> None:
        settings = self._settings
        if self._ops is not None:
            # First, so that metrics and probes answer during a long start (replays).
            await self._ops.start()
        self._telemetry.watch(
            lambda: len(self._owned),
            lambda: {
                p: o.relay.committed_seq - o.relay.published_seq for p, o in self._owned_now()
            },
            lambda: sum(owned.worker.queued() for _, owned in self._owned_now()),
            self._remembered,
        )
        self._pool = await pg.create_pool(
            settings.database_url,
            min_size=2,
            max_size=settings.database_pool_max,
            statement_timeout=settings.statement_timeout,
            connect_deadline=CONNECT_DEADLINE,
        )
        async with pg.translate_errors("migrate"), self._pool.acquire() as connection:
            applied = await apply_migrations(connection)
        if applied:
            _log.info("applied migrations %s", applied)
        self._store = LedgerStore(self._pool, settings.owner_id)
        self._replicas = ReplicaRegistry(self._pool, settings.owner_id)
        self._loader = StateLoader(
            self._store,
            SnapshotStore(self._pool, settings.database_url),
            StateConfig(
                partition_count=settings.common.partition_count,
                hold_default=settings.hold_default,
                retention=settings.idempotency_retention,
                settled_retention=settings.settled_retention,
            ),
            snapshot_every_events=settings.snapshot_every_events,
        )
        await self._store.seed_partitions(settings.common.partition_count)
        self._nats = await nats_adapter.connect(
            settings.common.nats_url, name="spendgate-ledger", connect_deadline=CONNECT_DEADLINE
        )
        await nats_adapter.ensure_events_stream(
            self._nats.jetstream(), settings.common.events_stream
        )
        await self._lease_round()
        self._lease_task = asyncio.create_task(self._lease_loop(), name="ledger-leases")
        watermarks = WatermarkWriter(
            self._store, lambda: [owned.relay for _, owned in self._owned_now()]
        )
        self._watermark_task = asyncio.create_task(watermarks.run(), name="ledger-watermarks")
        self._started = True
        _log.info("ledger %s started, owns %d partitions", settings.owner_id, len(self._owned))

    async def stop(self) -> None:
        self._stopping.set()
        deadline = self._settings.shutdown_deadline
        give_up_at = time.monotonic() + deadline.total_seconds()
        for task in (self._lease_task, self._watermark_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._replicas is not None:
            with contextlib.suppress(StoreUnavailableError):
                await self._replicas.leave()
        await self._release(sorted(self._owned), deadline)
        remaining = timedelta(seconds=max(0.1, give_up_at - time.monotonic()))
        await self._close_connections(remaining)
        if self._ops is not None:
            await self._ops.stop()
        _log.info("ledger %s stopped", self._settings.owner_id)
        if self.crash is not None:
            raise self.crash

    async def _release(self, partitions: list[int], deadline: timedelta) -> None:
        """Hand partitions over gracefully: stop taking requests, finish what was accepted,
        publish what committed, then give the leases up so a peer takes over at once."""
        give_up_at = time.monotonic() + deadline.total_seconds()
        releasing = [self._owned[partition] for partition in partitions]
        # Drain: requests already delivered to us are still handed to the loops.
        for owned in releasing:
            with contextlib.suppress(Exception):
                await owned.subscription.drain()  # type: ignore[no-untyped-call]
        while any(o.worker.queued() or o.worker.busy for o in releasing):
            if time.monotonic() > give_up_at:
                break
            await asyncio.sleep(0.01)
        for owned in releasing:
            remaining = max(0.0, give_up_at - time.monotonic())
            await owned.relay.wait_idle(timedelta(seconds=remaining))
        leases = [owned.worker.lease for owned in releasing]
        for partition in partitions:
            await self._drop(partition, unsubscribe=False)
        self._telemetry.lease_changes.add(("released",), len(partitions))
        if self._store is not None:
            with contextlib.suppress(StoreUnavailableError):
                await self._store.give_up(leases)

    async def _close_connections(self, deadline: timedelta) -> None:
        if self._nats is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nats.drain(), deadline.total_seconds() / 2)
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), deadline.total_seconds() / 2)

    # ------------------------------------------------------------------------ leases

    async def _lease_loop(self) -> None:
        interval_s = (self._settings.lease * LEASE_ROUND_FRACTION).total_seconds()
        while not self._stopping.is_set():
            await asyncio.sleep(interval_s)
            try:
                await self._lease_round()
            except (StoreUnavailableError, NatsError, OSError, TimeoutError) as error:
                _log.warning("lease round failed: %s", error)
            self._lease_round_at = time.monotonic()
            # Without a renewal for a whole lease period, another replica may own our
            # partitions by now: stop answering for them (appends would be fenced anyway).
            unrenewed_s = time.monotonic() - self._renewed_at
            if unrenewed_s > (self._settings.lease * SELF_DROP_FRACTION).total_seconds():
                for partition in list(self._owned):
                    _log.error("partition %d: lease not renewed in time, dropping", partition)
                    await self._drop(partition)
                    self._telemetry.lease_changes.add(("lost",))

    async def _lease_round(self) -> None:
        assert self._store is not None
        settings = self._settings
        row_ttl = settings.lease * LEASE_ROW_TTL_FRACTION
        await self._renew(row_ttl)
        if self._stopping.is_set():
            return
        assert self._replicas is not None
        share = fair_share(settings.common.partition_count, await self._replicas.heartbeat(row_ttl))
        if len(self._owned) > share:
            # Another replica joined: hand our surplus over (it claims it next round).
            surplus = sorted(self._owned)[share:]
            _log.info("handing over partitions %s (fair share %d)", surplus, share)
            await self._release(surplus, settings.lease)
            return
        claimed = await self._store.claim_free(row_ttl, share - len(self._owned))
        pending = list(claimed)
        round_s = (settings.lease * LEASE_ROUND_FRACTION).total_seconds()
        while pending:
            await self._adopt(pending.pop(0))
            # Replaying a long log must not outlive the leases (valid 3/4 lease): renew
            # the owned ones and those still to adopt whenever a round's time has passed.
            if pending and time.monotonic() - self._renewed_at > round_s:
                still_ours = await self._renew(row_ttl, pending)
                pending = [lease for lease in pending if lease.partition in still_ours]
        if claimed:
            # The server must know the new subscriptions before we answer as their owner.
            assert self._nats is not None
            await self._nats.flush()

    def _lease_fresh(self) -> bool:
        """Renewed recently enough that no other replica can own our partitions yet."""
        limit_s = (self._settings.lease * SELF_DROP_FRACTION).total_seconds()
        return time.monotonic() - self._renewed_at <= limit_s

    async def _renew(self, row_ttl: timedelta, pending: Sequence[Lease] = ()) -> set[int]:
        """Renew our leases (and ``pending`` claimed ones); drop owned partitions we lost."""
        assert self._store is not None
        leases = [owned.worker.lease for owned in self._owned.values()]
        # Freshness counts from before the renewal was sent: its rows expire no earlier
        # than that plus their time to live, whenever the answer came back (a process
        # frozen in between would otherwise count its leases fresh from its waking).
        sent_at = time.monotonic()
        still_ours = await self._store.renew([*leases, *pending], row_ttl)
        lost = [p for p, owned in self._owned.items() if p not in still_ours or owned.worker.fenced]
        # Before anything awaits: the renewal makes this replica's leases fresh again, and
        # a lost partition must not answer from its state meanwhile (a replica that was
        # frozen holds decisions that never reached the log, and a read-only answer or a
        # refusal is sent without an append that the epoch would fence).
        for partition in lost:
            self._owned[partition].worker.fenced = True
        self._renewed_at = sent_at
        for partition in lost:
            _log.warning("partition %d: lease lost, dropping", partition)
            await self._drop(partition)
            self._telemetry.lease_changes.add(("lost",))
        return still_ours

    async def _adopt(self, lease: Lease) -> None:
        assert self._store is not None
        assert self._nats is not None
        settings = self._settings
        if lease.partition in self._owned:
            await self._drop(lease.partition)
        assert self._loader is not None
        state = await self._loader.load(lease.partition, expected_last_seq=lease.last_seq)
        relay = EventRelay(
            lease.partition,
            self._nats,
            self._store,
            await self._store.published_seq(lease.partition),
            inflight_max=settings.relay_inflight_max,
            buffer_events_max=RELAY_BUFFER_EVENTS_MAX,
        )
        relay.committed([], state.last_seq)
        worker = PartitionWorker(
            lease,
            state,
            self._store,
            relay,
            self._nats.publish,
            batch_commands_max=settings.batch_commands_max,
            queue_requests_max=settings.partition_queue_requests_max,
            loader=self._loader,
            sweep_interval=settings.sweep_interval,
            lease_fresh=self._lease_fresh,
            reply_bytes_max=self._nats.max_payload,
            telemetry=self._telemetry if self._telemetry.active else None,
            on_task_done=self._on_task_done,
        )
        tasks = (
            asyncio.create_task(worker.run(), name=f"partition-{lease.partition}"),
            asyncio.create_task(relay.run(), name=f"relay-{lease.partition}"),
            asyncio.create_task(worker.sweep_periodically(), name=f"sweep-{lease.partition}"),
        )
        for task in tasks:
            task.add_done_callback(self._on_task_done)
        subscription = await self._nats.subscribe(
            ledger_command_subject(lease.partition),
            queue=QUEUE_GROUP,
            cb=self._on_request,
            pending_msgs_limit=SUBSCRIPTION_PENDING_MESSAGES_MAX,
            pending_bytes_limit=SUBSCRIPTION_PENDING_BYTES_MAX,
        )
        self._owned[lease.partition] = _Owned(worker, relay, subscription, tasks)
        self._telemetry.lease_changes.add(("acquired",))
        _log.info(
            "partition %d: owned at epoch %d (seq %d)", lease.partition, lease.epoch, state.last_seq
        )

    def _on_task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        _log.critical("%s died: %r", task.get_name(), error, exc_info=error)
        if self._exit_on_crash:
            # The log is the truth: a restarted process rebuilds a correct state from it.
            os._exit(EXIT_CODE_CRASHED)
        self.crash = error
        partition = int(task.get_name().rsplit("-", 1)[1])
        if partition in self._owned and task in self._owned[partition].tasks:
            asyncio.get_running_loop().create_task(self._drop(partition))

    async def _drop(self, partition: int, *, unsubscribe: bool = True) -> None:
        owned = self._owned.pop(partition)
        if unsubscribe:
            with contextlib.suppress(Exception):
                await owned.subscription.unsubscribe()
        for task in owned.tasks:
            task.cancel()
        for task in owned.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ---------------------------------------------------------------------- requests

    async def _on_request(self, msg: Msg) -> None:
        """NATS callback: decode and hand over to the partition loop. Never awaits Postgres."""
        if not msg.reply:
            return
        try:
            batch = decode_command_batch(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            await self._refuse(msg.reply, 1, Failed("malformed_request", str(error)))
            return
        count = len(batch.commands)
        partition = int(msg.subject.split(".")[3])
        owned = self._owned.get(partition)
        if batch.partition != partition or not 0 < count <= COMMANDS_PER_REQUEST_MAX:
            failure = Failed("malformed_request", "wrong partition or command count")
            await self._refuse(msg.reply, max(count, 1), failure)
        elif owned is None or owned.worker.fenced:
            await self._refuse(msg.reply, count, Failed("not_owner", "partition not owned here"))
        else:
            trace = None
            if self._telemetry.tracing:
                trace = self._telemetry.request_trace(msg.headers, count)
            if not owned.worker.submit(PendingRequest(batch.commands, msg.reply, trace)):
                failure = Failed("overloaded", "partition queue is full")
                await self._refuse(msg.reply, count, failure)

    async def _refuse(self, reply: str, count: int, failure: Failed) -> None:
        assert self._nats is not None
        self._telemetry.refusals.add((failure.code,))
        await self._nats.publish(reply, encode_batch(ResultBatch([failure] * count)))

    # ---------------------------------------------------------------- operations

    def _owned_now(self) -> list[tuple[int, _Owned]]:
        """A copy of the owned partitions, safe to read from the metrics thread."""
        return list(self._owned.items())

    def _remembered(self) -> dict[str, int]:
        """Records the owned partitions hold, by kind (read from the metrics thread)."""
        states = [owned.worker.state for _, owned in self._owned_now()]
        return {
            "settled_id": sum(len(state.settled) for state in states),
            "answer": sum(len(state.idempotency) for state in states),
            "hold": sum(len(state.holds) for state in states),
        }

    def _live(self) -> Check:
        """Liveness: started, and the lease loop ran a round recently (stuck otherwise)."""
        if not self._started:
            return Check(False, {"reason": "starting"})
        stall = max(self._settings.lease * LIVENESS_STALL_LEASES, LIVENESS_STALL_MIN)
        since_s = time.monotonic() - max(self._lease_round_at, self._renewed_at)
        if since_s > stall.total_seconds():
            return Check(False, {"reason": f"no lease round for {since_s:.0f} s"})
        return Check(True)

    def _ready(self) -> Check:
        """Readiness: started, connected to NATS and its leases renewed recently, so it
        answers for its partitions (or stands by when every partition has an owner)."""
        connected = self._nats is not None and self._nats.is_connected
        fresh = self._started and self._lease_fresh()
        detail: dict[str, object] = {"partitions": len(self._owned), "nats": connected}
        return Check(connected and fresh and not self._stopping.is_set(), detail)
