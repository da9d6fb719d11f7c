"""The auditor against real NATS JetStream and real Postgres.

Events are written the way the ledger writes them: a row in ``events`` (the canonical
bytes in ``body``) and a JetStream publish of the same bytes with the relay's headers.
The auditor runs in-process (fast, its logs in ``caplog``) or as a process (to kill it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from nats.js import JetStreamContext

from spendgate_auditor import (
    GENESIS_LINK,
    AuditorService,
    AuditorSettings,
    link,
    new_private_key_pem,
    verify,
    verify_main,
)
from spendgate_auditor._service import TRANSACTION_EVENTS_MAX
from spendgate_auditor._signing import Signer
from spendgate_auditor.verify import ProblemKind
from spendgate_cli.embedded import EmbeddedNats, EmbeddedPostgres
from spendgate_common.event_batches import join_bodies, join_types
from spendgate_common.event_messages_v2 import (
    StreamedEvent,
    encode_events,
    message_headers,
    split_runs,
)
from spendgate_common.events_v1 import KeyIssued, ReservationGranted, encode_event
from spendgate_common.limits import EVENT_MESSAGE_EVENTS_MAX
from spendgate_common.migrate import apply_migrations
from spendgate_common.nats_adapter import ensure_events_stream
from spendgate_common.settings import Env
from spendgate_common.subjects import (
    HEADER_MSG_ID,
    HEADER_PARTITION,
    HEADER_SEQ,
    event_v1_msg_id,
    events_subject,
    events_v1_subject,
)
from spendgate_ledger._store import EventRow
from tests.harness import start_service

# Bounds of the waits in these tests: long enough for a slow CI machine, short enough to
# fail a stuck auditor quickly.
CHAIN_DEADLINE_S = 30.0
POLL_INTERVAL_S = 0.02
# A publish is retried while NATS restarts (about 20 ms, plus the client's reconnect wait).
PUBLISH_ATTEMPTS_MAX = 50
# Auditor bounds that make redeliveries fast enough to wait for in a test.
FAST_AUDITOR_ENV = {
    "SPENDGATE_AUDITOR_FETCH_WAIT_MS": "200",
    "SPENDGATE_AUDITOR_ACK_WAIT_SECONDS": "2",
    "SPENDGATE_AUDITOR_GAP_REDELIVERY_DELAY_MS": "100",
    "SPENDGATE_AUDITOR_RETRY_PAUSE_MIN_MS": "20",
    "SPENDGATE_AUDITOR_RETRY_PAUSE_MAX_MS": "200",
    "SPENDGATE_SHUTDOWN_DEADLINE_SECONDS": "5",
}


KEY_ID = "abcdefghijklmnop"


async def write_batch(
    connection: asyncpg.Connection[Any],
    partition: int,
    first_seq: int,
    last_seq: int,
    events: Sequence[tuple[str, bytes]],
) -> None:
    """Insert one ``event_batches`` row holding ``(type, body)`` ``events`` for the seqs
    ``first_seq..last_seq`` (as the ledger writes them, or as someone edits them)."""
    await connection.execute(
        "INSERT INTO event_batches (partition, first_seq, last_seq, epoch, types, bodies)"
        " VALUES ($1, $2, $3, 1, $4, $5)",
        partition,
        first_seq,
        last_seq,
        join_types([type_ for type_, _ in events]),
        join_bodies([body for _, body in events]),
    )


async def read_log(
    connection: asyncpg.Connection[Any], partition: int
) -> dict[int, tuple[str, bytes]]:
    """A partition's events by seq, read through the ``events`` view."""
    rows = await connection.fetch(
        "SELECT seq, type, body FROM events WHERE partition = $1", partition
    )
    return {row["seq"]: (row["type"], bytes(row["body"])) for row in rows}


