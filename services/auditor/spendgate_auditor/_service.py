"""The auditor service: a durable JetStream pull consumer that chains, signs and rolls up
events in Postgres, and publishes finance events.

Start: connect Postgres (apply migrations), register the signing key's public half, connect
NATS (ensure the events and finance streams), create or update the durable pull consumer
``AUDITOR_DURABLE`` (explicit acks, bounded pending), answer the audit API
(:mod:`spendgate_auditor._api`), then loop: fetch a bounded batch, chain it, sign the
checkpoints due, and apply it to the rollups and the finance outbox, all in one Postgres
transaction; only after the commit ack what was chained or was a duplicate, nak (with a
delay) what is held behind a gap, and publish the batch's finance events. Nothing is ever
acked before its commit, so a crash at any point leads to a redelivery, which the heads
recognise as duplicates. Between batches, heads whose unsigned events are
``checkpoint_interval`` old are signed.

When Postgres or NATS goes away the loop logs, pauses (doubling up to a bound) and
continues; the fetched messages are nak'd so that they come back after the pause.

Stop (SIGTERM): finish the batch in flight, unsubscribe, drain NATS, close the pool, all
within ``shutdown_deadline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from spendgate_auditor._api import AuditApi
from spendgate_auditor._approval_webhooks import ApprovalWebhooks
from spendgate_auditor._chain import ChainHead
from spendgate_auditor._checkpoints import CheckpointSchedule
from spendgate_auditor._finance import FinancePublisher, ensure_finance_stream
from spendgate_auditor._gaps import GapWatch
from spendgate_auditor._plan import BatchPlan, Delivery, parse_deliveries
from spendgate_auditor._settings import AuditorSettings
from spendgate_auditor._signing import Signer
from spendgate_auditor._store import AuditStore, BatchOutcome, CheckpointRow
from spendgate_auditor._telemetry import AuditorTelemetry
from spendgate_common import audit_v1, nats_adapter, pg
from spendgate_common.errors import StoreUnavailableError
from spendgate_common.migrate import apply_migrations
from spendgate_common.ops_http import Check, ops_server_if_enabled
from spendgate_common.subjects import AUDITOR_DURABLE, EVENTS_STREAM
from spendgate_common.telemetry import Telemetry

_log = logging.getLogger(__name__)

# Bounds of the pull subscription's client-side buffer. A fetch asks for at most
# ``fetch_messages_max`` messages, so these only guard against a misbehaving server.
SUBSCRIPTION_PENDING_MESSAGES_MAX = 20_000
SUBSCRIPTION_PENDING_BYTES_MAX = 64 * 1024 * 1024
# Exit status of a process whose loop hit a broken invariant (EX_SOFTWARE).
EXIT_CODE_CRASHED = 70
# Errors of NATS calls on the consume path (connection lost, request timed out).
_NATS_ERRORS = (NatsError, OSError, TimeoutError)
# Shortest fetch wait when a checkpoint is due soon (a fetch returns at once with messages).
FETCH_WAIT_MIN_S = 0.05
# Most events chained in one Postgres transaction. A fetch of version 2 messages holds up
# to fetch_messages_max * 128 events; it is chained in transactions of whole messages.
TRANSACTION_EVENTS_MAX = 4_096
# Most skipped-event reasons logged per batch (the rest are counted).
SKIPPED_LOGGED_MAX = 10
# /healthz fails when the consume loop has not come round for this long (at least this,
# and at least four fetch waits): a hung loop. Postgres or NATS away only slows it.
LIVENESS_STALL = timedelta(seconds=120)
LIVENESS_STALL_FETCH_WAITS = 4


@dataclass(slots=True)
class Counters:
    """The auditor's counters and gauges (docs/audit.md, "Lag and counters")."""

    events_chained: int = 0
    batches: int = 0
    duplicates: int = 0
    lag_events: int = 0
    lag_ms: int = 0
    checkpoints_signed: int = 0
    gaps_seen: int = 0
    gap_alarms: int = 0
    rollup_skipped_events: int = 0


