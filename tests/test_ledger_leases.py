"""Partition ownership among ledger replicas: fair shares, graceful handover, fencing.

Real ledger processes share 8 partitions through Postgres leases. A second replica gets
half of them without anyone restarting; SIGTERM hands a replica's partitions over at
once (it gives its leases up); every command that was answered is in the log and every
partition has exactly one owner at a time (the epochs in the log only grow).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import asyncpg
import nats
import pytest

from spendgate_common.ledger_v1 import (
    AnyResult,
    CommandBatch,
    Failed,
    IssueKey,
    decode_result_batch,
    encode_batch,
)
from spendgate_common.partitioning import partition_for_tenant
from spendgate_common.subjects import ledger_command_subject
from spendgate_common.vault_keys import new_vault_key
from spendgate_ledger._replicas import fair_share
from tests.harness import ServiceFactory

PARTITION_COUNT = 8
LEASE_MS = 1_000


def test_fair_share() -> None:
    assert fair_share(64, 1) == 64
    assert fair_share(64, 3) == 22
    assert fair_share(8, 2) == 4
    assert fair_share(8, 0) == 8
    assert fair_share(1, 5) == 1


async def owners(database_url: str) -> Counter[str]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT owner FROM partition_leases WHERE owner IS NOT NULL AND expires_at > now()"
        )
    finally:
        await connection.close()
    return Counter(row["owner"] for row in rows)


async def eventually_owned(database_url: str, expected: dict[str, int], timeout_s: float) -> float:
    started = time.monotonic()
    while True:
        current = dict(await owners(database_url))
        if current == expected:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"ownership {current}, expected {expected}")
        await asyncio.sleep(0.05)


async def issue_everywhere(nats_url: str, rounds: int) -> list[AnyResult]:
    """Issue keys in tenants spread over every partition, retrying refusals (takeovers)."""
    tenants = [f"tenant-{index}" for index in range(40)]
    answered: list[AnyResult] = []
    connection = await nats.connect(nats_url)
    try:
        for _ in range(rounds):
            for tenant in tenants:
                partition = partition_for_tenant(tenant, PARTITION_COUNT)
                key = new_vault_key(tenant)
                command = IssueKey(
                    tenant=tenant,
                    key_id=key.key_id,
                    label="run",
                    secret_sha256=key.secret_sha256,
                    cap_micros=1_000_000,
                    window="total",
                    timezone="UTC",
                    expires_at_ms=time.time_ns() // 1_000_000 + 86_400_000,
                )
                payload = encode_batch(CommandBatch(partition, [command]))
                for _attempt in range(100):
                    try:
                        reply = await connection.request(
                            ledger_command_subject(partition), payload, timeout=2
                        )
                    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                        await asyncio.sleep(0.05)
                        continue
                    result = decode_result_batch(reply.data).results[0]
                    if isinstance(result, Failed) and result.code in ("not_owner", "overloaded"):
                        await asyncio.sleep(0.05)
                        continue
                    answered.append(result)
                    break
    finally:
        await connection.close()
    return answered


async def test_replicas_share_partitions_and_hand_them_over_on_sigterm(
    database_url: str, nats_url: str, service_factory: ServiceFactory
) -> None:
    env: dict[str, Any] = {
        "SPENDGATE_DATABASE_URL": database_url,
        "SPENDGATE_NATS_URL": nats_url,
        "SPENDGATE_PARTITION_COUNT": str(PARTITION_COUNT),
        "SPENDGATE_LEDGER_LEASE_MS": str(LEASE_MS),
    }
    first = service_factory("ledger", {**env, "SPENDGATE_LEDGER_OWNER_ID": "ledger-a"})
    await eventually_owned(database_url, {"ledger-a": 8}, timeout_s=5)
    load = asyncio.create_task(issue_everywhere(nats_url, rounds=6))
    second = service_factory("ledger", {**env, "SPENDGATE_LEDGER_OWNER_ID": "ledger-b"})
    # The first replica hands its surplus over; the second claims it: 4 and 4.
    await eventually_owned(database_url, {"ledger-a": 4, "ledger-b": 4}, timeout_s=10)
    assert first.terminate(15.0) == 0, first.logs()
    # Given up on SIGTERM, not left to expire: the takeover takes at most one round.
    took_s = await eventually_owned(database_url, {"ledger-b": 8}, timeout_s=10)
    assert took_s < LEASE_MS / 1000, took_s
    answered = await load
    assert len(answered) == 6 * 40
    assert not [result for result in answered if isinstance(result, Failed)], answered[:3]

    connection = await asyncpg.connect(database_url)
    try:
        issued = await connection.fetchval("SELECT count(*) FROM events WHERE type = 'KeyIssued'")
        rows = await connection.fetch("SELECT partition, seq, epoch FROM events ORDER BY 1, 2")
    finally:
        await connection.close()
    # Every answered command is in the log, and the log is one owner after another.
    assert issued == len(answered)
    by_partition: dict[int, list[tuple[int, int]]] = {}
    for row in rows:
        by_partition.setdefault(row["partition"], []).append((row["seq"], row["epoch"]))
    for entries in by_partition.values():
        assert [seq for seq, _ in entries] == list(range(1, len(entries) + 1))
        epochs = [epoch for _, epoch in entries]
        assert epochs == sorted(epochs)
    assert second.terminate(15.0) == 0, second.logs()
