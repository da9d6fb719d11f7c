"""Exactly once: an auditor killed with SIGKILL in the middle of a batch, and restarted.

Events are written as the ledger writes them (a row in ``events``, then a JetStream
publish of version 2 messages, runs of 16 events, with the relay's headers): per
partition a key, then a repeating, realistic cycle of grants, commits (with overruns),
releases, denials and expiries.

The first kill is deterministic: the test holds a SHARE lock on the finance outbox (reads
pass, writes wait), so the
auditor's first batch blocks inside its transaction after writing its links, heads,
checkpoints, decisions and rollups; the test waits until Postgres shows that backend
waiting with a transaction id (it has written), kills the auditor with SIGKILL, and
releases the lock. The second kill lands wherever the restarted auditor happens to be.
Afterwards every event must have taken effect exactly once: the chain covers each once,
the rollups equal the sums over the events table, the decisions match, and the finance
stream holds each finance event once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from nats.js import JetStreamContext

from spendgate_auditor import verify
from spendgate_common.event_batches import COLUMNS, batch_row
from spendgate_common.event_messages_v2 import (
    StreamedEvent,
    encode_events,
    message_headers,
    split_runs,
)
from spendgate_common.events_v1 import (
    AnyEvent,
    KeyIssued,
    ReservationCommitted,
    ReservationDenied,
    ReservationExpired,
    ReservationGranted,
    ReservationOverrun,
    ReservationReleased,
    encode_event,
)
from spendgate_common.migrate import apply_migrations
from spendgate_common.nats_adapter import ensure_events_stream
from spendgate_common.subjects import (
    FINANCE_STREAM,
    events_subject,
)
from spendgate_ledger._store import EventRow
from tests.harness import start_service
from tests.test_audit_rollups import event_totals, rollup_totals

PARTITIONS = range(4)
EVENTS_PER_PARTITION = 401  # the key, then 50 cycles of 8
EVENTS_PER_APPEND = 16
DEADLINE_S = 30.0
POLL_INTERVAL_S = 0.02
AT_MS = 1_700_000_000_000


def realistic_event(partition: int, seq: int) -> AnyEvent:
    """Event ``seq`` of ``partition``: the key at seq 1, then cycles of 8 events."""
    key_id, at_ms = f"key-{partition}", AT_MS + seq * 1_000
    if seq == 1:
        return KeyIssued(
            at_ms=AT_MS,
            key_id=key_id,
            tenant=f"tenant-{partition}",
            label=f"fleet-x/run-{partition}",
            secret_sha256="0" * 64,
            cap_micros=10**12,
            window="total",
            timezone="America/New_York",
            expires_at_ms=4_102_444_800_000,
            fleet_labels=["team-red"],
        )
    step = (seq - 2) % 8
    this, previous = f"rsv_{partition}_{seq}", f"rsv_{partition}_{seq - 1}"
    amounts = {0: 100_000, 3: 50_000, 6: 20_000}
    if step in amounts:
        return ReservationGranted(
            at_ms=at_ms,
            reservation_id=this,
            key_id=key_id,
            amount_micros=amounts[step],
            vendor="openai" if step == 0 else "anthropic",
            operation="POST /v1/chat/completions",
            idempotency_key=None,
            request_sha256="0" * 64,
            window_start_at_ms=0,
            expires_at_ms=at_ms + 60_000,
        )
    if step == 1:
        return ReservationCommitted(at_ms, previous, key_id, 100_000, 130_000, 0)
    if step == 2:
        return ReservationOverrun(
            at_ms, f"rsv_{partition}_{seq - 2}", key_id, 100_000, 130_000, 30_000
        )
    if step == 4:
        return ReservationReleased(at_ms, previous, key_id, 50_000, "vendor 400")
    if step == 5:
        return ReservationDenied(
            at_ms=at_ms,
            decision_id=f"dcn_{partition}_{seq}",
            key_id=key_id,
            amount_micros=70_000,
            vendor="openai",
            operation="POST /v1/chat/completions",
            idempotency_key=None,
            request_sha256="0" * 64,
            code="cap_exhausted",
            scope="key",
            scope_id=key_id,
            committed_micros=1,
            reserved_micros=2,
            cap_micros=3,
            window_start_at_ms=0,
        )
    assert step == 7
    return ReservationExpired(at_ms, previous, key_id, 20_000)


async def write_events(connection: asyncpg.Connection[Any], jetstream: JetStreamContext) -> None:
    for partition in PARTITIONS:
        events = [realistic_event(partition, seq) for seq in range(1, EVENTS_PER_PARTITION + 1)]
        rows = [
            EventRow(seq, type(event).__name__, encode_event(event))
            for seq, event in enumerate(events, start=1)
        ]
        # As appends of 16 events each: a batch and a message hold a run of 16.
        runs = list(split_runs(rows, events_max=EVENTS_PER_APPEND))
        records = [
            batch_row(
                partition, 1, run[0].seq, [row.type for row in run], [row.body for row in run]
            )
            for run in runs
        ]
        await connection.copy_records_to_table("event_batches", columns=COLUMNS, records=records)
        acks = []
        for run in runs:
            headers = message_headers(partition, run[0].seq, run[-1].seq)
            body = encode_events([StreamedEvent(row.seq, msgspec.Raw(row.body)) for row in run])
            acks.append(
                await jetstream.publish_async(events_subject(partition), body, headers=headers)
            )
        await asyncio.gather(*acks)


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    connection: asyncpg.Connection[Any] = await asyncpg.connect(database_url)
    await apply_migrations(connection)
    try:
        yield connection
    finally:
        await connection.close()


async def wait_for(
    connection: asyncpg.Connection[Any], query: str, expected: int, *args: object
) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while (value := await connection.fetchval(query, *args)) < expected:
        assert time.monotonic() < deadline, f"{query}: {value} < {expected}"
        await asyncio.sleep(POLL_INTERVAL_S)


async def test_auditor_killed_in_the_middle_of_a_batch_takes_effect_exactly_once(
    database: asyncpg.Connection[Any], database_url: str, nats_url: str
) -> None:
    client = await nats.connect(nats_url)
    jetstream = client.jetstream()
    await ensure_events_stream(jetstream)
    await write_events(database, jetstream)
    total = len(PARTITIONS) * EVENTS_PER_PARTITION
    env = {
        "SPENDGATE_DATABASE_URL": database_url,
        "SPENDGATE_NATS_URL": nats_url,
        "SPENDGATE_AUDITOR_FETCH_MESSAGES_MAX": "100",
        "SPENDGATE_AUDITOR_FETCH_WAIT_MS": "100",
        "SPENDGATE_AUDITOR_ACK_WAIT_SECONDS": "2",
        "SPENDGATE_AUDITOR_GAP_REDELIVERY_DELAY_MS": "100",
        "SPENDGATE_SHUTDOWN_DEADLINE_SECONDS": "5",
    }
    blocker: asyncpg.Connection[Any] = await asyncpg.connect(database_url)
    try:
        # 1. Block the first batch inside its transaction, then kill the auditor there.
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE audit_finance_outbox IN SHARE MODE")
        auditor = await asyncio.to_thread(start_service, "auditor", env)
        await wait_for(
            database,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND backend_xid IS NOT NULL"
            " AND query LIKE 'COPY%audit_finance_outbox%'",
            1,
        )
        await asyncio.to_thread(auditor.kill)
        await transaction.rollback()
        # Nothing of the killed batch committed.
        await asyncio.sleep(0.2)
        assert await database.fetchval("SELECT count(*) FROM audit_chain") == 0
        assert await database.fetchval("SELECT count(*) FROM audit_rollups") == 0

        # 2. Restart; kill it again wherever it is once it has done some of the work.
        auditor = await asyncio.to_thread(start_service, "auditor", env)
        await wait_for(database, "SELECT count(*) FROM audit_chain", total // 3)
        await asyncio.to_thread(auditor.kill)

        # 3. Restart and let it finish.
        auditor = await asyncio.to_thread(start_service, "auditor", env)
        await wait_for(database, "SELECT count(*) FROM audit_chain", total)
        await wait_for(database, "SELECT -count(*) FROM audit_finance_outbox", 0)
        assert await asyncio.to_thread(auditor.terminate, 10.0) == 0, auditor.logs()
    finally:
        await blocker.close()

    try:
        assert await database.fetchval("SELECT count(*) FROM audit_chain") == total
        assert await rollup_totals(database) == await event_totals(database)
        outcomes = dict(
            await database.fetch("SELECT outcome, count(*) FROM audit_decisions GROUP BY 1")
        )
        cycles = (EVENTS_PER_PARTITION - 1) // 8 * len(PARTITIONS)
        assert outcomes == {
            "committed": cycles,
            "released": cycles,
            "denied": cycles,
            "expired": cycles,
        }
        rollup = await database.fetchrow(
            "SELECT sum(granted_count), sum(overrun_micros), sum(committed_micros),"
            " sum(reserved_micros) FROM audit_rollups"
        )
        assert tuple(rollup) == (3 * cycles, 30_000 * cycles, 150_000 * cycles, 0)
        # One finance event per commit, release, expiry and denial: no more, no fewer.
        info = await jetstream.stream_info(FINANCE_STREAM)
        assert info.state.messages == 4 * cycles
        report = await verify(database_url)
        assert report.ok
        assert report.verified == total
        assert all(partition.signed_seq == EVENTS_PER_PARTITION for partition in report.partitions)
    finally:
        await client.close()
