"""The event log as one row per append: splitting, the ledger's reads from any seq, the
``events`` view, and the migration of a log written one row per event."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from spendgate_common.event_batches import (
    MalformedBatchError,
    batch_row,
    join_bodies,
    split_batch,
)
from spendgate_common.migrate import apply_migrations
from spendgate_ledger import _store
from spendgate_ledger._store import EventRow, LedgerStore

# Sizes of the appends the store test writes: single events, a batch longer than a relay
# message (128 events), and batches longer than a replay page in the paged variant.
APPEND_SIZES = (1, 5, 130, 1, 300, 2, 64)
# The migration the tests below are about (0008_event_batches.sql).
EVENT_BATCHES_MIGRATION = 8


def body_of(partition: int, seq: int) -> bytes:
    # Compact JSON as canonical bytes are, with an escaped newline and non-ASCII text.
    return f'{{"p":{partition},"seq":{seq},"note":"a\\nb é €"}}'.encode()


# ----------------------------------------------------------------------------- pure


def test_a_batch_splits_back_into_its_events() -> None:
    bodies = [body_of(0, seq) for seq in range(7, 10)]
    row = batch_row(0, 1, 7, ["A", "B", "C"], bodies)
    assert row[:4] == (0, 7, 9, 1)
    assert split_batch(0, 7, 9, row[4], row[5]) == [
        (7, "A", bodies[0]),
        (8, "B", bodies[1]),
        (9, "C", bodies[2]),
    ]


@pytest.mark.parametrize(
    ("last_seq", "types", "bodies"),
    [
        (9, "A\nB", b"{}\n{}\n{}"),  # one type short
        (9, "A\nB\nC", b"{}\n{}"),  # one body short
        (8, "A\nB\nC", b"{}\n{}\n{}"),  # the range one short
        (6, "A", b"{}"),  # a range that ends before it starts
    ],
)
def test_a_batch_that_does_not_fit_its_range_is_refused(
    last_seq: int, types: str, bodies: bytes
) -> None:
    with pytest.raises(MalformedBatchError, match="the event batch at seq 7 covers seq 7"):
        split_batch(3, 7, last_seq, types, bodies)


def test_a_body_holding_the_separator_is_never_joined() -> None:
    with pytest.raises(AssertionError, match="newline"):
        join_bodies([b"{}", b"{\n}"])


# ----------------------------------------------------------------------- with Postgres


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as created:
        async with created.acquire() as connection:
            await apply_migrations(connection)
        yield created


async def test_the_store_reads_the_log_from_any_seq(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LedgerStore(pool, "owner-a")
    await store.seed_partitions(2)
    leases = {lease.partition: lease for lease in await store.claim_free(timedelta(seconds=30), 2)}
    appended: list[list[EventRow]] = []
    seq = 1
    for size in APPEND_SIZES:
        rows = [EventRow(s, f"T{s % 3}", body_of(1, s)) for s in range(seq, seq + size)]
        await store.append(leases[1], seq, rows)
        leases[1] = _store.Lease(1, leases[1].epoch, rows[-1].seq)
        appended.append(rows)
        seq += size
    everything = [row for rows in appended for row in rows]
    last_seq = everything[-1].seq

    # Pages of 100 events: a batch longer than a page comes whole.
    for fetch_events in (_store.REPLAY_FETCH_EVENTS, 100):
        monkeypatch.setattr(_store, "REPLAY_FETCH_EVENTS", fetch_events)
        for after_seq in range(last_seq + 1):
            replayed = [row async for page in store.read_events(1, after_seq) for row in page]
            assert replayed == everything[after_seq:], (fetch_events, after_seq)
            groups = await store.read_batches(1, after_seq)
            expected = [
                [row for row in rows if row.seq > after_seq]
                for rows in appended
                if rows[-1].seq > after_seq and rows[0].seq <= after_seq + fetch_events
            ]
            assert groups == expected, (fetch_events, after_seq)
    assert await store.read_batches(0, 0) == []

    async with pool.acquire() as connection:
        view = await connection.fetch(
            "SELECT partition, seq, type, body FROM events ORDER BY partition, seq"
        )
        stored = await connection.fetchval("SELECT count(*) FROM event_batches")
    assert [(r["partition"], r["seq"], r["type"], bytes(r["body"])) for r in view] == [
        (1, row.seq, row.type, row.body) for row in everything
    ]
    assert stored == len(APPEND_SIZES)


async def test_the_migration_makes_one_batch_of_each_append_already_in_the_log(
    database_url: str,
) -> None:
    """A log written one row per event before the migration: the rows of one transaction
    that are consecutive in one partition become one batch, and the ``events`` view shows
    exactly the rows the table held."""
    connection: asyncpg.Connection[Any] = await asyncpg.connect(database_url)
    try:
        await apply_migrations(connection, up_to=EVENT_BATCHES_MIGRATION - 1)
        rng = random.Random(8)
        # Transactions as (partition, seqs, epoch) parts: one spans two partitions, as an
        # append never did but a hand-made log could.
        transactions = [
            [(0, range(1, 4), 2)],
            [(0, range(4, 6), 2), (1, range(1, 3), 2)],
            [(0, range(6, 7), 2)],
            [(1, range(3, 40), 2)],
            [(0, range(7, 9), 2)],
            # Longer than a batch may grow: a log restored in one transaction, epochs too.
            [(2, range(1, 5_001), 2), (2, range(5_001, 5_003), 3)],
        ]
        for parts in transactions:
            async with connection.transaction():
                for partition, seqs, epoch in parts:
                    await connection.executemany(
                        "INSERT INTO events (partition, seq, epoch, type, body)"
                        " VALUES ($1, $2, $3, $4, $5)",
                        [
                            (partition, s, epoch, rng.choice(["A", "B"]), body_of(partition, s))
                            for s in seqs
                        ],
                    )
        before = await connection.fetch(
            "SELECT partition, seq, epoch, recorded_at, type, body FROM events"
            " ORDER BY partition, seq"
        )

        assert await apply_migrations(connection) == [EVENT_BATCHES_MIGRATION]

        after = await connection.fetch(
            "SELECT partition, seq, epoch, recorded_at, type, body FROM events"
            " ORDER BY partition, seq"
        )
        batches = await connection.fetch(
            "SELECT partition, first_seq, last_seq FROM event_batches ORDER BY partition, first_seq"
        )
    finally:
        await connection.close()
    assert [tuple(row) for row in after] == [tuple(row) for row in before]
    assert [tuple(row) for row in batches] == [
        (0, 1, 3),
        (0, 4, 5),
        (0, 6, 6),
        (0, 7, 8),
        (1, 1, 2),
        (1, 3, 39),
        (2, 1, 4_096),
        (2, 4_097, 5_000),
        (2, 5_001, 5_002),
    ]


# What a ledger of the release before migration 0008 sends (its _store.py), as a replica
# of that release still does during a rolling upgrade (docs/deploy.md).
PREVIOUS_RELEASE_APPEND = (
    "WITH fenced AS ("
    "   UPDATE partition_leases SET last_seq = $1"
    "   WHERE partition = $2 AND epoch = $3 AND owner = $4 AND last_seq = $5"
    "   RETURNING partition)"
    " INSERT INTO events (partition, seq, epoch, type, body)"
    " SELECT fenced.partition, $5 + batch.n, $3, batch.type, convert_to(batch.body, 'UTF8')"
    " FROM fenced, unnest(string_to_array($6::text, E'\\n'), string_to_array($7::text, E'\\n'))"
    "   WITH ORDINALITY AS batch(body, type, n)"
)
PREVIOUS_RELEASE_PAGE = (
    "SELECT seq, type, body, xmin::text AS appended_by FROM events"
    " WHERE partition = $1 AND seq > $2 ORDER BY seq LIMIT $3"
)


async def test_a_ledger_of_the_previous_release_keeps_working_during_an_upgrade(
    pool: asyncpg.Pool,
) -> None:
    """Old and new replicas side by side: the old one's fenced append through the view
    lands (as batches of one) and is fenced like before, its reads group each append by
    xmin as it cuts relay messages, and the new replica reads everything back."""
    store = LedgerStore(pool, "owner-a")
    await store.seed_partitions(1)
    [lease] = await store.claim_free(timedelta(seconds=30), 1)
    events = [EventRow(seq, f"T{seq}", body_of(0, seq)) for seq in range(1, 9)]
    await store.append(lease, 1, events[0:3])

    async def previous_release_append(rows: list[EventRow], epoch: int) -> str:
        async with pool.acquire() as connection:
            status: str = await connection.execute(
                PREVIOUS_RELEASE_APPEND,
                rows[-1].seq,
                0,
                epoch,
                "owner-a",
                rows[0].seq - 1,
                b"\n".join(row.body for row in rows).decode(),
                "\n".join(row.type for row in rows),
            )
        return status

    assert await previous_release_append(events[3:6], lease.epoch + 1) == "INSERT 0 0"
    assert await previous_release_append(events[3:6], lease.epoch) == "INSERT 0 3"
    await store.append(_store.Lease(0, lease.epoch, 6), 7, events[6:8])
    async with pool.acquire() as connection:
        # An event inserted by hand that would split into two.
        with pytest.raises(asyncpg.RaiseError, match="holds a newline"):
            await connection.execute(
                "INSERT INTO events (partition, seq, epoch, type, body) VALUES (0, 9, 1, 'A', $1)",
                b'{"a":\n1}',
            )

    assert [row async for page in store.read_events(0, 0) for row in page] == events
    async with pool.acquire() as connection:
        rows = await connection.fetch(PREVIOUS_RELEASE_PAGE, 0, 0, 5_000)
    assert [(r["seq"], r["type"], bytes(r["body"])) for r in rows] == [
        (e.seq, e.type, e.body) for e in events
    ]
    appends = [
        [r["seq"] for r in rows if r["appended_by"] == by]
        for by in dict.fromkeys(r["appended_by"] for r in rows)
    ]
    assert appends == [[1, 2, 3], [4, 5, 6], [7, 8]]


async def test_an_append_committing_while_the_migration_runs_is_not_lost(
    database_url: str,
) -> None:
    """A replica of the previous release appends (uncommitted) when the migration starts:
    the migration waits for it and moves its event; the event is not dropped with the
    old table."""
    appender: asyncpg.Connection[Any] = await asyncpg.connect(database_url)
    migrator: asyncpg.Connection[Any] = await asyncpg.connect(database_url)
    try:
        await apply_migrations(migrator, up_to=EVENT_BATCHES_MIGRATION - 1)
        append = appender.transaction()
        await append.start()
        await appender.execute(
            "INSERT INTO events (partition, seq, epoch, type, body) VALUES (0, 1, 1, 'A', $1)",
            body_of(0, 1),
        )
        migrating = asyncio.create_task(apply_migrations(migrator))
        # Until the migration is seen waiting for the append's lock.
        while not await appender.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
            migrator.get_server_pid(),
        ):
            assert not migrating.done(), migrating
            await asyncio.sleep(0.01)
        await append.commit()
        assert await migrating == [EVENT_BATCHES_MIGRATION]
        rows = await appender.fetch("SELECT partition, seq, body FROM events")
    finally:
        await appender.close()
        await migrator.close()
    assert [(r["partition"], r["seq"], bytes(r["body"])) for r in rows] == [(0, 1, body_of(0, 1))]
