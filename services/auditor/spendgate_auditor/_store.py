"""Postgres side of the auditor: chain one batch in one transaction.

The head row of a partition (``audit_heads``) is both the chain's last link and the
auditor's consumer position. It is locked, read, advanced and written in the same
transaction as the ``audit_chain`` rows it covers, so a batch takes effect entirely or not
at all, and a redelivered event finds its seq already covered (exactly once). The
``(partition, seq)`` primary key of ``audit_chain`` refuses a second link for one seq
again, and the head update checks the head it locked is still the one it read.

Every method translates asyncpg's "unavailable" errors into ``StoreUnavailableError``
(:func:`_translate_errors`); constraint violations are not translated (a broken
invariant must crash).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from spendgate_auditor._chain import GENESIS_LINK, ChainHead
from spendgate_auditor._plan import (
    BatchPlan,
    Delivery,
    conflicting_duplicates,
    links_needed,
    plan_batch,
)
from spendgate_common.pg import translate_errors

if TYPE_CHECKING:
    from typing import Any

    from asyncpg.pool import PoolConnectionProxy

    Connection = PoolConnectionProxy[Any]


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """A committed batch: what it did, and the duplicates whose bytes differ (alarms)."""

    plan: BatchPlan
    conflicts: list[Delivery]


class AuditStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def chain(self, deliveries: Sequence[Delivery]) -> BatchOutcome:
        """Chain ``deliveries`` in one transaction; returns after the commit.

        Raises ``StoreUnavailableError`` when Postgres fails; the batch then may or may
        not have committed, and its redelivery is recognised as duplicates if it did.
        """
        assert deliveries
        partitions = sorted({delivery.partition for delivery in deliveries})
        async with (
            translate_errors("chain events"),
            self._pool.acquire() as connection,
            connection.transaction(),
        ):
            heads = await _lock_heads(connection, partitions)
            plan = plan_batch(heads, deliveries)
            stored = await _read_links(connection, links_needed(plan))
            conflicts = conflicting_duplicates(plan, stored)
            if plan.links:
                await _append(connection, plan, heads)
        return BatchOutcome(plan, conflicts)


async def _lock_heads(connection: Connection, partitions: list[int]) -> dict[int, ChainHead]:
    """Lock and read the heads of ``partitions`` (sorted), creating missing ones at genesis.

    A missing head is inserted (``ON CONFLICT DO NOTHING``, which waits for a concurrent
    inserter) and then locked like the others, so two auditors never both start a chain.
    Locking in partition order keeps concurrent batches free of deadlocks.
    """
    query = (
        "SELECT partition, seq, link FROM audit_heads WHERE partition = ANY($1::int[])"
        " ORDER BY partition FOR UPDATE"
    )
    rows = await connection.fetch(query, partitions)
    missing = sorted(set(partitions) - {row["partition"] for row in rows})
    if missing:
        await connection.execute(
            "INSERT INTO audit_heads (partition, seq, link)"
            " SELECT partition, 0, $2 FROM unnest($1::int[]) AS partition"
            " ON CONFLICT DO NOTHING",
            missing,
            GENESIS_LINK,
        )
        rows = [*rows, *await connection.fetch(query, missing)]
    heads = {row["partition"]: ChainHead(row["partition"], row["seq"], row["link"]) for row in rows}
    assert sorted(heads) == partitions, (sorted(heads), partitions)
    return heads


async def _read_links(
    connection: Connection, keys: list[tuple[int, int]]
) -> dict[tuple[int, int], bytes]:
    if not keys:
        return {}
    rows = await connection.fetch(
        "SELECT c.partition, c.seq, c.link FROM audit_chain AS c"
        " JOIN unnest($1::int[], $2::bigint[]) AS k(partition, seq)"
        " ON c.partition = k.partition AND c.seq = k.seq",
        [partition for partition, _ in keys],
        [seq for _, seq in keys],
    )
    return {(row["partition"], row["seq"]): bytes(row["link"]) for row in rows}


async def _append(connection: Connection, plan: BatchPlan, before: dict[int, ChainHead]) -> None:
    await connection.execute(
        "INSERT INTO audit_chain (partition, seq, link)"
        " SELECT * FROM unnest($1::int[], $2::bigint[], $3::bytea[])",
        [row.partition for row in plan.links],
        [row.seq for row in plan.links],
        [row.link for row in plan.links],
    )
    advanced = sorted(plan.heads)
    status = await connection.execute(
        "UPDATE audit_heads AS h SET seq = n.seq, link = n.link, updated_at = now()"
        " FROM unnest($1::int[], $2::bigint[], $3::bytea[], $4::bigint[])"
        "   AS n(partition, seq, link, previous_seq)"
        " WHERE h.partition = n.partition AND h.seq = n.previous_seq",
        advanced,
        [plan.heads[partition].seq for partition in advanced],
        [plan.heads[partition].link for partition in advanced],
        [before[partition].seq for partition in advanced],
    )
    # The heads are locked by this transaction, so each must still be the one we read.
    assert status == f"UPDATE {len(advanced)}", status