async def rewrite_log(
    connection: asyncpg.Connection[Any], partition: int, events: Mapping[int, tuple[str, bytes]]
) -> None:
    """Replace a partition's event log by ``events`` (by seq), one batch per run of
    consecutive seqs: how someone who can write to Postgres edits the log."""
    await connection.execute("DELETE FROM event_batches WHERE partition = $1", partition)
    seqs = sorted(events)
    while seqs:
        run = [seqs.pop(0)]
        while seqs and seqs[0] == run[-1] + 1:
            run.append(seqs.pop(0))
        await write_batch(connection, partition, run[0], run[-1], [events[s] for s in run])


def event_body(partition: int, seq: int) -> bytes:
    """Canonical bytes of a distinct, realistic event for ``(partition, seq)``: the key is
    issued at seq 1, then each seq is a grant on it."""
    if seq == 1:
        return encode_event(
            KeyIssued(
                at_ms=1_700_000_000_000,
                key_id=KEY_ID,
                tenant=f"tenant-{partition}",
                label=f"run-{partition}",
                secret_sha256="0" * 64,
                cap_micros=10**12,
                window="total",
                timezone="UTC",
                expires_at_ms=4_102_444_800_000,
            )
        )
    event = ReservationGranted(
        at_ms=1_700_000_000_000 + seq,
        reservation_id=f"r-{partition}-{seq}",
        key_id=KEY_ID,
        amount_micros=180_000,
        vendor="stripe",
        operation="POST /v1/charges",
        idempotency_key=None,
        request_sha256="0" * 64,
        window_start_at_ms=1_700_000_000_000,
        expires_at_ms=1_700_000_900_000,
    )
    return encode_event(event)


class EventLog:
    """Writes events as the ledger does: Postgres row, then JetStream publish (the relay)."""

    def __init__(self, connection: asyncpg.Connection[Any], jetstream: JetStreamContext) -> None:
        self.connection = connection
        self.jetstream = jetstream

    async def record(self, partition: int, seqs: range) -> None:
        """Append ``seqs`` of ``partition`` to the event log as one batch, as one append of
        the ledger does (not published yet)."""
        events = [("ReservationGranted", event_body(partition, s)) for s in seqs]
        await write_batch(self.connection, partition, seqs[0], seqs[-1], events)

    async def publish(
        self,
        partition: int,
        seqs: range,
        *,
        body: bytes | None = None,
        msg_id: str | None = None,
        v1: bool = False,
    ) -> None:
        """Publish ``seqs`` of ``partition`` as the relay does: version 2 messages of up
        to 128 events (``v1``: one version 1 message per event, as ledgers did before).
        ``body`` replaces every event's bytes, ``msg_id`` every message id."""
        rows = [
            EventRow(seq, "ReservationGranted", body or event_body(partition, seq)) for seq in seqs
        ]
        for run in [[row] for row in rows] if v1 else split_runs(rows):
            first, last = run[0].seq, run[-1].seq
            if v1:
                subject = events_v1_subject(partition)
                headers = {
                    HEADER_MSG_ID: event_v1_msg_id(partition, first),
                    HEADER_PARTITION: str(partition),
                    HEADER_SEQ: str(first),
                }
                payload = run[0].body
            else:
                subject = events_subject(partition)
                headers = message_headers(partition, first, last)
                payload = encode_events(
                    [StreamedEvent(row.seq, msgspec.Raw(row.body)) for row in run]
                )
            if msg_id is not None:
                headers[HEADER_MSG_ID] = msg_id
            # Retried like the relay retries: the message id makes a repeat harmless.
            for attempt in range(PUBLISH_ATTEMPTS_MAX):
                try:
                    await self.jetstream.publish(subject, payload, headers=headers, timeout=1.0)
                    break
                except (nats.errors.Error, TimeoutError):
                    if attempt + 1 == PUBLISH_ATTEMPTS_MAX:
                        raise
                    await asyncio.sleep(0.2)

    async def append(self, partition: int, seqs: range) -> None:
        await self.record(partition, seqs)
        await self.publish(partition, seqs)


@pytest.fixture
async def event_log(database_url: str, nats_url: str) -> AsyncIterator[EventLog]:
    connection = await asyncpg.connect(database_url)
    await apply_migrations(connection)
    client = await nats.connect(nats_url)
    jetstream = client.jetstream()
    await ensure_events_stream(jetstream)
    try:
        yield EventLog(connection, jetstream)
    finally:
        await client.close()
        await connection.close()


