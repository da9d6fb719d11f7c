"""Snapshots: a restored state equals the live one, and recovery after kill -9 uses one.

The pure half builds a state with every kind of record (keys with fleet labels and
allow-lists, revoked keys, open and closed budgets of each scope, open holds, settled
reservations, remembered idempotency answers, overruns) and checks that the snapshot
round trip is exact, and that the restored state goes on deciding exactly like the live
one. The service half kills a ledger process with SIGKILL after it wrote snapshots and
checks that a new replica recovers from a snapshot plus the log's tail to the same state.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import zlib
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import pytest

from spendgate_common.ledger_v1 import (
    AnyCommand,
    AnyResult,
    CloseBudget,
    CommandBatch,
    Commit,
    CreateBudget,
    Failed,
    IssueKey,
    QueryBudget,
    QueryKey,
    Release,
    Reserve,
    RevokeKey,
    decode_result_batch,
    encode_batch,
)
from spendgate_common.partitioning import partition_for_tenant
from spendgate_common.subjects import ledger_command_subject
from spendgate_common.vault_keys import VaultKey, new_vault_key
from spendgate_ledger._partition import SNAPSHOT_SPACING_MIN
from spendgate_ledger._snapshot import (
    SettledV1,
    SnapshotChildError,
    SnapshotV1,
    decode_snapshot,
    encode_snapshot,
    fork_save_snapshot,
)
from spendgate_ledger._state import PartitionState, Sweep
from tests.harness import ServiceFactory

PARTITION_COUNT = 8
TENANT = "acme"
PARTITION = partition_for_tenant(TENANT, PARTITION_COUNT)
NOW_MS = 1_741_622_400_000
EXPIRES_MS = NOW_MS + 30 * 86_400_000


def fresh() -> PartitionState:
    return PartitionState(PARTITION, PARTITION_COUNT, 60_000, retention_ms=3_600_000)


def issue(key: VaultKey, label: str, cap: int, **extra: Any) -> IssueKey:
    return IssueKey(
        tenant=key.tenant,
        key_id=key.key_id,
        label=label,
        secret_sha256=key.secret_sha256,
        cap_micros=cap,
        window=extra.pop("window", "total"),
        timezone=extra.pop("timezone", "UTC"),
        expires_at_ms=extra.pop("expires_at_ms", EXPIRES_MS),
        **extra,
    )


def reserve(key: VaultKey, amount: int, vendor: str = "openai", **extra: Any) -> Reserve:
    return Reserve(
        tenant=key.tenant,
        key_id=key.key_id,
        secret_sha256=key.secret_sha256,
        amount_micros=amount,
        vendor=vendor,
        operation="POST /v1/chat/completions",
        **extra,
    )


def commit(key: VaultKey, reservation_id: str, actual: int) -> Commit:
    return Commit(key.tenant, key.key_id, key.secret_sha256, reservation_id, actual)


def release(key: VaultKey, reservation_id: str) -> Release:
    return Release(key.tenant, key.key_id, key.secret_sha256, reservation_id, "free")


def run(state: PartitionState, command: AnyCommand | Sweep, now_ms: int) -> AnyResult:
    decision = state.decide(command, now_ms)
    for event in decision.events:
        state.apply(state.last_seq + 1, event)
    return decision.result


def rich_state() -> tuple[PartitionState, list[VaultKey]]:
    """A state with one of everything, built through decide/apply."""
    state = fresh()
    keys = [new_vault_key(TENANT) for _ in range(3)]
    now = NOW_MS
    commands: list[AnyCommand] = [
        issue(keys[0], "fleet-a/run-1", 5_000_000, window="daily", timezone="America/New_York"),
        issue(keys[1], "run-2", 2_000_000, fleet_labels=["fleet-a/extra"]),
        issue(keys[2], "fleet-b/run-3", 1_000_000, allowed_vendors=["stripe"]),
        CreateBudget(TENANT, "fleet-a", "fleet", "fleet-a", 3_000_000, "monthly", "Asia/Kolkata"),
        CreateBudget(TENANT, "openai-daily", "vendor", "openai", 2_500_000, "daily", "UTC"),
        CreateBudget(TENANT, "tenant-total", "tenant", "", 9_000_000, "total", "UTC"),
        CreateBudget(TENANT, "closed-one", "fleet", "fleet-b", 100, "total", "UTC"),
        CloseBudget(TENANT, "closed-one"),
    ]
    for command in commands:
        run(state, command, now)
    granted = []
    for index in range(12):
        now += 1_000
        result = run(state, reserve(keys[index % 2], 150_000, idempotency_key=f"idem-{index}"), now)
        granted.append(result)
    run(state, reserve(keys[2], 100_000, vendor="stripe"), now)
    reservation_ids = [r.reservation_id for r in granted if hasattr(r, "reservation_id")]
    run(state, commit(keys[0], reservation_ids[0], 100_000), now + 1)
    run(state, commit(keys[1], reservation_ids[1], 400_000), now + 2)  # an overrun
    run(state, release(keys[0], reservation_ids[2]), now + 3)
    run(state, RevokeKey(TENANT, keys[2].key_id, "leaked"), now + 4)
    # A short hold that the sweep settles as expired.
    run(state, reserve(keys[0], 10_000, hold_ms=5), now + 5)
    run(state, Sweep(), now + 1_000)
    return state, keys


def test_snapshot_round_trip_is_exact() -> None:
    state, _ = rich_state()
    assert state.holds
    assert state.settled
    assert state.idempotency
    restored = decode_snapshot(encode_snapshot(state), fresh())
    assert restored == state


def test_restored_state_decides_like_the_live_one() -> None:
    live, keys = rich_state()
    restored = decode_snapshot(encode_snapshot(live), fresh())
    now = live.last_at_ms + 10
    follow_up: list[AnyCommand | Sweep] = [
        reserve(keys[0], 150_000, idempotency_key="idem-0"),  # replayed answer
        reserve(keys[0], 2_000_000),  # denied by a budget
        reserve(keys[1], 100_000),
        reserve(keys[2], 1, vendor="stripe"),  # revoked
        Sweep(),
        QueryBudget(TENANT, "fleet-a"),
        QueryKey(TENANT, keys[1].key_id),
        commit(keys[0], next(iter(live.holds)), 1),
    ]
    for command in follow_up:
        live_decision = live.decide(command, now)
        restored_decision = restored.decide(command, now)
        assert restored_decision == live_decision, command
        for event in live_decision.events:
            live.apply(live.last_seq + 1, event)
            restored.apply(restored.last_seq + 1, event)
        now += 10
    assert restored == live


def test_a_snapshot_of_another_partition_or_garbage_is_refused() -> None:
    state, _ = rich_state()
    other = PartitionState((PARTITION + 1) % PARTITION_COUNT, PARTITION_COUNT, 60_000)
    with pytest.raises(ValueError, match="partition"):
        decode_snapshot(encode_snapshot(state), other)
    with pytest.raises(msgspec.DecodeError):
        decode_snapshot(b"\x00not a snapshot", fresh())
    # Compressed, but cut short (a torn write): refused, so recovery replays instead.
    body = encode_snapshot(state)
    with pytest.raises(ValueError, match="decompress"):
        decode_snapshot(body[: len(body) // 2], fresh())


def test_snapshots_are_stored_compressed_and_uncompressed_ones_still_load() -> None:
    state, _ = rich_state()
    body = encode_snapshot(state)
    assert body.startswith(b"SGZ\x01")
    # Snapshots written before compression were the msgpack alone.
    plain = zlib.decompress(body[4:])
    assert plain[0] in (*range(0x80, 0x90), 0xDE, 0xDF), "a msgpack map"
    assert decode_snapshot(plain, fresh()) == state
    assert decode_snapshot(body, fresh()) == state


def test_settled_ids_are_stored_as_columns_and_version_1_snapshots_still_load() -> None:
    state, _ = rich_state()
    snapshot = msgspec.msgpack.decode(zlib.decompress(encode_snapshot(state)[4:]), type=SnapshotV1)
    assert (snapshot.version, snapshot.settled) == (2, [])
    assert len(snapshot.settled_seqs) == 8 * len(state.settled)
    # Version 1 listed every settled id, and had no columns.
    version_1 = msgspec.structs.replace(
        snapshot,
        version=1,
        settled=[SettledV1(*entry) for entry in state.settled.entries()],
        settled_times=b"",
        settled_seqs=b"",
        settled_chunks=[],
    )
    restored = decode_snapshot(msgspec.msgpack.encode(version_1), fresh())
    assert restored == state
    assert restored.settled.get(next(state.settled.entries())[1]) is not None
    version_3 = msgspec.structs.replace(snapshot, version=3)
    with pytest.raises(ValueError, match="v3"):
        decode_snapshot(msgspec.msgpack.encode(version_3), fresh())


# ------------------------------------------------------------------ service: kill -9


async def test_the_snapshot_child_stores_the_state_as_it_was_at_the_fork(tmp_path: Path) -> None:
    state, keys = rich_state()
    expected = encode_snapshot(state)
    parent = os.getpid()
    stored = tmp_path / "snapshot"

    async def save(body: bytes) -> None:
        # Runs in the child, on the child's own event loop.
        assert os.getpid() != parent
        await asyncio.sleep(0)
        stored.write_bytes(body)

    saving = fork_save_snapshot(state, save)
    # The parent's state moves on at once; the child keeps the image of the fork.
    run(state, reserve(keys[0], 1_000), NOW_MS + 1_000)
    await saving
    assert stored.read_bytes() == expected
    assert encode_snapshot(state) != expected


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policy")
async def test_the_snapshot_child_runs_only_on_idle_cpu(tmp_path: Path) -> None:
    state, _ = rich_state()
    seen = tmp_path / "priority"

    async def save(body: bytes) -> None:
        # Runs in the child: what the scheduler was told about it.
        seen.write_text(f"{os.sched_getscheduler(0)} {os.nice(0)}")

    await fork_save_snapshot(state, save)
    policy, niceness = map(int, seen.read_text().split())
    assert niceness == 19
    assert policy == os.SCHED_IDLE
    # The parent keeps its own.
    assert os.sched_getscheduler(0) != os.SCHED_IDLE


async def test_a_failed_snapshot_child_is_reported() -> None:
    state, _ = rich_state()

    async def save(body: bytes) -> None:
        raise OSError("disk full")

    with pytest.raises(SnapshotChildError, match="exited with status"):
        await fork_save_snapshot(state, save)


async def send(nats_url: str, commands: list[AnyCommand]) -> list[AnyResult]:
    connection = await nats.connect(nats_url)
    try:
        reply = await connection.request(
            ledger_command_subject(PARTITION),
            encode_batch(CommandBatch(PARTITION, commands)),
            timeout=10,
        )
    finally:
        await connection.close()
    return decode_result_batch(reply.data).results


def ledger_env(database_url: str, nats_url: str, **settings: str) -> dict[str, str]:
    """A ledger's environment for these tests: the harness's services, and ``settings``."""
    return {
        "SPENDGATE_DATABASE_URL": database_url,
        "SPENDGATE_NATS_URL": nats_url,
        "SPENDGATE_PARTITION_COUNT": str(PARTITION_COUNT),
        **settings,
    }


async def test_recovery_after_kill_uses_a_snapshot_and_equals_the_state_before(
    database_url: str, nats_url: str, service_factory: ServiceFactory
) -> None:
    env = ledger_env(
        database_url,
        nats_url,
        SPENDGATE_LEDGER_LEASE_MS="1000",
        SPENDGATE_LEDGER_SNAPSHOT_EVERY_EVENTS="40",
    )
    ledger = service_factory("ledger", env)
    key = new_vault_key(TENANT)
    budget = CreateBudget(TENANT, "fleet-x", "fleet", "fleet-x", 50_000_000, "daily", "UTC")
    expires_at_ms = time.time_ns() // 1_000_000 + 86_400_000
    created = await send(
        nats_url, [issue(key, "fleet-x/run", 40_000_000, expires_at_ms=expires_at_ms), budget]
    )
    assert not any(isinstance(result, Failed) for result in created), created
    for round_number in range(10):
        batch: list[AnyCommand] = [
            reserve(key, 10_000, idempotency_key=f"r{round_number}-{i}") for i in range(20)
        ]
        results = await send(nats_url, batch)
        ids = [r.reservation_id for r in results if hasattr(r, "reservation_id")]
        assert len(ids) == 20, results[:2]
        await send(nats_url, [commit(key, rid, 7_000) for rid in ids[:10]])
    before = await send(nats_url, [QueryKey(TENANT, key.key_id), QueryBudget(TENANT, "fleet-x")])

    async def snapshots() -> int:
        connection = await asyncpg.connect(database_url)
        try:
            return int(await connection.fetchval("SELECT count(*) FROM snapshots") or 0)
        finally:
            await connection.close()

    for _ in range(100):
        if await snapshots():
            break
        await asyncio.sleep(0.05)
    assert await snapshots() > 0

    ledger.kill()
    assert ledger.returncode == -signal.SIGKILL
    successor = service_factory("ledger", env)
    marker = f"partition {PARTITION}: recovered"
    # The successor takes the partitions over once the killed owner's 1 s leases expire.
    for _ in range(200):
        if marker in successor.logs():
            break
        await asyncio.sleep(0.05)
    recovery_lines = [line for line in successor.logs().splitlines() if marker in line]
    assert recovery_lines
    assert "(snapshot 0 +" not in recovery_lines[-1], recovery_lines[-1]
    after = await send(nats_url, [QueryKey(TENANT, key.key_id), QueryBudget(TENANT, "fleet-x")])
    assert after == before
    # The recovered replica remembers idempotency answers given before the kill.
    replay = await send(nats_url, [reserve(key, 10_000, idempotency_key="r0-0")])
    assert getattr(replay[0], "replayed", False) is True


async def test_a_partition_snapshots_at_most_once_per_spacing_and_when_idle_after_it(
    database_url: str, nats_url: str, service_factory: ServiceFactory
) -> None:
    # A snapshot would be due after every batch; the spacing lets one through. Once the
    # spacing has passed, the idle partition takes the one it held back.
    env = ledger_env(database_url, nats_url, SPENDGATE_LEDGER_SNAPSHOT_EVERY_EVENTS="1")
    ledger = service_factory("ledger", env)
    key = new_vault_key(TENANT)
    expires_at_ms = time.time_ns() // 1_000_000 + 86_400_000
    issued = await send(
        nats_url, [issue(key, "fleet-x/run", 40_000_000, expires_at_ms=expires_at_ms)]
    )
    assert not any(isinstance(result, Failed) for result in issued), issued
    stored = f"partition {PARTITION}: snapshot at"
    for _ in range(100):
        if stored in ledger.logs():
            break
        await asyncio.sleep(0.05)
    for round_number in range(6):
        results = await send(nats_url, [reserve(key, 10_000, idempotency_key=f"s{round_number}")])
        assert not any(isinstance(result, Failed) for result in results), results
        await asyncio.sleep(0.2)
    assert SNAPSHOT_SPACING_MIN.total_seconds() > 2
    assert ledger.logs().count(stored) == 1, ledger.logs()
    deadline = time.monotonic() + SNAPSHOT_SPACING_MIN.total_seconds() + 10
    while ledger.logs().count(stored) < 2:
        assert time.monotonic() < deadline, ledger.logs()
        await asyncio.sleep(0.1)
    seqs = [int(seq) for seq in re.findall(rf"{stored} (\d+) stored", ledger.logs())]
    connection = await asyncpg.connect(database_url)
    try:
        last_seq = await connection.fetchval(
            "SELECT last_seq FROM partition_leases WHERE partition = $1", PARTITION
        )
    finally:
        await connection.close()
    # The idle partition's snapshot holds its whole log: nothing to replay.
    assert seqs[0] < seqs[1] == last_seq, (seqs, last_seq)
