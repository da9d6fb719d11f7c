"""Rollups equal the ledger's own totals after a stress run (real ledger, auditor, NATS, Postgres).

A real ledger process and a real auditor process; the test drives the ledger over NATS as
the gateway does, with many concurrent reserves across tenants (so partitions), keys and
budgets (fleet, vendor, tenant), committing (some above the hold: overruns), releasing,
leaving holds to expire, and running into caps (denials). Once the auditor has chained
every event, the rollups per key must equal the ledger's ``QueryKey`` answers and sums
over the ``events`` table, the budget rollups the ledger's ``QueryBudget`` answers, the
decisions table the events, and the finance stream must hold exactly one event per
settlement and per denial.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient

from spendgate_auditor import verify
from spendgate_common import finance_v1
from spendgate_common.ledger_v1 import (
    AnyCommand,
    AnyResult,
    BudgetState,
    CommandBatch,
    Commit,
    CreateBudget,
    Denied,
    Granted,
    IssueKey,
    KeyCreated,
    KeyState,
    QueryBudget,
    QueryKey,
    Release,
    Reserve,
    Settled,
    decode_result_batch,
    encode_batch,
)
from spendgate_common.partitioning import partition_for_tenant
from spendgate_common.subjects import FINANCE_STREAM, FINANCE_SUBJECT_WILDCARD
from spendgate_common.vault_keys import VaultKey, new_vault_key
from tests.harness import ServiceFactory

PARTITION_COUNT = 8
TENANTS = ("acme", "globex", "initech")
KEYS_PER_TENANT = 4
RESERVES = 1_200
CONCURRENCY = 48
REQUEST_TIMEOUT_S = 10.0
CATCH_UP_DEADLINE_S = 30.0
POLL_INTERVAL_S = 0.05
# Holds left open with this hold time expire during the run (the sweep runs every 50 ms).
SHORT_HOLD_MS = 300
KEY_EXPIRES_AT_MS = 4_102_444_800_000  # 2100-01-01
VENDORS = ("openai", "anthropic", "stripe")


def stack_env(database_url: str, nats_url: str) -> dict[str, str]:
    return {
        "SPENDGATE_DATABASE_URL": database_url,
        "SPENDGATE_NATS_URL": nats_url,
        "SPENDGATE_PARTITION_COUNT": str(PARTITION_COUNT),
        "SPENDGATE_LEDGER_SWEEP_INTERVAL_MS": "50",
        "SPENDGATE_AUDITOR_FETCH_WAIT_MS": "100",
        "SPENDGATE_AUDITOR_FETCH_MESSAGES_MAX": "256",
        "SPENDGATE_SHUTDOWN_DEADLINE_SECONDS": "5",
    }


class Ledger:
    def __init__(self, connection: NatsClient) -> None:
        self.connection = connection

    async def send(self, commands: Sequence[AnyCommand]) -> list[AnyResult]:
        partition = partition_for_tenant(commands[0].tenant, PARTITION_COUNT)
        batch = CommandBatch(partition=partition, commands=list(commands))
        reply = await self.connection.request(
            f"spendgate.v1.ledger.{partition}.cmd", encode_batch(batch), timeout=REQUEST_TIMEOUT_S
        )
        return decode_result_batch(reply.data).results

    async def one(self, command: AnyCommand) -> AnyResult:
        [result] = await self.send([command])
        return result


@dataclass(frozen=True, slots=True)
class RunKey:
    key: VaultKey
    label: str


# ------------------------------------------------------------- totals from three sources

# Per key, from the events table: what the ledger's meters count (docs/finance.md).
EVENT_TOTALS_SQL = """
WITH e AS (SELECT convert_from(body, 'UTF8')::jsonb AS b FROM events)
SELECT b->>'key_id' AS key_id,
  coalesce(sum(CASE b->>'type'
    WHEN 'ReservationCommitted' THEN (b->>'actual_micros')::bigint
    WHEN 'ReservationExpired' THEN (b->>'reserved_micros')::bigint END), 0) AS committed,
  coalesce(sum(CASE b->>'type'
    WHEN 'ReservationGranted' THEN (b->>'amount_micros')::bigint
    WHEN 'ReservationCommitted' THEN -(b->>'reserved_micros')::bigint
    WHEN 'ReservationReleased' THEN -(b->>'reserved_micros')::bigint
    WHEN 'ReservationExpired' THEN -(b->>'reserved_micros')::bigint END), 0) AS reserved,
  coalesce(sum((b->>'overrun_micros')::bigint)
    FILTER (WHERE b->>'type' = 'ReservationOverrun'), 0) AS overrun,
  count(*) FILTER (WHERE b->>'type' = 'ReservationDenied') AS denied_count,
  coalesce(sum((b->>'amount_micros')::bigint)
    FILTER (WHERE b->>'type' = 'ReservationDenied'), 0) AS denied
