"""The gateway's ledger client against a real NATS: lingering settles ride along.

A stand-in ledger (a NATS responder on the partition's subject) records every request it
gets and answers each command; the client under test is the gateway's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from spendgate_common.errors import LedgerUnavailableError
from spendgate_common.ledger_v1 import (
    AnyCommand,
    AnyResult,
    Commit,
    Failed,
    Reserve,
    ResultBatch,
    decode_command_batch,
    encode_batch,
)
from spendgate_common.partitioning import partition_for_tenant
from spendgate_common.subjects import ledger_command_subject
from spendgate_common.vault_keys import new_vault_key
from spendgate_gateway._ledger_client import LedgerClient

PARTITION_COUNT = 8
TENANT = "acme"
PARTITION = partition_for_tenant(TENANT, PARTITION_COUNT)
KEY = new_vault_key(TENANT)
LONG_LINGER = timedelta(seconds=30)
SHORT_LINGER = timedelta(milliseconds=50)
DEADLINE_S = 5.0


def _reserve() -> Reserve:
    return Reserve(
        tenant=TENANT,
        key_id=KEY.key_id,
        secret_sha256=KEY.secret_sha256,
        amount_micros=1_000,
        vendor="openai",
        operation="POST /v1/chat/completions",
    )


def _commit(reservation_id: str) -> Commit:
    return Commit(
        tenant=TENANT,
        key_id=KEY.key_id,
        secret_sha256=KEY.secret_sha256,
        reservation_id=reservation_id,
        actual_micros=1_000,
    )


@pytest.fixture
async def requests_seen(nats_url: str) -> AsyncIterator[list[list[AnyCommand]]]:
    """What the stand-in ledger received: the commands of each request, in order."""
    seen: list[list[AnyCommand]] = []
    connection = await nats.connect(nats_url)

    async def answer(message: Msg) -> None:
        commands = decode_command_batch(message.data).commands
        seen.append(list(commands))
        answers: list[AnyResult] = [
            Failed("recorded", type(command).__name__) for command in commands
        ]
        await message.respond(encode_batch(ResultBatch(answers)))

    await connection.subscribe(ledger_command_subject(PARTITION), cb=answer)
    await connection.flush()
    try:
        yield seen
    finally:
        await connection.close()


async def _client(nats_url: str, linger: timedelta) -> tuple[NatsClient, LedgerClient]:
    connection = await nats.connect(nats_url)
    client = LedgerClient(
        connection,
        partition_count=PARTITION_COUNT,
        timeout=timedelta(seconds=DEADLINE_S),
        inflight_max=4,
        linger=linger,
    )
    return connection, client


async def test_a_lingering_settle_rides_along_with_the_next_command(
    nats_url: str, requests_seen: list[list[AnyCommand]]
) -> None:
    connection, client = await _client(nats_url, LONG_LINGER)
    try:
        settle = asyncio.create_task(client.execute(_commit("res_1"), linger=True))
        await asyncio.sleep(0.1)
        assert requests_seen == []  # still lingering: nothing was sent
        async with asyncio.timeout(DEADLINE_S):
            reserved = await client.execute(_reserve())
            settled = await settle
        # One request: the settle first (it frees budget), then the reserve.
        assert [[type(c).__name__ for c in commands] for commands in requests_seen] == [
            ["Commit", "Reserve"]
        ]
        assert reserved == Failed("recorded", "Reserve")
        assert settled == Failed("recorded", "Commit")
    finally:
        await client.close()
        await connection.close()


async def test_a_lingering_settle_leaves_alone_after_the_linger(
    nats_url: str, requests_seen: list[list[AnyCommand]]
) -> None:
    connection, client = await _client(nats_url, SHORT_LINGER)
    try:
        async with asyncio.timeout(DEADLINE_S):
            settled = await client.execute(_commit("res_2"), linger=True)
        assert settled == Failed("recorded", "Commit")
        assert [len(commands) for commands in requests_seen] == [1]
    finally:
        await client.close()
        await connection.close()


async def test_without_a_linger_a_settle_is_sent_at_once(
    nats_url: str, requests_seen: list[list[AnyCommand]]
) -> None:
    connection, client = await _client(nats_url, timedelta(0))
    try:
        async with asyncio.timeout(SHORT_LINGER.total_seconds() * 10):
            settled = await client.execute(_commit("res_3"), linger=True)
        assert settled == Failed("recorded", "Commit")
        assert [len(commands) for commands in requests_seen] == [1]
    finally:
        await client.close()
        await connection.close()


async def test_closing_fails_a_lingering_settle_instead_of_leaving_it_waiting(
    nats_url: str, requests_seen: list[list[AnyCommand]]
) -> None:
    connection, client = await _client(nats_url, LONG_LINGER)
    try:
        settle = asyncio.create_task(client.execute(_commit("res_4"), linger=True))
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(LedgerUnavailableError, match="shutting down"):
            async with asyncio.timeout(DEADLINE_S):
                await settle
        assert requests_seen == []
    finally:
        await connection.close()


def test_remembered_partitions_stay_those_of_the_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("spendgate_gateway._ledger_client.PARTITIONS_REMEMBERED_MAX", 8)
    client = LedgerClient(
        NatsClient(), partition_count=64, timeout=timedelta(seconds=1), inflight_max=2
    )
    tenants = [f"tenant-{index}" for index in range(20)]
    # Twice over, past the bound: the remembered map is emptied, never wrong.
    for tenant in tenants + tenants:
        assert client.partition_of(tenant) == partition_for_tenant(tenant, 64)
