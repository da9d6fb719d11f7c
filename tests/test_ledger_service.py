"""The ledger service against a real NATS (JetStream) and a real Postgres. No mocks.

The ledger runs in-process for most tests (fast, deterministic shutdown) and as a child
process where a test needs to SIGKILL it. Tests talk to it exactly as the gateway does:
a ``CommandBatch`` requested on ``spendgate.v1.ledger.<partition>.cmd``, a
``ResultBatch`` in the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from spendgate_common.errors import StoreUnavailableError
from spendgate_common.event_batches import MalformedBatchError
from spendgate_common.events_v1 import (
    AnyEvent,
    KeyIssued,
    ReservationCommitted,
    ReservationDenied,
    ReservationGranted,
    ReservationReleased,
    decode_event,
    encode_event,
)
from spendgate_common.ledger_v1 import (
    AnyCommand,
    AnyResult,
    CommandBatch,
    Commit,
    Denied,
    Failed,
    Granted,
    IssueKey,
    KeyCreated,
    KeyState,
    QueryKey,
    Release,
    Reserve,
    Settled,
    decode_result_batch,
    encode_batch,
)
from spendgate_common.limits import COMMANDS_PER_REQUEST_MAX
from spendgate_common.migrate import load_migrations
from spendgate_common.partitioning import partition_for_tenant
from spendgate_common.settings import Env
from spendgate_common.subjects import (
    ledger_command_subject,
)
from spendgate_common.vault_keys import VaultKey, new_vault_key
from spendgate_ledger import LedgerService, LedgerSettings
from spendgate_ledger import _service as ledger_service_module
from spendgate_ledger._store import DatabaseEncodingError
from tests.event_stream import read_stream_events
from tests.harness import ServiceProcess, start_service

PARTITION_COUNT = 8
LEASE_MS = 1_000
# Bound of one request in these tests; a healthy ledger answers in milliseconds.
REQUEST_TIMEOUT_S = 5.0
# Bound of every "eventually" wait (relay publishing, takeover, ...).
EVENTUALLY_S = 15.0
POLL_INTERVAL_S = 0.02
CAP_MICROS = 1_000_000
PRICE_MICROS = 180_000
KEY_EXPIRES_AT_MS = 4_102_444_800_000  # 2100-01-01

TENANT = "acme"  # partition 0 of 8
OTHER_TENANT = "globex"  # partition 7 of 8
assert partition_for_tenant(TENANT, PARTITION_COUNT) != partition_for_tenant(
    OTHER_TENANT, PARTITION_COUNT
)


def ledger_env(database_url: str, nats_url: str, **extra: str) -> dict[str, str]:
    return {
        "SPENDGATE_DATABASE_URL": database_url,
        "SPENDGATE_NATS_URL": nats_url,
        "SPENDGATE_PARTITION_COUNT": str(PARTITION_COUNT),
        "SPENDGATE_LEDGER_LEASE_MS": str(LEASE_MS),
        "SPENDGATE_SHUTDOWN_DEADLINE_SECONDS": "5",
        **extra,
    }


@contextlib.asynccontextmanager
async def running_ledger(
    database_url: str, nats_url: str, **extra: str
) -> AsyncIterator[LedgerService]:
    service = LedgerService(
        LedgerSettings.from_env(Env(ledger_env(database_url, nats_url, **extra)))
    )
    try:
        # Inside the try: a start that fails half-way still closes what it opened.
        await service.start()
        yield service
    finally:
        await service.stop()


def partition_of(tenant: str) -> int:
    return partition_for_tenant(tenant, PARTITION_COUNT)


class LedgerClient:
    """Sends command batches the way the gateway does and decodes the replies."""

    def __init__(self, connection: NatsClient) -> None:
        self.connection = connection

    async def request_raw(
        self, partition: int, data: bytes, *, timeout_s: float = REQUEST_TIMEOUT_S
    ) -> list[AnyResult]:
        reply = await self.connection.request(
            ledger_command_subject(partition), data, timeout=timeout_s
        )
        return decode_result_batch(reply.data).results

    async def send(
        self, commands: Sequence[AnyCommand], *, partition: int | None = None
    ) -> list[AnyResult]:
        if partition is None:
            partition = partition_of(commands[0].tenant)
        batch = CommandBatch(partition=partition, commands=list(commands))
        results = await self.request_raw(partition, encode_batch(batch))
        assert len(results) == len(commands)
        return results

    async def one(self, command: AnyCommand) -> AnyResult:
        [result] = await self.send([command])
        return result


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[LedgerClient]:
    connection = await nats.connect(nats_url)
    try:
        yield LedgerClient(connection)
    finally:
        await connection.close()


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    connection: asyncpg.Connection[Any] = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


# ------------------------------------------------------------------- commands


def issue(key: VaultKey, cap_micros: int = CAP_MICROS) -> IssueKey:
    return IssueKey(
        tenant=key.tenant,
        key_id=key.key_id,
        label=f"run-{key.key_id[:4]}",
        secret_sha256=key.secret_sha256,
        cap_micros=cap_micros,
        window="total",
        timezone="UTC",
        expires_at_ms=KEY_EXPIRES_AT_MS,
    )


def reserve(
    key: VaultKey, amount_micros: int = PRICE_MICROS, idempotency_key: str | None = None
) -> Reserve:
    return Reserve(
        tenant=key.tenant,
        key_id=key.key_id,
        secret_sha256=key.secret_sha256,
        amount_micros=amount_micros,
        vendor="openai",
        operation="POST /v1/chat/completions",
        idempotency_key=idempotency_key,
    )


def commit(key: VaultKey, reservation_id: str, actual_micros: int) -> Commit:
    return Commit(
        tenant=key.tenant,
        key_id=key.key_id,
        secret_sha256=key.secret_sha256,
        reservation_id=reservation_id,
        actual_micros=actual_micros,
    )


def release(key: VaultKey, reservation_id: str) -> Release:
    return Release(
        tenant=key.tenant,
        key_id=key.key_id,
        secret_sha256=key.secret_sha256,
        reservation_id=reservation_id,
        reason="vendor returned 400",
    )


def query(key: VaultKey) -> QueryKey:
    return QueryKey(tenant=key.tenant, key_id=key.key_id)


def granted(result: AnyResult) -> Granted:
    assert isinstance(result, Granted), result
    return result


def key_state(result: AnyResult) -> KeyState:
    assert isinstance(result, KeyState), result
    return result


# ------------------------------------------------------------------ the event log


async def logged_events(
    database: asyncpg.Connection[Any], partition: int
) -> list[tuple[int, AnyEvent]]:
    """The partition's events from Postgres, checked to be contiguous from seq 1."""
    rows = await database.fetch(
        "SELECT seq, type, body FROM events WHERE partition = $1 ORDER BY seq", partition
    )
    events: list[tuple[int, AnyEvent]] = []
    for row in rows:
        event = decode_event(bytes(row["body"]))
        assert row["type"] == type(event).__name__
        events.append((row["seq"], event))
    assert [seq for seq, _ in events] == list(range(1, len(events) + 1))
    return events