FROM e WHERE b ? 'key_id' AND b->>'type' <> 'KeyIssued' GROUP BY 1
"""

ROLLUP_TOTALS_SQL = """
SELECT key_id, sum(committed_micros)::bigint AS committed,
  sum(reserved_micros)::bigint AS reserved, sum(overrun_micros)::bigint AS overrun,
  sum(denied_count)::bigint AS denied_count, sum(denied_micros)::bigint AS denied
FROM audit_rollups GROUP BY key_id
"""

Totals = dict[str, tuple[int, int, int, int, int]]


async def event_totals(connection: asyncpg.Connection[Any]) -> Totals:
    rows = await connection.fetch(EVENT_TOTALS_SQL)
    return {row[0]: tuple(int(value) for value in row[1:]) for row in rows}  # type: ignore[misc]


async def rollup_totals(connection: asyncpg.Connection[Any]) -> Totals:
    rows = await connection.fetch(ROLLUP_TOTALS_SQL)
    return {row[0]: tuple(int(value) for value in row[1:]) for row in rows}  # type: ignore[misc]


async def wait_caught_up(connection: asyncpg.Connection[Any]) -> None:
    """Until every partition's audit head is at the ledger's last seq."""
    deadline = time.monotonic() + CATCH_UP_DEADLINE_S
    while True:
        behind = await connection.fetchval(
            "SELECT count(*) FROM partition_leases AS l LEFT JOIN audit_heads AS h"
            " USING (partition) WHERE l.last_seq > coalesce(h.seq, 0)"
        )
        if behind == 0:
            return
        assert time.monotonic() < deadline, f"{behind} partitions not audited in time"
        await asyncio.sleep(POLL_INTERVAL_S)


async def finance_events(connection: NatsClient, expected: int) -> list[Any]:
    """Every finance event in the stream, decoded (waits until ``expected`` are there)."""
    jetstream = connection.jetstream()
    deadline = time.monotonic() + CATCH_UP_DEADLINE_S
    while (await jetstream.stream_info(FINANCE_STREAM)).state.messages < expected:
        assert time.monotonic() < deadline, "finance events missing"
        await asyncio.sleep(POLL_INTERVAL_S)
    subscription = await jetstream.pull_subscribe(FINANCE_SUBJECT_WILDCARD, stream=FINANCE_STREAM)
    events: list[Any] = []
    while True:
        try:
            messages = await subscription.fetch(1_000, timeout=0.5)
        except TimeoutError:
            break
        for message in messages:
            event = finance_v1.decode_finance_event(message.data)
            assert message.headers is not None
            assert message.headers["Nats-Msg-Id"] == event.id
            assert message.subject == f"spendgate.v1.finance.{event.data.tenant}"
            events.append(event)
            await message.ack()
    await subscription.unsubscribe()
    return events


# ---------------------------------------------------------------------------- the run


@pytest.fixture
async def ledger(nats_url: str) -> AsyncIterator[Ledger]:
    connection = await nats.connect(nats_url)
    try:
        yield Ledger(connection)
    finally:
        await connection.close()


async def setup_keys_and_budgets(ledger: Ledger) -> list[RunKey]:
    keys: list[RunKey] = []
    for tenant in TENANTS:
        budgets = [
            CreateBudget(tenant, "fleet-a", "fleet", "fleet-a/", 40_000_000, "total", "UTC"),
            CreateBudget(tenant, "openai", "vendor", "openai", 30_000_000, "total", "Asia/Tokyo"),
            CreateBudget(tenant, "all", "tenant", "", 60_000_000, "total", "Europe/Berlin"),
        ]
        for result in await ledger.send(budgets):
            assert isinstance(result, BudgetState), result
        for index in range(KEYS_PER_TENANT):
            key = new_vault_key(tenant)
            label = f"fleet-a/run-{index}" if index % 2 == 0 else f"solo/run-{index}"
            # Different caps (two keys run into theirs) and zones (days are local).
            cap = 8_000_000 if index < 2 else 30_000_000
            command = IssueKey(
                tenant=tenant,
                key_id=key.key_id,
                label=label,
                secret_sha256=key.secret_sha256,
                cap_micros=cap,
                window="total",
                timezone=("UTC", "America/New_York", "Asia/Kolkata", "Pacific/Auckland")[index],
                expires_at_ms=KEY_EXPIRES_AT_MS,
                fleet_labels=["team-blue"] if index == 3 else [],
            )
            assert isinstance(await ledger.one(command), KeyCreated)
            keys.append(RunKey(key, label))
    return keys


async def one_call(ledger: Ledger, run: RunKey, rng: random.Random, index: int) -> Counter[str]:
    """Reserve, then commit (sometimes above the hold), release, or leave the hold."""
    key = run.key
    outcome: Counter[str] = Counter()
    short_hold = rng.random() < 0.1
    reserve = Reserve(
        tenant=key.tenant,
        key_id=key.key_id,
        secret_sha256=key.secret_sha256,
        amount_micros=rng.randrange(50_000, 400_000),
        vendor=rng.choice(VENDORS),
        operation="POST /v1/chat/completions",
        idempotency_key=f"call-{index}",
        hold_ms=SHORT_HOLD_MS if short_hold else 0,
    )
    result = await ledger.one(reserve)
    if isinstance(result, Denied):
        outcome["denied"] += 1
        return outcome
    assert isinstance(result, Granted), result
    outcome["granted"] += 1
    if short_hold:
        outcome["expire"] += 1  # the sweep settles it
        return outcome
    await asyncio.sleep(rng.random() * 0.01)  # the "vendor call"
    choice = rng.random()
    if choice < 0.6:
        if choice < 0.1:  # above the hold: an overrun
            actual = reserve.amount_micros + rng.randrange(1, 50_000)
        else:
            actual = rng.randrange(0, reserve.amount_micros + 1)
        settle: AnyCommand = Commit(
            key.tenant, key.key_id, key.secret_sha256, result.reservation_id, actual
        )
        outcome["commit"] += 1
    elif choice < 0.85:
        settle = Release(
            key.tenant, key.key_id, key.secret_sha256, result.reservation_id, "vendor 400"
        )
        outcome["release"] += 1
    else:
        outcome["open"] += 1
        return outcome
    assert isinstance(await ledger.one(settle), Settled)
    return outcome


async def test_rollups_equal_the_ledgers_totals_after_a_stress_run(
    service_factory: ServiceFactory, database_url: str, nats_url: str, ledger: Ledger
) -> None:
    env = stack_env(database_url, nats_url)
    service_factory.start_many({"ledger": env, "auditor": env})
    keys = await setup_keys_and_budgets(ledger)
    rng = random.Random(5)
    semaphore = asyncio.Semaphore(CONCURRENCY)
    outcomes: Counter[str] = Counter()

    async def call(index: int) -> None:
        async with semaphore:
            outcomes.update(await one_call(ledger, rng.choice(keys), rng, index))

    await asyncio.gather(*(call(index) for index in range(RESERVES)))
    assert outcomes["denied"] > 50, outcomes  # the caps were reached
    assert outcomes["commit"] > 100, outcomes
    # Let every short hold expire (the sweep runs every 50 ms).
    await asyncio.sleep(SHORT_HOLD_MS / 1000 + 0.5)

    connection: asyncpg.Connection[Any] = await asyncpg.connect(database_url)
    try:
        await wait_caught_up(connection)
        from_events = await event_totals(connection)
        from_rollups = await rollup_totals(connection)
        decisions = dict(
            await connection.fetch("SELECT outcome, count(*) FROM audit_decisions GROUP BY 1")
        )
        budget_rows = await connection.fetch(
            "SELECT tenant, budget_id, sum(committed_micros)::bigint, sum(reserved_micros)::bigint,"
            " sum(overrun_micros)::bigint FROM audit_budget_rollups GROUP BY 1, 2"
        )
        unpublished = await connection.fetchval("SELECT count(*) FROM audit_finance_outbox")
    finally:
        await connection.close()

    # 1. Rollups per key equal the sums over the events table, and the ledger's answers.
    assert from_rollups == from_events
    for run in keys:
        state = await ledger.one(QueryKey(tenant=run.key.tenant, key_id=run.key.key_id))
        assert isinstance(state, KeyState), state
        committed, reserved, overrun, _, _ = from_rollups.get(run.key.key_id, (0, 0, 0, 0, 0))
        assert (committed, reserved, overrun) == (
            state.committed_micros,
            state.reserved_micros,
            state.overrun_micros,
        ), run.label
    # 2. Budget rollups (each in its own zone) equal the ledger's budget meters.
    by_budget = {(row[0], row[1]): (row[2], row[3], row[4]) for row in budget_rows}
    for tenant in TENANTS:
        for budget_id in ("fleet-a", "openai", "all"):
            state = await ledger.one(QueryBudget(tenant=tenant, budget_id=budget_id))
            assert isinstance(state, BudgetState), state
            assert by_budget.get((tenant, budget_id), (0, 0, 0)) == (
                state.committed_micros,
                state.reserved_micros,
                state.overrun_micros,
            ), (tenant, budget_id)
    # 3. One decision per reserve decided, settled as the client (and the sweep) did.
    assert decisions.get("denied", 0) == outcomes["denied"]
    assert decisions.get("committed", 0) == outcomes["commit"]
    assert decisions.get("released", 0) == outcomes["release"]
    assert decisions.get("expired", 0) == outcomes["expire"]
    assert decisions.get("open", 0) == outcomes["open"]
    # 4. Exactly one finance event per settlement and per denial, none left unpublished.
    settled = outcomes["commit"] + outcomes["release"] + outcomes["expire"]
    events = await finance_events(ledger.connection, settled + outcomes["denied"])
    assert unpublished == 0
    assert len(events) == settled + outcomes["denied"]
    assert len({event.id for event in events}) == len(events)
    kinds = Counter(
        event.data.outcome if isinstance(event, finance_v1.ReservationSettled) else "denied"
        for event in events
    )
    assert kinds == Counter(
        committed=outcomes["commit"],
        released=outcomes["release"],
        expired=outcomes["expire"],
        denied=outcomes["denied"],
    )
    overruns = sum(
        event.data.overrun_micros
        for event in events
        if isinstance(event, finance_v1.ReservationSettled)
    )
    assert overruns == sum(total[2] for total in from_rollups.values())
    # 5. And the chain verifies, signed.
    report = await verify(database_url)
    assert report.ok
    assert all(partition.signed_seq > 0 for partition in report.partitions)


def test_finance_events_round_trip_through_their_schema_types() -> None:
    body = (
        b'{"type":"io.spendgate.finance.reservation.denied.v1","specversion":"1.0",'
        b'"id":"3:17","source":"/spendgate/v1/partitions/3","subject":"dcn_3_17",'
        b'"time":"2023-11-14T22:13:20.000Z","datacontenttype":"application/json",'
        b'"spendgatepartition":3,"spendgateseq":17,"data":{"tenant":"acme","key_id":"k",'
        b'"label":"run-1","fleet_labels":[],"vendor":"openai","operation":"POST /v1/x",'
        b'"decision_id":"dcn_3_17","code":"cap_exhausted","requested_micros":5,'
        b'"scope":"key","scope_id":"k","committed_micros":1,"reserved_micros":2,'
        b'"cap_micros":3,"denied_at":"2023-11-14T22:13:20.000Z","day":"2023-11-14",'
        b'"timezone":"UTC"}}'
    )
    event = finance_v1.decode_finance_event(body)
    assert isinstance(event, finance_v1.ReservationDenied)
    assert finance_v1.encode_finance_event(event) == body
    with pytest.raises(msgspec.ValidationError):
        finance_v1.decode_finance_event(body.replace(b'"1.0"', b'"0.3"'))


# ------------------------------------------------------------------ the pure rollup core


def test_days_are_local_to_the_keys_zone_and_settlements_reduce_the_grant_day() -> None:
    from datetime import date

    from spendgate_auditor._rollup import COMMITTED, GRANTED, RESERVED, RollupBatch, local_day
    from spendgate_common.events_v1 import KeyIssued, ReservationCommitted, ReservationGranted

    # 2023-11-15 03:30 UTC is still 2023-11-14 in New York.
    late_evening_ny = 1_700_019_000_000
    assert local_day(late_evening_ny, "America/New_York") == date(2023, 11, 14)
    assert local_day(late_evening_ny, "UTC") == date(2023, 11, 15)
    batch = RollupBatch({}, {}, {})
    batch.apply(
        0,
        1,
        KeyIssued(
            at_ms=late_evening_ny,
            key_id="k",
            tenant="acme",
            label="run-1",
            secret_sha256="0" * 64,
            cap_micros=10**9,
            window="daily",
            timezone="America/New_York",
            expires_at_ms=4_102_444_800_000,
        ),
    )
    batch.apply(
        0,
        2,
        ReservationGranted(
            late_evening_ny, "rsv_0_2", "k", 500, "openai", "op", None, "0" * 64, 0, 0, []
        ),
    )
    next_day = late_evening_ny + 86_400_000
    batch.apply(0, 3, ReservationCommitted(next_day, "rsv_0_2", "k", 500, 450, 0))
    rows = {ref[3]: row.counters for ref, row in batch.key_rollups.items()}
    assert rows[date(2023, 11, 14)][GRANTED] == 500
    assert rows[date(2023, 11, 14)][RESERVED] == 0  # the hold was settled
    assert rows[date(2023, 11, 15)][COMMITTED] == 450
    [decision] = batch.decisions_to_insert()
    assert (decision.outcome, decision.spent_micros, decision.settled_seq) == ("committed", 450, 3)
    [finance] = batch.finance
    assert (finance.partition, finance.seq, finance.tenant) == (0, 3, "acme")


def test_events_the_rollups_cannot_place_are_skipped_not_guessed() -> None:
    from spendgate_auditor._rollup import RollupBatch
    from spendgate_common.events_v1 import ReservationReleased

    batch = RollupBatch({}, {}, {})
    batch.apply(4, 9, ReservationReleased(1, "rsv_4_1", "unknown-key", 100, "x"))
    assert [(s.partition, s.seq) for s in batch.skipped] == [(4, 9)]
    assert not batch.key_rollups
    assert not batch.finance