def auditor_env(database_url: str, nats_url: str, **extra: str) -> dict[str, str]:
    return {
        "SPENDGATE_DATABASE_URL": database_url,
        "SPENDGATE_NATS_URL": nats_url,
        **FAST_AUDITOR_ENV,
        **extra,
    }


@contextlib.asynccontextmanager
async def running_auditor(
    database_url: str, nats_url: str, **extra: str
) -> AsyncIterator[AuditorService]:
    settings = AuditorSettings.from_env(Env(auditor_env(database_url, nats_url, **extra)))
    service = AuditorService(settings)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def chain_heads(connection: asyncpg.Connection[Any]) -> dict[int, int]:
    rows = await connection.fetch("SELECT partition, seq FROM audit_heads")
    return {row["partition"]: row["seq"] for row in rows}


async def wait_chained(connection: asyncpg.Connection[Any], expected: Mapping[int, int]) -> None:
    """Wait until every partition's head reaches ``expected[partition]``."""
    deadline = time.monotonic() + CHAIN_DEADLINE_S
    while True:
        heads = await chain_heads(connection)
        if all(heads.get(p, 0) >= seq for p, seq in expected.items()):
            return
        assert time.monotonic() < deadline, f"chain stuck at {heads}, expected {expected}"
        await asyncio.sleep(POLL_INTERVAL_S)


async def row_counts(connection: asyncpg.Connection[Any]) -> tuple[int, int]:
    events = await connection.fetchval("SELECT count(*) FROM events")
    chained = await connection.fetchval("SELECT count(*) FROM audit_chain")
    return int(events), int(chained)


# ----------------------------------------------------------------------------- tests