def assert_never_over_cap(events: Sequence[AnyEvent]) -> None:
    """Replay amounts (total windows, no overruns) and check the cap after every event."""
    caps: dict[str, int] = {}
    committed: Counter[str] = Counter()
    reserved: Counter[str] = Counter()
    holds: dict[str, int] = {}
    for event in events:
        match event:
            case KeyIssued():
                caps[event.key_id] = event.cap_micros
            case ReservationGranted():
                reserved[event.key_id] += event.amount_micros
                holds[event.reservation_id] = event.amount_micros
            case ReservationCommitted():
                assert event.actual_micros <= event.reserved_micros
                reserved[event.key_id] -= holds.pop(event.reservation_id)
                committed[event.key_id] += event.actual_micros
            case ReservationReleased():
                reserved[event.key_id] -= holds.pop(event.reservation_id)
            case ReservationDenied():
                pass
        for key_id, cap in caps.items():
            assert committed[key_id] + reserved[key_id] <= cap, event


async def start_ledger_process(database_url: str, nats_url: str, owner_id: str) -> ServiceProcess:
    """A ledger replica as a child process (so that it can be SIGKILLed), once it is ready."""
    env = ledger_env(database_url, nats_url, SPENDGATE_LEDGER_OWNER_ID=owner_id)
    # start_service blocks until the replica is ready; keep the event loop (and with it
    # the test's NATS connection) running meanwhile.
    return await asyncio.to_thread(start_service, "ledger", env)


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = EVENTUALLY_S
) -> float:
    """Poll ``check`` until it is true; return the seconds it took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout_s, f"timed out waiting for {what}"
        await asyncio.sleep(POLL_INTERVAL_S)
    return time.monotonic() - started


# -------------------------------------------------------------------------- tests


async def test_issue_reserve_commit_release_round_trip(
    database_url: str, nats_url: str, client: LedgerClient, database: asyncpg.Connection[Any]
) -> None:
    key = new_vault_key(TENANT)
    partition = partition_of(TENANT)
    async with running_ledger(database_url, nats_url) as ledger:
        assert ledger.owned_partitions == list(range(PARTITION_COUNT))
        assert await client.one(issue(key)) == KeyCreated(key.key_id, KEY_EXPIRES_AT_MS)

        first = granted(await client.one(reserve(key)))
        # A replied grant is already durable: it is in the log before we do anything else.
        logged = [event for _, event in await logged_events(database, partition)]
        assert any(
            isinstance(event, ReservationGranted) and event.reservation_id == first.reservation_id
            for event in logged
        )
        assert (first.committed_micros, first.reserved_micros) == (0, PRICE_MICROS)
        assert first.cap_micros == CAP_MICROS

        settled = await client.one(commit(key, first.reservation_id, 100_000))
        assert settled == Settled(first.reservation_id, 100_000, PRICE_MICROS - 100_000)

        # Several commands in one message: answered in order.
        second, third, state = await client.send(
            [reserve(key, 300_000), reserve(key, 700_000), query(key)]
        )
        second = granted(second)
        assert isinstance(third, Denied), third
        assert (third.code, third.scope, third.scope_id) == ("cap_exhausted", "key", key.key_id)
        assert (third.committed_micros, third.reserved_micros) == (100_000, 300_000)
        assert key_state(state).reserved_micros == 300_000

        released = await client.one(release(key, second.reservation_id))
        assert released == Settled(second.reservation_id, 0, 300_000)
        final = key_state(await client.one(query(key)))
        assert (final.committed_micros, final.reserved_micros) == (100_000, 0)
        assert final.cap_micros == CAP_MICROS

        again = await client.one(commit(key, first.reservation_id, 1))
        assert isinstance(again, Failed)
        assert again.code == "already_settled"
        wrong = VaultKey(key.tenant, key.key_id, "a" * 32)
        invalid = await client.one(reserve(wrong))
        assert isinstance(invalid, Failed)
        assert invalid.code == "invalid_key"
        # A tenant sent to a partition that is not its own is refused by that partition.
        [misrouted] = await client.send([query(key)], partition=(partition + 1) % PARTITION_COUNT)
        assert isinstance(misrouted, Failed)
        assert misrouted.code == "wrong_partition"

    versions = await database.fetch("SELECT version FROM schema_migrations ORDER BY version")
    assert [row["version"] for row in versions] == [m.version for m in load_migrations()]
    types = [type(event).__name__ for _, event in await logged_events(database, partition)]
    assert types == [
        "KeyIssued",
        "ReservationGranted",
        "ReservationCommitted",
        "ReservationGranted",
        "ReservationDenied",
        "ReservationReleased",
    ]


async def test_events_are_durable_ordered_and_published(
    database_url: str, nats_url: str, client: LedgerClient, database: asyncpg.Connection[Any]
) -> None:
    keys = [new_vault_key(TENANT), new_vault_key(OTHER_TENANT)]
    async with running_ledger(database_url, nats_url):
        for key in keys:
            await client.one(issue(key))
            grants = [granted(r) for r in await client.send([reserve(key)] * 3)]
            await client.one(commit(key, grants[0].reservation_id, 50_000))
            await client.one(release(key, grants[1].reservation_id))
            await client.send([reserve(key, 900_000)] * 2)  # denied: the log keeps denials
        logs = {
            p: await logged_events(database, p) for p in map(partition_of, (TENANT, OTHER_TENANT))
        }
        assert all(len(events) == 8 for events in logs.values())

        async def watermarks_caught_up() -> bool:
            rows = await database.fetch("SELECT partition, published_seq FROM outbox_watermarks")
            return all(row["published_seq"] == len(logs.get(row["partition"], [])) for row in rows)

        await eventually(watermarks_caught_up, "outbox watermarks")
        published = await read_stream_events(nats_url)

    leases = await database.fetch("SELECT partition, epoch, last_seq FROM partition_leases")
    assert len(leases) == PARTITION_COUNT
    for lease in leases:
        assert lease["last_seq"] == len(logs.get(lease["partition"], []))
    bodies = {
        (row["partition"], row["seq"]): (bytes(row["body"]), row["epoch"])
        for row in await database.fetch("SELECT partition, seq, body, epoch FROM events")
    }
    assert {epoch for _, epoch in bodies.values()} == {1}
    seen: dict[int, list[int]] = {}
    for event in published:
        assert event.body == bodies[(event.partition, event.seq)][0]
        seen.setdefault(event.partition, []).append(event.seq)
    assert seen == {partition: list(range(1, 9)) for partition in logs}
    # One message per appended batch: the key, three reserves sent in one request, the
    # commit, the release, and the two denials sent in one request.
    runs: dict[str, int] = {}
    for event in published:
        runs[event.msg_id] = runs.get(event.msg_id, 0) + 1
    assert sorted(runs.values()) == sorted([1, 3, 1, 1, 2] * 2)


async def test_a_relay_republishing_from_the_log_sends_the_same_messages(
    database_url: str, nats_url: str, client: LedgerClient, database: asyncpg.Connection[Any]
) -> None:
    """A new owner reads its backlog from the log: it cuts the batches into the same
    messages (the rows of one append share a transaction id), so JetStream drops them."""
    key = new_vault_key(TENANT)
    partition = partition_of(TENANT)
    async with running_ledger(database_url, nats_url):
        await client.one(issue(key))
        for size in (1, 5, 3, 200):  # one request each: one batch, one append each
            await client.send([reserve(key, 1_000)] * size)

        async def published() -> bool:
            seq = await database.fetchval(
                "SELECT published_seq FROM outbox_watermarks WHERE partition = $1", partition
            )
            return bool(seq == 1 + 1 + 5 + 3 + 200)

        await eventually(published, "the relay")
    first = await read_stream_events(nats_url)
    # 200 events of one append travel as two runs (the cut is by count: 128 + 72).
    runs = sorted({event.msg_id for event in first})
    assert len(runs) == 6, runs
    # Forget that anything was published: the next owner republishes the whole log.
    await database.execute("UPDATE outbox_watermarks SET published_seq = 0")
    async with running_ledger(database_url, nats_url):
        await eventually(published, "the relay, again")
    assert await read_stream_events(nats_url) == first


async def test_concurrent_reserves_never_exceed_the_cap(
    database_url: str, nats_url: str, client: LedgerClient, database: asyncpg.Connection[Any]
) -> None:
    keys = [new_vault_key(TENANT), new_vault_key(OTHER_TENANT)]
    rng = random.Random(20_250_310)
    async with running_ledger(database_url, nats_url):
        for key in keys:
            assert isinstance(await client.one(issue(key)), KeyCreated)
        # 200 distinct calls per key, each sent twice (a retry with the same idempotency
        # key), shuffled into messages of 5 commands sent from concurrent tasks.
        commands = [reserve(key, idempotency_key=f"call-{i}") for key in keys for i in range(200)]
        commands = commands * 2
        rng.shuffle(commands)
        messages = [commands[i : i + 5] for i in range(0, len(commands), 5)]

        async def send_one_message(
            message: Sequence[AnyCommand],
        ) -> list[tuple[AnyCommand, AnyResult]]:
            # A batch goes to one partition, as the gateway's coalescing does.
            by_partition: dict[int, list[AnyCommand]] = {}
            for command in message:
                by_partition.setdefault(partition_of(command.tenant), []).append(command)
            pairs: list[tuple[AnyCommand, AnyResult]] = []
            for partition, batch in by_partition.items():
                results = await client.send(batch, partition=partition)
                pairs += zip(batch, results, strict=True)
            return pairs

        answered = await asyncio.gather(*(send_one_message(m) for m in messages))

    decisions: dict[tuple[str, str], list[Granted | Denied]] = {}
    for command, result in (pair for pairs in answered for pair in pairs):
        assert isinstance(command, Reserve)
        assert command.idempotency_key is not None
        assert isinstance(result, Granted | Denied), result
        decisions.setdefault((command.key_id, command.idempotency_key), []).append(result)
    assert len(decisions) == 400
    for key in keys:
        results = [rs for (key_id, _), rs in decisions.items() if key_id == key.key_id]
        grants = [rs for rs in results if isinstance(rs[0], Granted)]
        assert len(grants) == 5, f"{len(grants)} grants of {PRICE_MICROS} under {CAP_MICROS}"
        for first, retry in results:
            # The retry got the same decision, and exactly one of the two was a replay.
            assert msgspec.structs.replace(first, replayed=False) == msgspec.structs.replace(
                retry, replayed=False
            )
            assert sorted([first.replayed, retry.replayed]) == [False, True]
            if isinstance(first, Granted):
                assert first.committed_micros + first.reserved_micros <= CAP_MICROS
            else:
                assert isinstance(first, Denied)
                assert first.committed_micros + first.reserved_micros + PRICE_MICROS > CAP_MICROS
        events = [event for _, event in await logged_events(database, partition_of(key.tenant))]
        assert_never_over_cap(events)
        kinds = Counter(type(event).__name__ for event in events)
        assert kinds == {"KeyIssued": 1, "ReservationGranted": 5, "ReservationDenied": 195}
        # Every replied grant is in the log, and nothing else was granted.
        replied = {rs[0].reservation_id for rs in grants if isinstance(rs[0], Granted)}
        logged = {e.reservation_id for e in events if isinstance(e, ReservationGranted)}
        assert replied == logged


async def test_a_full_partition_queue_answers_overloaded_and_loses_nothing(
    database_url: str, nats_url: str, client: LedgerClient, database: asyncpg.Connection[Any]
) -> None:
    key = new_vault_key(TENANT)
    bounds = {
        "SPENDGATE_LEDGER_QUEUE_REQUESTS_MAX": "1",
        "SPENDGATE_LEDGER_BATCH_COMMANDS_MAX": "1",
    }
    async with running_ledger(database_url, nats_url, **bounds):
        await client.one(issue(key, cap_micros=1_000 * CAP_MICROS))
        results = await asyncio.gather(
            *(client.one(reserve(key, idempotency_key=f"call-{i}")) for i in range(200))
        )
    codes = Counter(
        result.code if isinstance(result, Failed) else type(result).__name__ for result in results
    )
    assert set(codes) == {"Granted", "overloaded"}, codes
    events = [event for _, event in await logged_events(database, partition_of(TENANT))]
    replied = {result.reservation_id for result in results if isinstance(result, Granted)}
    logged = {e.reservation_id for e in events if isinstance(e, ReservationGranted)}
    # An overloaded call changed nothing; every grant that was replied is in the log.
    assert replied == logged


async def test_released_budget_is_granted_again_under_concurrency(
    database_url: str, nats_url: str, client: LedgerClient, database: asyncpg.Connection[Any]
) -> None:
    key = new_vault_key(TENANT)
    async with running_ledger(database_url, nats_url):
        await client.one(issue(key))
        grants = [granted(r) for r in await client.send([reserve(key)] * 5)]
        # Commit three at 0.10 and release two: 0.70 is free again, room for three more.
        await client.send([commit(key, g.reservation_id, 100_000) for g in grants[:3]])
        await client.send([release(key, g.reservation_id) for g in grants[3:]])
        results = await asyncio.gather(*(client.one(reserve(key)) for _ in range(100)))
        assert sum(isinstance(result, Granted) for result in results) == 3
        state = key_state(await client.one(query(key)))
        assert (state.committed_micros, state.reserved_micros) == (300_000, 3 * PRICE_MICROS)
    assert_never_over_cap([e for _, e in await logged_events(database, partition_of(TENANT))])


async def test_appends_failing_under_load_lose_no_grant_and_grant_nothing_twice(
    database_url: str, nats_url: str, client: LedgerClient, database: asyncpg.Connection[Any]
) -> None:
    """The ledger's database sessions are terminated again and again while concurrent
    reserves pour in: appends fail with requests decided on top of them. Every caller
    hears a decision that is in the log or an error, the state the ledger answers from
    afterwards equals the log, and the log never goes over the cap."""
    key = new_vault_key(TENANT)
    cap_micros = 300 * PRICE_MICROS
    rng = random.Random(20_261_207)
    async with running_ledger(database_url, nats_url):
        await client.one(issue(key, cap_micros=cap_micros))
        # Every append lasts at least 10 ms, so that the terminations below find appends
        # in the middle of their statement (an idle session is replaced unnoticed).
        await database.execute(
            "CREATE FUNCTION slow_append() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM pg_sleep(0.01); RETURN NULL; END $$;"
            " CREATE TRIGGER slow_append AFTER INSERT ON event_batches"
            " FOR EACH STATEMENT EXECUTE FUNCTION slow_append()"
        )
        loading = True

        async def terminate_sessions() -> int:
            terminated = 0
            while loading:
                terminated += await database.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND state = 'active' AND query LIKE 'WITH fenced%'"
                )
                await asyncio.sleep(0.02)
            return terminated

        async def reserve_in_a_row(task: int) -> list[AnyResult]:
            results: list[AnyResult] = []
            for call in range(40):
                commands = [
                    reserve(key, idempotency_key=f"task-{task}-{call}-{n}")
                    for n in range(rng.randint(1, 3))
                ]
                try:
                    results += await client.send(commands)
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    await asyncio.sleep(0.05)  # between owners: nothing was applied
            return results

        killer = asyncio.create_task(terminate_sessions())
        try:
            answered = await asyncio.gather(*(reserve_in_a_row(task) for task in range(16)))
        finally:
            loading = False
            terminated = await killer
        results = [result for results in answered for result in results]

        async def answers() -> bool:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                return isinstance(await client.one(query(key)), KeyState)
            return False

        await eventually(answers, "the ledger answering again")
        state = key_state(await client.one(query(key)))

    codes = Counter(
        result.code if isinstance(result, Failed) else type(result).__name__ for result in results
    )
    assert terminated > 0
    assert codes["store_unavailable"] > 0, codes  # appends did fail under load
    assert codes["Granted"] > 0, codes
    events = [event for _, event in await logged_events(database, partition_of(TENANT))]
    assert_never_over_cap(events)
    logged = {
        e.reservation_id: e.amount_micros for e in events if isinstance(e, ReservationGranted)
    }
    replied = [result.reservation_id for result in results if isinstance(result, Granted)]
    assert len(replied) == len(set(replied))
    assert set(replied) <= set(logged)
    # The state the ledger answers from is the log's: every logged hold, nothing else.
    assert (state.committed_micros, state.reserved_micros) == (0, sum(logged.values()))


async def test_restart_rebuilds_state_from_the_log(
    database_url: str, nats_url: str, client: LedgerClient, database: asyncpg.Connection[Any]
) -> None:
    key = new_vault_key(TENANT)
    async with running_ledger(database_url, nats_url):
        await client.one(issue(key))
        spent = granted(await client.one(reserve(key, 500_000, idempotency_key="a")))
        await client.one(commit(key, spent.reservation_id, 500_000))
        held = granted(await client.one(reserve(key, 300_000, idempotency_key="b")))
        seq_before = len(await logged_events(database, partition_of(TENANT)))

    async with running_ledger(database_url, nats_url) as ledger:
        assert ledger.owned_partitions == list(range(PARTITION_COUNT))
        denied = await client.one(reserve(key, 300_000))
        assert isinstance(denied, Denied), denied
        assert (denied.committed_micros, denied.reserved_micros) == (500_000, 300_000)
        # Idempotency survives the restart: the same key yields the same grant.
        replay = granted(await client.one(reserve(key, 500_000, idempotency_key="a")))
        assert replay == msgspec.structs.replace(spent, replayed=True, settled=True)
        # The open hold survived too, and can be settled.
        assert await client.one(commit(key, held.reservation_id, 200_000)) == Settled(
            held.reservation_id, 200_000, 100_000
        )
        granted(await client.one(reserve(key, 300_000)))
        denied_again = await client.one(reserve(key, 1))
        assert isinstance(denied_again, Denied)

    rows = await database.fetch(
        "SELECT seq, epoch FROM events WHERE partition = $1 ORDER BY seq", partition_of(TENANT)
    )
    assert [row["seq"] for row in rows] == list(range(1, len(rows) + 1))
    assert {row["epoch"] for row in rows if row["seq"] <= seq_before} == {1}
    assert {row["epoch"] for row in rows if row["seq"] > seq_before} == {2}


async def test_event_bytes_are_stored_exactly_also_beyond_ascii(
    database_url: str, nats_url: str, client: LedgerClient, database: asyncpg.Connection[Any]
) -> None:
    """Bodies travel to Postgres as UTF-8 text: what is stored must be the canonical bytes,
    byte for byte (the audit chain hashes them), whatever characters a label holds."""
    key = new_vault_key(TENANT)
    label = 'équipe-東京/run "42" \\ \t ✓'
    command = msgspec.structs.replace(issue(key), label=label)
    async with running_ledger(database_url, nats_url):
        assert isinstance(await client.one(command), KeyCreated)
        granted(await client.one(reserve(key, 1_000, idempotency_key="ключ\n")))
    rows = await database.fetch(
        "SELECT type, body FROM events WHERE partition = $1 ORDER BY seq", partition_of(TENANT)
    )
    events = [decode_event(bytes(row["body"])) for row in rows]
    assert [(row["type"], bytes(row["body"])) for row in rows] == [
        (type(event).__name__, encode_event(event)) for event in events
    ]
    assert isinstance(events[0], KeyIssued)
    assert events[0].label == label
    assert isinstance(events[1], ReservationGranted)
    assert events[1].idempotency_key == "ключ\n"
    async with running_ledger(database_url, nats_url):  # replayed from those bytes
        # Right after a restart the server may not route to the new subscription yet
        # (NoResponders, seen in 4 of 80 runs before this wait; callers retry such a
        # request within their deadline): ask until the replica answers.
        async def answers() -> bool:
            with contextlib.suppress(nats.errors.NoRespondersError):
                return isinstance(await client.one(query(key)), KeyState)
            return False

        await eventually(answers, "the restarted ledger answering")
        state = await client.one(QueryKey(tenant=TENANT, key_id=key.key_id))
        assert isinstance(state, KeyState)
        assert state.label == label


async def test_a_database_that_is_not_utf8_is_refused_at_start(
    database_url: str, nats_url: str, database: asyncpg.Connection[Any]
) -> None:
    await database.execute(
        "CREATE DATABASE ledger_latin1 ENCODING 'LATIN1' TEMPLATE template0"
        " LC_COLLATE 'C' LC_CTYPE 'C'"
    )
    latin1_url = database_url.rsplit("/", 1)[0] + "/ledger_latin1"
    with pytest.raises(DatabaseEncodingError, match="LATIN1"):
        async with running_ledger(latin1_url, nats_url):
            pass


async def test_a_partition_whose_log_was_edited_is_refused_at_start(
    database_url: str, nats_url: str, client: LedgerClient, database: asyncpg.Connection[Any]
) -> None:
    """A batch row that does not split into its seqs (edited outside the ledger): the
    replica refuses to serve from it, with the row named, rather than replay it."""
    key = new_vault_key(TENANT)
    async with running_ledger(database_url, nats_url):
        await client.one(issue(key))
        await client.one(reserve(key))
    partition = partition_of(TENANT)
    # One event more in the first row than its range holds.
    await database.execute(
        "UPDATE event_batches SET bodies = bodies || '\\x0a7b7d'::bytea,"
        " types = types || E'\\nKeyIssued' WHERE partition = $1 AND first_seq = 1",
        partition,
    )
    with pytest.raises(
        MalformedBatchError, match=f"partition {partition}: the event batch at seq 1"
    ):
        async with running_ledger(database_url, nats_url):
            pass


async def test_standby_takes_over_after_the_owner_is_killed(
    database_url: str, nats_url: str, client: LedgerClient, database: asyncpg.Connection[Any]
) -> None:
    # Both replicas are child processes; the conftest stops whatever is left at teardown.
    owner = await start_ledger_process(database_url, nats_url, "ledger-a")
    keys = [new_vault_key(TENANT), new_vault_key(OTHER_TENANT)]
    open_holds: dict[str, tuple[Granted, Granted]] = {}
    for key in keys:
        await client.one(issue(key))
        first, second, last = (granted(r) for r in await client.send([reserve(key)] * 3))
        await client.one(commit(key, first.reservation_id, PRICE_MICROS))
        # ``last`` is the last grant before the kill: it was replied, so it must survive.
        open_holds[key.key_id] = (second, last)
    # Every partition is ledger-a's, at epoch 1.
    owners = await database.fetch("SELECT owner, epoch FROM partition_leases")
    assert [(row["owner"], row["epoch"]) for row in owners] == [("ledger-a", 1)] * 8

    # The standby starts only now: a running owner hands a newcomer its fair share within
    # a lease round, and a request in that handover gets "no responders" (the gateway's
    # client retries those; this raw client does not). The kill follows at once, so the
    # standby takes most or all partitions by takeover, not by handover.
    standby = await start_ledger_process(database_url, nats_url, "ledger-b")
    assert "owns 0 partitions" in standby.logs()
    owner.kill()
    assert owner.returncode == -signal.SIGKILL

    async def standby_owns_everything() -> bool:
        rows = await database.fetch("SELECT owner FROM partition_leases")
        return all(row["owner"] == "ledger-b" for row in rows)

    took_s = await eventually(standby_owns_everything, "the takeover")
    # A lease expires at most one lease period after the last renewal, and the standby
    # looks every third of a lease; allow one more second for a loaded machine.
    assert took_s < LEASE_MS / 1000 * (1 + 1 / 3) + 1.0, took_s

    async def answered() -> bool:
        try:
            result = await client.one(query(keys[0]))
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return False
        return not (isinstance(result, Failed) and result.code == "not_owner")

    await eventually(answered, "the standby's first answer")
    for key in keys:
        state = key_state(await client.one(query(key)))
        assert (state.committed_micros, state.reserved_micros) == (PRICE_MICROS, 2 * PRICE_MICROS)
        for hold in open_holds[key.key_id]:
            settled = await client.one(commit(key, hold.reservation_id, PRICE_MICROS))
            assert settled == Settled(hold.reservation_id, PRICE_MICROS, 0)
        rest = CAP_MICROS - 3 * PRICE_MICROS
        assert isinstance(await client.one(reserve(key, rest + 1)), Denied)
        granted(await client.one(reserve(key, rest)))
        assert_never_over_cap(
            [e for _, e in await logged_events(database, partition_of(key.tenant))]
        )
    owners = await database.fetch("SELECT DISTINCT owner, epoch FROM partition_leases")
    assert [(row["owner"], row["epoch"]) for row in owners] == [("ledger-b", 2)]
    assert standby.terminate(10.0) == 0, standby.logs()


async def test_fenced_owner_writes_nothing_and_drops_the_partition(
    database_url: str, nats_url: str, client: LedgerClient, database: asyncpg.Connection[Any]
) -> None:
    key = new_vault_key(TENANT)
    partition = partition_of(TENANT)
    async with running_ledger(database_url, nats_url) as ledger:
        await client.one(issue(key))
        # Another replica takes the partition over behind this one's back.
        await database.execute(
            "UPDATE partition_leases SET owner = 'intruder', epoch = epoch + 1,"
            " expires_at = now() + interval '1 hour' WHERE partition = $1",
            partition,
        )
        result = await client.one(reserve(key))
        assert isinstance(result, Failed), result
        assert result.code == "not_owner"
        assert len(await logged_events(database, partition)) == 1

        async def dropped() -> bool:
            return partition not in ledger.owned_partitions

        await eventually(dropped, "the fenced partition to be dropped", timeout_s=LEASE_MS / 100)
        assert ledger.owned_partitions == [p for p in range(PARTITION_COUNT) if p != partition]
        other = new_vault_key(OTHER_TENANT)
        assert isinstance(await client.one(issue(other)), KeyCreated)


_WRONG_PARTITION = (
    b'{"partition": 1, "commands": [{"type": "QueryKey", "tenant": "a", "key_id": "k"}]}'
)
_TOO_MANY = encode_batch(CommandBatch(0, [QueryKey("acme", "k")] * (COMMANDS_PER_REQUEST_MAX + 1)))
MALFORMED_REQUESTS = {
    "empty": (b"", 1),
    "not-json": (b"not json", 1),
    "unknown-command": (b'{"partition": 0, "commands": [{"type": "Spend", "tenant": "acme"}]}', 1),
    "unknown-field": (b'{"partition": 0, "commands": [], "extra": true}', 1),
    "no-commands": (b'{"partition": 0, "commands": []}', 1),
    "wrong-partition": (_WRONG_PARTITION, 1),
    "too-many-commands": (_TOO_MANY, COMMANDS_PER_REQUEST_MAX + 1),
}


@pytest.mark.parametrize(
    ("data", "count"), list(MALFORMED_REQUESTS.values()), ids=list(MALFORMED_REQUESTS)
)
async def test_malformed_request_is_refused_not_a_crash(
    database_url: str, nats_url: str, client: LedgerClient, data: bytes, count: int
) -> None:
    key = new_vault_key(TENANT)
    assert partition_of(TENANT) == 0
    async with running_ledger(database_url, nats_url):
        results = await client.request_raw(0, data)
        assert len(results) == count
        for result in results:
            assert isinstance(result, Failed), result
            assert result.code == "malformed_request"
        # A message without a reply subject is dropped quietly.
        await client.connection.publish(ledger_command_subject(0), data)
        # The partition still serves.
        assert isinstance(await client.one(issue(key)), KeyCreated)


async def test_an_unexpected_timezone_does_not_kill_the_partition(
    database_url: str, nats_url: str, client: LedgerClient
) -> None:
    key = new_vault_key(TENANT)
    async with running_ledger(database_url, nats_url):
        poisoned = msgspec.structs.replace(issue(key), timezone="America")
        batch = encode_batch(CommandBatch(partition_of(TENANT), [poisoned]))
        [result] = await client.request_raw(partition_of(TENANT), batch, timeout_s=1.0)
        assert isinstance(result, Failed)
        assert result.code == "invalid_timezone"
        assert isinstance(await client.one(issue(key)), KeyCreated)


class SlowLink:
    """A loopback TCP proxy that delays every byte by ``delay_s`` each way (a slow network)."""

    def __init__(self, upstream_url: str, delay_s: float) -> None:
        parts = urlsplit(upstream_url)
        assert parts.hostname is not None
        assert parts.port is not None
        self._upstream = (parts.hostname, parts.port)
        self._delay_s = delay_s
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        # Bytes keep their order and each is held back for delay_s: latency, not throughput.
        in_flight: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=1_000)
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while True:
                due, data = await in_flight.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:  # the source closed: close the sink after what came before
                    return
                sink.write(data)
                await sink.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while data := await source.read(65_536):
                await in_flight.put((loop.time() + self._delay_s, data))
            await in_flight.put((loop.time() + self._delay_s, b""))
            await delivering
        finally:
            delivering.cancel()
            sink.close()


async def test_partitions_are_served_as_soon_as_start_returns(
    database_url: str, nats_url: str, client: LedgerClient
) -> None:
    link = SlowLink(nats_url, delay_s=0.1)
    slow_nats_url = await link.start()
    settings = LedgerSettings.from_env(Env(ledger_env(database_url, slow_nats_url)))
    service = LedgerService(settings)
    try:
        await service.start()
        result = await client.one(query(new_vault_key(TENANT)))
        assert isinstance(result, Failed)
        assert result.code == "key_not_found"
    finally:
        await service.stop()
        await link.close()


async def test_unreachable_postgres_fails_start_within_the_connect_deadline(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_service_module, "CONNECT_DEADLINE", timedelta(seconds=1))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # nothing listens once the socket is closed
    url = f"postgresql://postgres@127.0.0.1:{closed_port}/spendgate"
    service = LedgerService(LedgerSettings.from_env(Env(ledger_env(url, nats_url))))
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="connect"):
        await service.start()
    elapsed = time.monotonic() - started
    assert 0.5 < elapsed < 2.5, elapsed  # it retried, and gave up at the deadline
    assert service.owned_partitions == []
    await service.stop()


async def test_cli_refuses_to_start_without_a_database_url(nats_url: str) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "SPENDGATE_NATS_URL": nats_url}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spendgate_ledger",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 1
    assert b"SPENDGATE_DATABASE_URL" in stderr
    assert b"configuration error" in stderr