class AuditorService:
    """One auditor. ``exit_on_crash``: a broken invariant in the loop ends the process.

    The process form (``python -m spendgate_auditor``) sets it, so the orchestrator
    restarts the auditor and it resumes from its heads; in-process users (tests) leave it
    off and find the error re-raised by :meth:`stop`.
    """

    def __init__(
        self,
        settings: AuditorSettings,
        *,
        exit_on_crash: bool = False,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._settings = settings
        self._exit_on_crash = exit_on_crash
        self._telemetry = AuditorTelemetry(telemetry or Telemetry.disabled())
        self._ops = ops_server_if_enabled(
            settings.metrics_host,
            settings.metrics_port,
            self._telemetry.telemetry,
            live=self._live,
            ready=self._ready,
        )
        self._started = False
        self._loop_beat = 0.0
        self._stopping = asyncio.Event()
        self._pool: asyncpg.Pool | None = None
        self._nats: NatsClient | None = None
        self._subscription: JetStreamContext.PullSubscription | None = None
        self._store: AuditStore | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._webhooks: ApprovalWebhooks | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._pause_s = settings.retry_pause_min.total_seconds()
        self._gaps = GapWatch(settings.gap_alarm_after.total_seconds())
        if settings.signing_key is not None:
            self._signer = Signer.of(settings.signing_key)
        else:
            self._signer = Signer.generate_ephemeral()
        self._schedule = CheckpointSchedule(
            settings.checkpoint_every_events, settings.checkpoint_interval.total_seconds()
        )
        self._finance: FinancePublisher | None = None
        self._api: AuditApi | None = None
        self.counters = Counters()

    # ------------------------------------------------------------- what the API needs

    @property
    def store(self) -> AuditStore:
        assert self._store is not None
        return self._store

    @property
    def signing_key_id(self) -> str:
        return self._signer.key_id

    @property
    def database_url(self) -> str:
        return self._settings.database_url

    @property
    def verify_deadline_s(self) -> float:
        return self._settings.verify_deadline.total_seconds()

    async def sign_heads_now(self) -> list[CheckpointRow]:
        """Sign every partition's head now (on demand); the checkpoint of every head."""
        written, every = await self.store.sign_heads(None, self._signer)
        self._signed(written, every)
        return every

    def status(self) -> audit_v1.AuditorStatus:
        counters = self.counters
        finance = self._finance
        return audit_v1.AuditorStatus(
            events_chained=counters.events_chained,
            batches=counters.batches,
            duplicates=counters.duplicates,
            lag_events=counters.lag_events,
            lag_ms=counters.lag_ms,
            checkpoints_signed=counters.checkpoints_signed,
            finance_published=0 if finance is None else finance.published,
            finance_pending=0 if finance is None else finance.pending,
            gaps_seen=counters.gaps_seen,
            gap_alarms=counters.gap_alarms,
            stalled_partitions=self._gaps.stalled(),
            rollup_skipped_events=counters.rollup_skipped_events,
            signing_key_id=self._signer.key_id,
            signing_key_ephemeral=self._signer.ephemeral,
        )

    def _signed(self, written: Sequence[CheckpointRow], every: Sequence[CheckpointRow]) -> None:
        self.counters.checkpoints_signed += len(written)
        self._schedule.signed(ChainHead(row.partition, row.seq, row.link) for row in every)

    async def start(self) -> None:
        settings = self._settings
        if self._ops is not None:
            await self._ops.start()
        self._telemetry.watch(self.status)
        self._pool = await pg.create_pool(
            settings.database_url,
            min_size=1,
            max_size=settings.database_pool_max,
            statement_timeout=settings.statement_timeout,
            connect_deadline=settings.connect_deadline,
        )
        async with pg.translate_errors("migrate"), self._pool.acquire() as connection:
            applied = await apply_migrations(connection)
        if applied:
            _log.info("applied migrations %s", applied)
        self._store = AuditStore(self._pool)
        await self._store.register_key(self._signer)
        if self._signer.ephemeral:
            _log.warning(
                "no signing key configured (SPENDGATE_AUDIT_SIGNING_KEY_FILE or"
                " SPENDGATE_AUDIT_SIGNING_KEY): signing with an ephemeral key %s that lives"
                " only in this process; every restart adds a key, so configure one",
                self._signer.key_id,
            )
        heads, signed = await self._store.heads_and_signed()
        self._schedule.load(heads, signed, time.monotonic())
        self._nats = await nats_adapter.connect(
            settings.common.nats_url,
            name="spendgate-auditor",
            connect_deadline=settings.connect_deadline,
        )
        jetstream = self._nats.jetstream()
        await self._ensure_consumer(jetstream)
        await ensure_finance_stream(jetstream, replicas=settings.common.events_stream.replicas)
        self._finance = FinancePublisher(jetstream, self._store, settings.finance_publish_timeout)
        self._subscription = await jetstream.pull_subscribe_bind(
            durable=AUDITOR_DURABLE,
            stream=EVENTS_STREAM,
            pending_msgs_limit=SUBSCRIPTION_PENDING_MESSAGES_MAX,
            pending_bytes_limit=SUBSCRIPTION_PENDING_BYTES_MAX,
        )
        self._api = AuditApi(self._nats, self)
        await self._api.start()
        self._loop_task = asyncio.create_task(self._consume(), name="auditor-consume")
        self._loop_task.add_done_callback(self._on_loop_done)
        self._loop_beat = time.monotonic()
        self._started = True
        self._status_task = asyncio.create_task(self._log_status(), name="auditor-status")
        if settings.approval_webhook_url and settings.approval_webhook_secret:
            # Its own consumer: a slow webhook never holds up the chain.
            self._webhooks = ApprovalWebhooks(
                jetstream, settings.approval_webhook_url, settings.approval_webhook_secret
            )
            await self._webhooks.start()
        _log.info(
            "auditor started: consumer %s on stream %s, signing key %s",
            AUDITOR_DURABLE,
            EVENTS_STREAM,
            self._signer.key_id,
        )

    async def _ensure_consumer(self, jetstream: JetStreamContext) -> None:
        """Create the stream and the consumer, or update them to our configuration."""
        settings = self._settings
        await nats_adapter.ensure_events_stream(jetstream, settings.common.events_stream)
        # Naming the consumer makes add_consumer create-or-update it, so a changed bound
        # takes effect on restart. Unlimited deliveries: an event is never given up on.
        config = ConsumerConfig(
            name=AUDITOR_DURABLE,
            durable_name=AUDITOR_DURABLE,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=settings.ack_wait.total_seconds(),
            max_ack_pending=settings.ack_pending_max,
            max_deliver=-1,
        )
        await jetstream.add_consumer(EVENTS_STREAM, config)

    def _on_loop_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        _log.critical("auditor loop crashed", exc_info=task.exception())
        if self._exit_on_crash:
            # Nothing is acked before its commit, so dying here loses nothing.
            os._exit(EXIT_CODE_CRASHED)

    async def stop(self) -> None:
        self._stopping.set()
        give_up_at = time.monotonic() + self._settings.shutdown_deadline.total_seconds()

        def remaining_s() -> float:
            return max(0.1, give_up_at - time.monotonic())

        if self._status_task is not None:
            self._status_task.cancel()
        if self._api is not None:
            await self._api.stop()
        if self._loop_task is not None:
            # The loop notices the stop within one fetch wait plus one batch; past the
            # deadline it is cancelled, which rolls back its transaction without acking.
            done, _ = await asyncio.wait([self._loop_task], timeout=remaining_s())
            if not done:
                self._loop_task.cancel()
                await asyncio.wait([self._loop_task])
        if self._webhooks is not None:
            await self._webhooks.stop(timedelta(seconds=remaining_s() / 2))
        await self._sign_before_stop(remaining_s())
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        if self._nats is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nats.drain(), remaining_s())
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), remaining_s())
        if self._ops is not None:
            await self._ops.stop()
        _log.info("auditor stopped")
        if self._loop_task is not None and not self._loop_task.cancelled():
            crash = self._loop_task.exception()
            if crash is not None:
                raise crash

    async def _sign_before_stop(self, deadline_s: float) -> None:
        """Sign the unsigned heads, so that a stopped auditor leaves its chains signed."""
        unsigned = self._schedule.unsigned()
        if not unsigned or self._store is None:
            return
        try:
            written, every = await asyncio.wait_for(
                self._store.sign_heads(unsigned, self._signer), deadline_s
            )
        except (StoreUnavailableError, TimeoutError) as error:
            _log.warning("signing the heads before stopping failed: %s", error)
            return
        self._signed(written, every)

    # ------------------------------------------------------------------------- loop

    async def _consume(self) -> None:
        assert self._subscription is not None
        assert self._finance is not None
        settings = self._settings
        while not self._stopping.is_set():
            self._loop_beat = time.monotonic()
            try:
                await self._sign_due()
                await self._finance.drain_backlog()
            except StoreUnavailableError as error:
                _log.warning("signing checkpoints failed: %s", error)
                await self._pause()
                continue
            wait_s = settings.fetch_wait.total_seconds()
            due_in_s = self._schedule.next_due_in_s(time.monotonic())
            if due_in_s is not None:
                wait_s = max(FETCH_WAIT_MIN_S, min(wait_s, due_in_s))
            try:
                messages = await self._subscription.fetch(
                    settings.fetch_messages_max, timeout=wait_s
                )
            except _NATS_ERRORS as error:
                # nats-py reports "no message within the wait" as a timeout, too.
                if isinstance(error, TimeoutError) and self._nats_connected():
                    continue
                _log.warning("fetching events failed: %s: %s", type(error).__name__, error)
                await self._pause()
                if self._nats_connected():
                    # Connected but failing: the stream or consumer may have been lost
                    # (a NATS server that came back without its store).
                    await self._reensure_consumer()
                continue
            parsed = [
                parse_deliveries(message.subject, message.headers, message.data, token)
                for token, message in enumerate(messages)
            ]
            for index, part in enumerate(parts := _transactions(parsed)):
                traced = self._telemetry.begin_batch(part.deliveries, len(part.tokens))
                try:
                    plan = await self._handle(messages, part)
                except StoreUnavailableError as error:
                    self._telemetry.end_batch(traced, None, error.code)
                    rest = [token for later in parts[index:] for token in later.tokens]
                    _log.warning("chaining %d events failed: %s", len(part.deliveries), error)
                    await _settle(messages, [], [], rest, self._pause_s)
                    await self._pause()
                    break
                self._telemetry.end_batch(traced, plan)
                self._pause_s = settings.retry_pause_min.total_seconds()

    async def _sign_due(self) -> None:
        """Sign the heads whose oldest unsigned event is ``checkpoint_interval`` old."""
        due = self._schedule.due(time.monotonic())
        if due:
            written, every = await self.store.sign_heads(due, self._signer)
            self._signed(written, every)

    async def _handle(self, messages: Sequence[Msg], part: _Transaction) -> BatchPlan | None:
        """Chain the events of the messages of ``part`` and settle those messages; its plan
        (None: nothing chained)."""
        assert self._store is not None
        assert self._finance is not None
        deliveries, malformed = part.deliveries, part.malformed
        for token in malformed:
            _log.error(
                "terminating a malformed message on %s (headers %s): not ledger events",
                messages[token].subject,
                messages[token].headers,
            )
        now_s = time.monotonic()
        outcome = (
            await self._store.chain(deliveries, self._signer, self._schedule, now_s)
            if deliveries
            else None
        )
        # Committed (or nothing to commit): now, and only now, settle the messages.
        if outcome is None:
            await _settle(messages, [], malformed, [], 0)
            return None
        plan = outcome.plan
        self._schedule.committed(
            plan.heads.values(),
            [ChainHead(row.partition, row.seq, row.link) for row in outcome.checkpoints],
            now_s,
        )
        self._report(outcome)
        self._measure(messages[part.tokens[-1]], outcome)
        delay_s = self._settings.gap_redelivery_delay.total_seconds()
        await _settle(messages, plan.settled_tokens(), malformed, plan.held_tokens(), delay_s)
        if self._finance.backlog:
            await self._finance.drain_backlog()
        else:
            await self._finance.publish(outcome.finance)
        return plan

    def _measure(self, last: Msg, outcome: BatchOutcome) -> None:
        counters = self.counters
        counters.batches += 1
        counters.events_chained += len(outcome.plan.chained)
        counters.duplicates += len(outcome.plan.duplicates)
        counters.checkpoints_signed += len(outcome.checkpoints)
        counters.rollup_skipped_events += len(outcome.skipped)
        self._telemetry.settled(outcome.finance)
        if outcome.last_event_at_ms is not None:
            counters.lag_ms = max(0, time.time_ns() // 1_000_000 - outcome.last_event_at_ms)
        with contextlib.suppress(Exception):
            # Messages in the stream not yet delivered to this consumer, after the last.
            counters.lag_events = last.metadata.num_pending
        for skipped in outcome.skipped[:SKIPPED_LOGGED_MAX]:
            _log.error(
                "partition %d: seq %d is chained but not rolled up: %s",
                skipped.partition,
                skipped.seq,
                skipped.reason,
            )

    async def _log_status(self) -> None:
        interval_s = self._settings.status_log_interval.total_seconds()
        while True:
            await asyncio.sleep(interval_s)
            status = self.status()
            _log.info(
                "auditor status: lag %d events, %d ms; %d events chained in %d batches;"
                " %d checkpoints signed; %d finance events published, %d pending;"
                " %d gap alarms, stalled partitions %s; %d events not rolled up",
                status.lag_events,
                status.lag_ms,
                status.events_chained,
                status.batches,
                status.checkpoints_signed,
                status.finance_published,
                status.finance_pending,
                status.gap_alarms,
                status.stalled_partitions,
                status.rollup_skipped_events,
            )

    def _report(self, outcome: BatchOutcome) -> None:
        self._gaps.advanced(outcome.plan.heads)
        now_s = time.monotonic()
        for gap in outcome.plan.gaps:
            status, open_s = self._gaps.seen(gap, now_s)
            if status == "new":
                self.counters.gaps_seen += 1
                # Usually a redelivery still on its way (after a failure or a restart).
                _log.warning(
                    "partition %d: gap in the event stream: expected seq %d, received seq %d;"
                    " holding it for redelivery",
                    gap.partition,
                    gap.expected_seq,
                    gap.received_seq,
                )
            elif status == "alarm":
                self.counters.gap_alarms += 1
                _log.error(
                    "partition %d: gap in the event stream open for %.0f s: seq %d has not"
                    " arrived (received seq %d); the partition's chain is stalled",
                    gap.partition,
                    open_s,
                    gap.expected_seq,
                    gap.received_seq,
                )
        for delivery in outcome.conflicts:
            _log.error(
                "partition %d: seq %d was redelivered with bytes that differ from the chained"
                " event (changed at its source after publishing?); the chain keeps the first",
                delivery.partition,
                delivery.seq,
            )

    async def _reensure_consumer(self) -> None:
        assert self._nats is not None
        try:
            await self._ensure_consumer(self._nats.jetstream())
        except _NATS_ERRORS as error:
            _log.warning("re-creating the consumer failed: %s: %s", type(error).__name__, error)

    def _nats_connected(self) -> bool:
        return self._nats is not None and self._nats.is_connected

    async def _pause(self) -> None:
        """Sleep the current back-off (cut short by a stop), then double it up to its bound."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self._pause_s)
        self._pause_s = min(self._pause_s * 2, self._settings.retry_pause_max.total_seconds())

    # ---------------------------------------------------------------- operations

    def _live(self) -> Check:
        """Liveness: started, and the consume loop came round recently (hung otherwise)."""
        if not self._started:
            return Check(False, {"reason": "starting"})
        stall = max(LIVENESS_STALL, self._settings.fetch_wait * LIVENESS_STALL_FETCH_WAITS)
        since_s = time.monotonic() - self._loop_beat
        loop_alive = self._loop_task is not None and not self._loop_task.done()
        if not loop_alive or since_s > stall.total_seconds():
            return Check(False, {"reason": f"consume loop idle for {since_s:.0f} s"})
        return Check(True)

    def _ready(self) -> Check:
        """Readiness: started and connected to NATS (it answers the audit API there)."""
        connected = self._nats_connected()
        ok = self._started and connected and not self._stopping.is_set()
        return Check(ok, {"nats": connected, "lag_events": self.counters.lag_events})


@dataclass(slots=True)
class _Transaction:
    """Fetched messages chained in one transaction: their indexes in the fetched batch,
    the events they carry, and the indexes of the malformed ones."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    deliveries: list[Delivery] = dataclasses.field(default_factory=list)
    malformed: list[int] = dataclasses.field(default_factory=list)


def _transactions(parsed: Sequence[list[Delivery] | None]) -> list[_Transaction]:
    """The fetched messages' events (``parsed``, None for a malformed message) cut into
    transactions of whole messages, each holding at most ``TRANSACTION_EVENTS_MAX``
    events (a larger message alone)."""
    parts = [_Transaction()]
    for token, deliveries in enumerate(parsed):
        part = parts[-1]
        count = len(deliveries or ())
        if part.deliveries and len(part.deliveries) + count > TRANSACTION_EVENTS_MAX:
            part = _Transaction()
            parts.append(part)
        part.tokens.append(token)
        if deliveries is None:
            part.malformed.append(token)
        else:
            part.deliveries.extend(deliveries)
    return parts


async def _settle(
    messages: Sequence[Msg],
    acked: Sequence[int],
    terminated: Sequence[int],
    delayed: Sequence[int],
    delay_s: float,
) -> None:
    """Ack, terminate and nak (with ``delay_s``) the messages at the given indexes.

    A failure here is only logged: an unacked message is redelivered after ``ack_wait``
    and recognised as a duplicate, so losing an ack costs time, never correctness.
    """
    try:
        for token in acked:
            await messages[token].ack()
        for token in terminated:
            await messages[token].term()
        for token in delayed:
            await messages[token].nak(delay=delay_s)
    except _NATS_ERRORS as error:
        _log.warning("settling messages failed (they will be redelivered): %s", error)