async def test_auditor_chains_every_event_and_verify_agrees(
    event_log: EventLog, database_url: str, nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for partition in (0, 3, 17):
        await event_log.append(partition, range(1, 41))
    async with running_auditor(database_url, nats_url, SPENDGATE_AUDITOR_FETCH_MESSAGES_MAX="16"):
        await wait_chained(event_log.connection, {0: 40, 3: 40, 17: 40})

    assert await row_counts(event_log.connection) == (120, 120)
    report = await verify(database_url)
    assert report.ok, report
    assert (report.verified, report.not_yet_audited, len(report.partitions)) == (120, 0, 3)

    assert await asyncio.to_thread(verify_main, database_url) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "OK: 120 events in 3 partitions verified"
    assert "partition 3: OK, 40 events verified, signed to seq 40" in lines


async def test_events_not_yet_published_are_reported_as_lag_not_failure(
    event_log: EventLog, database_url: str, nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await event_log.append(2, range(1, 6))
    await event_log.record(2, range(6, 9))  # committed, not yet relayed
    async with running_auditor(database_url, nats_url):
        await wait_chained(event_log.connection, {2: 5})

    report = await verify(database_url)
    assert report.ok
    assert (report.verified, report.not_yet_audited) == (5, 3)
    assert await asyncio.to_thread(verify_main, database_url) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "OK: 5 events in 1 partitions verified, 3 events not yet audited"
    )


async def test_republished_events_do_not_take_effect_twice(
    event_log: EventLog, database_url: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await event_log.append(1, range(1, 11))
    async with running_auditor(database_url, nats_url):
        await wait_chained(event_log.connection, {1: 10})
        links_before = await event_log.connection.fetch(
            "SELECT seq, link FROM audit_chain ORDER BY seq"
        )
        # A republish after JetStream's duplicate window: new stream messages, same events.
        for seq in range(1, 11):
            await event_log.publish(1, range(seq, seq + 1), msg_id=f"again-{seq}")
        # And one that carries other bytes under a chained seq: an alarm, never a link.
        with caplog.at_level(logging.ERROR, logger="spendgate_auditor"):
            await event_log.publish(1, range(4, 5), body=b'{"edited":true}', msg_id="forged")
            await event_log.append(1, range(11, 13))
            await wait_chained(event_log.connection, {1: 12})

    assert await row_counts(event_log.connection) == (12, 12)
    links_after = await event_log.connection.fetch(
        "SELECT seq, link FROM audit_chain WHERE seq <= 10 ORDER BY seq"
    )
    assert links_after == links_before
    assert (await verify(database_url)).ok
    assert any("seq 4 was redelivered with bytes that differ" in m for m in caplog.messages)
    info = await event_log.jetstream.consumer_info("SPENDGATE_EVENTS", "spendgate-auditor")
    assert info.num_ack_pending == 0


async def test_overlapping_runs_take_effect_once_per_event(
    event_log: EventLog, database_url: str, nats_url: str
) -> None:
    # A log restored elsewhere, say, cut into other runs when republished: the second
    # message repeats seqs 5-10 of the first and carries 11-15 after them.
    await event_log.record(4, range(1, 16))
    await event_log.publish(4, range(1, 11))
    await event_log.publish(4, range(5, 16))
    async with running_auditor(database_url, nats_url):
        await wait_chained(event_log.connection, {4: 15})
        info = await event_log.jetstream.consumer_info("SPENDGATE_EVENTS", "spendgate-auditor")
        assert (info.num_ack_pending, info.num_pending) == (0, 0)

    assert await row_counts(event_log.connection) == (15, 15)
    assert (await verify(database_url)).ok


async def test_version_1_messages_still_chain_before_and_after_version_2(
    event_log: EventLog, database_url: str, nats_url: str
) -> None:
    # Ledgers upgraded while their last version 1 messages were still in the stream.
    await event_log.record(9, range(1, 21))
    await event_log.publish(9, range(1, 8), v1=True)
    await event_log.publish(9, range(8, 21))
    async with running_auditor(database_url, nats_url):
        await wait_chained(event_log.connection, {9: 20})

    assert await row_counts(event_log.connection) == (20, 20)
    assert (await verify(database_url)).ok


async def test_a_fetch_of_long_runs_is_chained_in_bounded_transactions(
    event_log: EventLog, database_url: str, nats_url: str
) -> None:
    # 40 full messages of 128 events: more than one transaction's worth in one fetch.
    events = 40 * EVENT_MESSAGE_EVENTS_MAX
    assert events > TRANSACTION_EVENTS_MAX
    await event_log.append(8, range(1, events + 1))
    async with running_auditor(database_url, nats_url, SPENDGATE_AUDITOR_FETCH_MESSAGES_MAX="64"):
        await wait_chained(event_log.connection, {8: events})

    assert await row_counts(event_log.connection) == (events, events)
    assert (await verify(database_url)).ok


async def test_a_gap_holds_the_partition_until_the_missing_event_arrives(
    event_log: EventLog, database_url: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await event_log.record(5, range(1, 8))
    await event_log.publish(5, range(1, 3))
    await event_log.publish(5, range(4, 8))  # seq 3 is late (a relay retry, say)
    await event_log.append(6, range(1, 4))  # another partition is not held up
    alarm_env = {
        "SPENDGATE_AUDITOR_ACK_WAIT_SECONDS": "1",
        "SPENDGATE_AUDITOR_GAP_ALARM_SECONDS": "1",
    }
    with caplog.at_level(logging.WARNING, logger="spendgate_auditor"):
        async with running_auditor(database_url, nats_url, **alarm_env):
            await wait_chained(event_log.connection, {5: 2, 6: 3})
            # Many redelivery rounds pass; the head must not move past the gap, and a gap
            # open longer than the alarm threshold is reported as an error.
            await asyncio.sleep(1.5)
            assert (await chain_heads(event_log.connection))[5] == 2
            await event_log.publish(5, range(3, 4))
            await wait_chained(event_log.connection, {5: 7})

    assert await row_counts(event_log.connection) == (10, 10)
    assert (await verify(database_url)).ok
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("gap in the event stream: expected seq 3, received seq 4" in m for m in warnings)
    assert any("partition 5: gap in the event stream open for" in m for m in errors), errors
    assert all("partition 6" not in m for m in warnings + errors)


async def _tamper(connection: asyncpg.Connection[Any], tamper: str) -> None:
    """Change partition 1's events (seq 1..10, one batch) after they were chained."""
    p = 1
    events = await read_log(connection, p)
    if tamper == "edit":
        events[4] = (events[4][0], event_body(p, 4).replace(b"180000", b"1"))
    elif tamper == "delete":
        del events[4]
    elif tamper == "swap":
        events[4], events[7] = events[7], events[4]
    elif tamper == "insert":
        events = {seq + (seq >= 4): event for seq, event in events.items()}
        events[4] = ("x", event_body(p, 99))
    elif tamper == "truncate":
        events = {seq: event for seq, event in events.items() if seq < 9}
    elif tamper == "overlap":
        # Two rows that both claim seqs 4 and 5: the view would show them twice.
        await connection.execute("DELETE FROM event_batches WHERE partition = $1", p)
        await write_batch(connection, p, 1, 5, [events[seq] for seq in range(1, 6)])
        await write_batch(connection, p, 4, 10, [events[seq] for seq in range(4, 11)])
        return
    elif tamper == "extra_in_row":
        # An event added to the row without renumbering its range.
        await connection.execute("DELETE FROM event_batches WHERE partition = $1", p)
        added = [*[events[seq] for seq in range(1, 11)], ("x", event_body(p, 99))]
        await write_batch(connection, p, 1, 10, added)
        return
    else:
        raise AssertionError(tamper)
    await rewrite_log(connection, p, events)


@pytest.mark.parametrize(
    ("tamper", "kind", "seq"),
    [
        ("edit", ProblemKind.LINK_MISMATCH, 4),
        ("delete", ProblemKind.EVENT_DELETED, 4),
        ("swap", ProblemKind.LINK_MISMATCH, 4),
        ("insert", ProblemKind.LINK_MISMATCH, 4),
        ("truncate", ProblemKind.TRUNCATED_TAIL, 9),
        ("overlap", ProblemKind.EVENT_BATCH_MALFORMED, 6),
        ("extra_in_row", ProblemKind.EVENT_BATCH_MALFORMED, 1),
    ],
)
async def test_verify_detects_a_changed_event_log(
    event_log: EventLog,
    database_url: str,
    nats_url: str,
    capsys: pytest.CaptureFixture[str],
    tamper: str,
    kind: ProblemKind,
    seq: int,
) -> None:
    for partition in (0, 1):
        await event_log.append(partition, range(1, 11))
    async with running_auditor(database_url, nats_url):
        await wait_chained(event_log.connection, {0: 10, 1: 10})
    assert (await verify(database_url)).ok

    await _tamper(event_log.connection, tamper)

    report = await verify(database_url)
    assert not report.ok
    [broken] = report.broken
    assert broken.partition == 1
    assert broken.problem is not None
    assert (broken.problem.kind, broken.problem.seq) == (kind, seq), broken.problem.reason
    assert [p.partition for p in report.partitions if p.ok] == [0]
    assert (await verify(database_url, partition=0)).ok

    assert await asyncio.to_thread(verify_main, database_url) == 1
    last_line = capsys.readouterr().out.splitlines()[-1]
    assert last_line.startswith(f"BROKEN: partition 1 at seq {seq}: "), last_line


async def test_verify_detects_a_deleted_event_the_auditor_has_not_seen(
    event_log: EventLog, database_url: str
) -> None:
    await event_log.record(1, range(1, 6))
    events = await read_log(event_log.connection, 1)
    del events[3]
    await rewrite_log(event_log.connection, 1, events)
    report = await verify(database_url)
    [broken] = report.broken
    assert broken.problem is not None
    assert (broken.problem.kind, broken.problem.seq) == (ProblemKind.EVENT_GAP, 3)


async def test_postgres_connections_dropping_mid_stream_lose_nothing(
    event_log: EventLog, database_url: str, nats_url: str
) -> None:
    dropper_connection = await asyncpg.connect(database_url)
    spared = [dropper_connection.get_server_pid(), event_log.connection.get_server_pid()]
    dropped = 0

    async def drop_auditor_connections() -> None:
        nonlocal dropped
        while True:
            dropped += await dropper_connection.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> ALL($1::int[])",
                spared,
            )
            await asyncio.sleep(0.05)

    async with running_auditor(database_url, nats_url, SPENDGATE_AUDITOR_FETCH_MESSAGES_MAX="8"):
        dropper = asyncio.create_task(drop_auditor_connections())
        try:
            for batch_start in range(1, 301, 30):
                for partition in (0, 1):
                    await event_log.append(partition, range(batch_start, batch_start + 30))
                await asyncio.sleep(0.02)
        finally:
            dropper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dropper
            await dropper_connection.close()
        await wait_chained(event_log.connection, {0: 300, 1: 300})

    assert dropped > 0

    assert await row_counts(event_log.connection) == (600, 600)
    assert (await verify(database_url)).ok


async def test_auditor_killed_mid_stream_resumes_exactly_once(
    event_log: EventLog, database_url: str, nats_url: str
) -> None:
    partitions = range(4)
    events_per_partition = 600
    rounds = range(1, events_per_partition + 1, 20)
    env = auditor_env(database_url, nats_url, SPENDGATE_AUDITOR_FETCH_MESSAGES_MAX="20")
    killed = asyncio.Event()

    async def publish_steadily() -> None:
        for index, round_start in enumerate(rounds):
            if index == len(rounds) // 2:
                # The second half arrives after the kill, whatever the machine's speed.
                await killed.wait()
            for partition in partitions:
                await event_log.append(partition, range(round_start, round_start + 20))
            await asyncio.sleep(0.01)

    # The publisher writes through event_log's connection; the test watches through its own.
    observer = await asyncpg.connect(database_url)
    publisher = asyncio.create_task(publish_steadily())
    auditor = await asyncio.to_thread(start_service, "auditor", env)
    try:
        # Kill it in the middle of its work: once it chained some events, not all.
        deadline = time.monotonic() + CHAIN_DEADLINE_S
        while await observer.fetchval("SELECT count(*) FROM audit_chain") < 100:
            assert time.monotonic() < deadline, "the auditor chained nothing"
            await asyncio.sleep(POLL_INTERVAL_S)
        await asyncio.to_thread(auditor.kill)
        killed.set()
        auditor = await asyncio.to_thread(start_service, "auditor", env)
        await publisher
        await wait_chained(observer, dict.fromkeys(partitions, events_per_partition))
    finally:
        publisher.cancel()
        await observer.close()
        exit_code = await asyncio.to_thread(auditor.terminate, 10.0)

    assert exit_code == 0, auditor.logs()
    assert "auditor stopped" in auditor.logs()
    assert await row_counts(event_log.connection) == (2_400, 2_400)
    report = await verify(database_url)
    assert report.ok
    assert report.verified == 2_400
    assert '"level":"error"' not in auditor.logs()


async def test_nats_restart_mid_stream_loses_nothing(
    event_log: EventLog, database_url: str, nats_url: str, embedded_nats: EmbeddedNats
) -> None:
    async with running_auditor(database_url, nats_url):
        await event_log.append(0, range(1, 101))
        await wait_chained(event_log.connection, {0: 100})
        await asyncio.to_thread(embedded_nats.kill)
        await asyncio.sleep(0.5)  # the auditor's fetches fail meanwhile
        await asyncio.to_thread(embedded_nats.start)
        await event_log.append(0, range(101, 201))
        await wait_chained(event_log.connection, {0: 200})

    assert await row_counts(event_log.connection) == (200, 200)
    assert (await verify(database_url)).ok


async def test_postgres_crash_mid_stream_loses_nothing(
    event_log: EventLog,
    database_url: str,
    nats_url: str,
    embedded_postgres: EmbeddedPostgres,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_auditor(database_url, nats_url):
        await event_log.append(0, range(1, 101))
        await wait_chained(event_log.connection, {0: 100})
        with caplog.at_level(logging.WARNING, logger="spendgate_auditor"):
            await asyncio.to_thread(embedded_postgres.kill)
            # Published while Postgres is down: nothing may be acked before it is chained.
            await event_log.publish(0, range(101, 201))
            await asyncio.sleep(1.0)
            await asyncio.to_thread(embedded_postgres.start)
        event_log.connection = await asyncpg.connect(database_url)
        await event_log.record(0, range(101, 201))
        await wait_chained(event_log.connection, {0: 200})

    assert any("chaining" in m and "failed" in m for m in caplog.messages)
    assert await row_counts(event_log.connection) == (200, 200)
    assert (await verify(database_url)).ok


def test_verify_main_says_when_it_cannot_verify(capsys: pytest.CaptureFixture[str]) -> None:
    unreachable = "postgresql://postgres@127.0.0.1:1/nothing"
    assert verify_main(unreachable) == 2
    assert capsys.readouterr().err.startswith("ERROR: cannot verify:")


# ------------------------------------------------------------------ signed checkpoints


async def _rewrite_partition_chain(connection: asyncpg.Connection[Any], partition: int) -> None:
    """Recompute partition's links and head from its (changed) events: what someone who can
    write to Postgres, but has no signing key, can do to hide an edit."""
    events = sorted((await read_log(connection, partition)).items())
    previous = GENESIS_LINK
    for seq, (_, body) in events:
        previous = link(previous, partition, seq, body)
        await connection.execute(
            "UPDATE audit_chain SET link = $3 WHERE partition = $1 AND seq = $2",
            partition,
            seq,
            previous,
        )
    await connection.execute(
        "UPDATE audit_heads SET seq = $2, link = $3 WHERE partition = $1",
        partition,
        events[-1][0],
        previous,
    )


@pytest.mark.parametrize(
    ("tamper", "kind", "seq"),
    [
        ("edit_and_rewrite_chain", ProblemKind.CHECKPOINT_MISMATCH, 10),
        ("truncate_log_and_chain", ProblemKind.TRUNCATED_TAIL, 10),
        ("forge_signature", ProblemKind.BAD_SIGNATURE, 10),
        ("sign_with_unknown_key", ProblemKind.UNKNOWN_SIGNING_KEY, 10),
    ],
)
async def test_signed_checkpoints_catch_what_the_chain_alone_cannot(
    event_log: EventLog, database_url: str, nats_url: str, tamper: str, kind: ProblemKind, seq: int
) -> None:
    for partition in (0, 1):
        await event_log.append(partition, range(1, 11))
    # A stopping auditor signs its unsigned heads, so seq 10 of each partition is signed.
    async with running_auditor(database_url, nats_url):
        await wait_chained(event_log.connection, {0: 10, 1: 10})
    report = await verify(database_url)
    assert report.ok
    assert [p.signed_seq for p in report.partitions] == [10, 10]
    connection = event_log.connection
    events = await read_log(connection, 1)
    if tamper == "edit_and_rewrite_chain":
        events[4] = (events[4][0], event_body(1, 4).replace(b"180000", b"1"))
        await rewrite_log(connection, 1, events)
        await _rewrite_partition_chain(connection, 1)
    elif tamper == "truncate_log_and_chain":
        await rewrite_log(connection, 1, {seq: e for seq, e in events.items() if seq < 9})
        await connection.execute("DELETE FROM audit_chain WHERE partition = 1 AND seq >= 9")
        await _rewrite_partition_chain(connection, 1)
    elif tamper == "forge_signature":
        await connection.execute(
            "UPDATE audit_checkpoints SET signature = $1 WHERE partition = 1 AND seq = 10",
            bytes(64),
        )
    else:
        stranger = Signer.generate_ephemeral()
        row = await connection.fetchrow(
            "SELECT link FROM audit_checkpoints WHERE partition = 1 AND seq = 10"
        )
        await connection.execute(
            "UPDATE audit_checkpoints SET key_id = $1, signature = $2"
            " WHERE partition = 1 AND seq = 10",
            stranger.key_id,
            stranger.sign(1, 10, bytes(row["link"])),
        )
    report = await verify(database_url)
    [broken] = report.broken
    assert broken.partition == 1
    assert broken.problem is not None
    assert (broken.problem.kind, broken.problem.seq) == (kind, seq), broken.problem.reason


async def test_pinned_keys_refuse_a_key_added_to_the_database(
    event_log: EventLog, database_url: str, nats_url: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "audit.pem"
    key_file.write_bytes(new_private_key_pem())
    await event_log.append(2, range(1, 6))
    async with running_auditor(
        database_url, nats_url, SPENDGATE_AUDIT_SIGNING_KEY_FILE=str(key_file)
    ) as auditor:
        await wait_chained(event_log.connection, {2: 5})
        genuine_key = auditor.signing_key_id
    connection = event_log.connection
    [public_key] = await connection.fetch("SELECT public_key FROM audit_signing_keys")
    pinned = tmp_path / "pinned.txt"
    pinned.write_text(base64.b64encode(bytes(public_key[0])).decode() + "\n")
    # Someone with write access to Postgres registers a key and re-signs with it.
    intruder = Signer.generate_ephemeral()
    await connection.execute(
        "INSERT INTO audit_signing_keys (key_id, algorithm, public_key) VALUES ($1, 'ed25519', $2)",
        intruder.key_id,
        intruder.public_key,
    )
    link_5 = await connection.fetchval(
        "SELECT link FROM audit_chain WHERE partition = 2 AND seq = 5"
    )
    await connection.execute(
        "UPDATE audit_checkpoints SET key_id = $1, signature = $2 WHERE partition = 2 AND seq = 5",
        intruder.key_id,
        intruder.sign(2, 5, bytes(link_5)),
    )
    assert intruder.key_id != genuine_key
    assert (await verify(database_url)).ok  # the database's keys include the intruder's
    assert await asyncio.to_thread(verify_main, database_url, public_keys=pinned) == 1


async def test_key_rotation_keeps_old_signatures_verifiable_and_from_seq_starts_late(
    event_log: EventLog, database_url: str, nats_url: str, tmp_path: Path
) -> None:
    key_ids = []
    for round_number, seqs in enumerate((range(1, 21), range(21, 41))):
        key_file = tmp_path / f"key-{round_number}.pem"
        key_file.write_bytes(new_private_key_pem())
        await event_log.append(3, seqs)
        async with running_auditor(
            database_url, nats_url, SPENDGATE_AUDIT_SIGNING_KEY_FILE=str(key_file)
        ) as auditor:
            await wait_chained(event_log.connection, {3: seqs[-1]})
            key_ids.append(auditor.signing_key_id)
    signed_by = await event_log.connection.fetch(
        "SELECT seq, key_id FROM audit_checkpoints WHERE partition = 3 ORDER BY seq"
    )
    assert [(row["seq"], row["key_id"]) for row in signed_by] == [
        (20, key_ids[0]),
        (40, key_ids[1]),
    ]
    report = await verify(database_url)
    assert report.ok
    [partition] = report.partitions
    assert (partition.checkpoints_verified, partition.signed_seq) == (2, 40)
    # From seq 30: trusts the checkpoint at 20 (signature checked), recomputes 21..40.
    [late] = (await verify(database_url, partition=3, from_seq=30)).partitions
    assert late.ok
    assert (late.events, late.verified, late.checkpoints_verified) == (20, 20, 1)
    # An edit before the start is not seen from there, but one after it is.
    events = await read_log(event_log.connection, 3)
    events[25] = (events[25][0], event_body(3, 25).replace(b"180000", b"7"))
    await rewrite_log(event_log.connection, 3, events)
    [late] = (await verify(database_url, partition=3, from_seq=30)).partitions
    assert late.problem is not None
    assert (late.problem.kind, late.problem.seq) == (ProblemKind.LINK_MISMATCH, 25)
