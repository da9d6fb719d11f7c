"""Postgres side of the auditor: chain, sign, roll up one batch in one transaction.

The head row of a partition (``audit_heads``) is both the chain's last link and the
auditor's consumer position. It is locked, read, advanced and written in the same
transaction as the ``audit_chain`` rows it covers and as everything derived from those
events (checkpoints, decisions, rollups, the finance outbox), so a batch takes effect
entirely or not at all, and a redelivered event finds its seq already covered (exactly
once). The ``(partition, seq)`` primary key of ``audit_chain`` refuses a second link for
one seq again, and the head update checks the head it locked is still the one it read.

Every write of a batch is one statement per table (``unnest`` arrays or COPY), with the
rollup counters aggregated in memory first (:mod:`spendgate_auditor._rollup`).

Every method translates asyncpg's "unavailable" errors into ``StoreUnavailableError``
(:func:`~spendgate_common.pg.translate_errors`); constraint violations are not translated
(a broken invariant must crash).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
import msgspec

from spendgate_auditor._chain import GENESIS_LINK, ChainHead
from spendgate_auditor._checkpoints import CheckpointSchedule
from spendgate_auditor._plan import (
    BatchPlan,
    Delivery,
    conflicting_duplicates,
    links_needed,
    plan_batch,
)
from spendgate_auditor._rollup import (
    COUNTERS,
    BudgetRef,
    DecisionRef,
    DecisionRow,
    FinanceRow,
    KeyInfo,
    KeyRef,
    RollupBatch,
    Skipped,
    budget_references,
    references,
)
from spendgate_auditor._signing import ALGORITHM, Signer
from spendgate_common.events_v1 import AnyEvent, KeyIssued, decode_event
from spendgate_common.pg import translate_errors

if TYPE_CHECKING:
    from typing import Any

    from asyncpg.pool import PoolConnectionProxy

    Connection = PoolConnectionProxy[Any]


@dataclass(frozen=True, slots=True)
class CheckpointRow:
    partition: int
    seq: int
    link: bytes
    key_id: str
    signature: bytes


@dataclass(frozen=True, slots=True)
class SigningKeyRow:
    key_id: str
    algorithm: str
    public_key: bytes
    first_used_at: datetime


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """A committed batch: what it did, and what the shell reports or publishes next."""

    plan: BatchPlan
    # Duplicates whose bytes differ from the chained event (alarms).
    conflicts: list[Delivery]
    checkpoints: list[CheckpointRow]
    # Finance events committed to the outbox, to publish now.
    finance: list[FinanceRow]
    # Events the rollups could not use (undecodable, or referring to unknown state).
    skipped: list[Skipped]
    # ``at_ms`` of the last chained event that decoded (for the lag in time).
    last_event_at_ms: int | None


class AuditStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # ----------------------------------------------------------------------- start-up

    async def register_key(self, signer: Signer) -> None:
        """Store the signer's public key under its key id (once; kept after rotation).

        A different public key under the same id is a broken invariant (the id is a hash
        of the key): it crashes rather than signing under a confusable id.
        """
        async with translate_errors("register signing key"), self._pool.acquire() as connection:
            await connection.execute(
                "INSERT INTO audit_signing_keys (key_id, algorithm, public_key)"
                " VALUES ($1, $2, $3) ON CONFLICT (key_id) DO NOTHING",
                signer.key_id,
                ALGORITHM,
                signer.public_key,
            )
            stored = await connection.fetchval(
                "SELECT public_key FROM audit_signing_keys WHERE key_id = $1", signer.key_id
            )
        assert bytes(stored) == signer.public_key, f"key id {signer.key_id} names another key"

    async def heads_and_signed(self) -> tuple[dict[int, int], dict[int, int]]:
        """Each partition's head seq and last signed seq (0 when never signed)."""
        async with translate_errors("read heads"), self._pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT h.partition, h.seq, coalesce((SELECT max(c.seq) FROM audit_checkpoints"
                " AS c WHERE c.partition = h.partition), 0) AS signed FROM audit_heads AS h"
            )
        heads = {row["partition"]: row["seq"] for row in rows}
        signed = {row["partition"]: row["signed"] for row in rows}
        return heads, signed

    async def signing_keys(self) -> list[SigningKeyRow]:
        async with translate_errors("read signing keys"), self._pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT key_id, algorithm, public_key, first_used_at FROM audit_signing_keys"
                " ORDER BY first_used_at, key_id"
            )
        return [
            SigningKeyRow(row["key_id"], row["algorithm"], bytes(row["public_key"]), row[3])
            for row in rows
        ]

    # -------------------------------------------------------------------------- batch

    async def chain(
        self,
        deliveries: Sequence[Delivery],
        signer: Signer,
        schedule: CheckpointSchedule,
        now_s: float,
    ) -> BatchOutcome:
        """Chain ``deliveries``, sign, roll up, in one transaction; returns after the commit.

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
            if not plan.links:
                return BatchOutcome(plan, conflicts, [], [], [], None)
            await _append(connection, plan, heads)
            checkpoints = _sign(signer, schedule.plan(plan.links, now_s))
            await _insert_checkpoints(connection, checkpoints)
            events, skipped = _decode(plan.chained)
            rollup = await _load_state(connection, events)
            for partition, seq, event in events:
                rollup.apply(partition, seq, event)
            await _write_rollup(connection, rollup)
        last_at_ms = events[-1][2].at_ms if events else None
        skipped.extend(rollup.skipped)
        return BatchOutcome(plan, conflicts, checkpoints, rollup.finance, skipped, last_at_ms)

    async def sign_heads(
        self, partitions: Sequence[int] | None, signer: Signer
    ) -> tuple[list[CheckpointRow], list[CheckpointRow]]:
        """Sign the current head of ``partitions`` (all when ``None``) unless it is signed
        already. Returns, after the commit, the checkpoints written now and the checkpoint
        of every head (written now or before)."""
        async with (
            translate_errors("sign heads"),
            self._pool.acquire() as connection,
            connection.transaction(),
        ):
            # Locked in partition order, like a batch, so the two never deadlock.
            rows = await connection.fetch(
                "SELECT partition, seq, link FROM audit_heads"
                " WHERE seq > 0 AND ($1::int[] IS NULL OR partition = ANY($1::int[]))"
                " ORDER BY partition FOR UPDATE",
                None if partitions is None else sorted(partitions),
            )
            heads = [ChainHead(row["partition"], row["seq"], bytes(row["link"])) for row in rows]
            existing = await connection.fetch(
                "SELECT c.partition, c.seq, c.link, c.key_id, c.signature"
                " FROM audit_checkpoints AS c"
                " JOIN unnest($1::int[], $2::bigint[]) AS h(partition, seq)"
                " ON c.partition = h.partition AND c.seq = h.seq",
                [head.partition for head in heads],
                [head.seq for head in heads],
            )
            signed = [
                CheckpointRow(row[0], row[1], bytes(row[2]), row[3], bytes(row[4]))
                for row in existing
            ]
            done = {(row.partition, row.seq) for row in signed}
            written = _sign(signer, [h for h in heads if (h.partition, h.seq) not in done])
            await _insert_checkpoints(connection, written)
        every = sorted(signed + written, key=lambda row: row.partition)
        return written, every

    # ------------------------------------------------------------------ finance outbox

    async def pending_finance(self, limit: int) -> list[FinanceRow]:
        async with translate_errors("read finance outbox"), self._pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT partition, seq, tenant, body FROM audit_finance_outbox"
                " ORDER BY partition, seq LIMIT $1",
                limit,
            )
        return [FinanceRow(row[0], row[1], row[2], bytes(row[3])) for row in rows]

    async def count_finance(self) -> int:
        async with translate_errors("count finance outbox"), self._pool.acquire() as connection:
            count: int = await connection.fetchval("SELECT count(*) FROM audit_finance_outbox")
        return count

    async def delete_finance(self, rows: Sequence[FinanceRow]) -> None:
        if not rows:
            return
        async with translate_errors("trim finance outbox"), self._pool.acquire() as connection:
            await connection.execute(
                "DELETE FROM audit_finance_outbox AS o"
                " USING unnest($1::int[], $2::bigint[]) AS d(partition, seq)"
                " WHERE o.partition = d.partition AND o.seq = d.seq",
                [row.partition for row in rows],
                [row.seq for row in rows],
            )


# ------------------------------------------------------------------------- chaining


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


def _sign(signer: Signer, heads: Sequence[ChainHead]) -> list[CheckpointRow]:
    return [
        CheckpointRow(
            head.partition,
            head.seq,
            head.link,
            signer.key_id,
            signer.sign(head.partition, head.seq, head.link),
        )
        for head in heads
    ]


async def _insert_checkpoints(connection: Connection, rows: Sequence[CheckpointRow]) -> None:
    if not rows:
        return
    await connection.execute(
        "INSERT INTO audit_checkpoints (partition, seq, link, key_id, signature)"
        " SELECT * FROM unnest($1::int[], $2::bigint[], $3::bytea[], $4::text[], $5::bytea[])",
        [row.partition for row in rows],
        [row.seq for row in rows],
        [row.link for row in rows],
        [row.key_id for row in rows],
        [row.signature for row in rows],
    )


# -------------------------------------------------------------------------- rollups


def _decode(chained: Sequence[Delivery]) -> tuple[list[tuple[int, int, AnyEvent]], list[Skipped]]:
    """The chained events that decode as events v1; the others are skipped (chained)."""
    events: list[tuple[int, int, AnyEvent]] = []
    skipped: list[Skipped] = []
    for delivery in chained:
        try:
            event = decode_event(delivery.body)
        except msgspec.DecodeError as error:
            skipped.append(Skipped(delivery.partition, delivery.seq, f"undecodable: {error}"))
            continue
        events.append((delivery.partition, delivery.seq, event))
    return events, skipped


async def _load_state(
    connection: Connection, events: Sequence[tuple[int, int, AnyEvent]]
) -> RollupBatch:
    """A RollupBatch with the keys, open reservations and budgets ``events`` refer to."""
    key_refs, decision_refs = references(events)
    keys = await _read_keys(connection, key_refs)
    decisions = await _read_decisions(connection, decision_refs)
    # Keys issued within the batch are not stored yet, but their tenant is needed to name
    # the budgets of their first reserves. (Budgets created within the batch are added by
    # RollupBatch.apply, in order.)
    batch_keys = dict(keys)
    for partition, _, event in events:
        if isinstance(event, KeyIssued):
            batch_keys[(partition, event.key_id)] = KeyInfo(
                event.tenant, event.label, tuple(event.fleet_labels), event.timezone
            )
    budget_zones = await _read_budget_zones(
        connection, budget_references(events, batch_keys, decisions)
    )
    return RollupBatch(keys, budget_zones, decisions)


async def _read_keys(connection: Connection, refs: set[KeyRef]) -> dict[KeyRef, KeyInfo]:
    if not refs:
        return {}
    ordered = sorted(refs)
    rows = await connection.fetch(
        "SELECT k.partition, k.key_id, k.tenant, k.label, k.fleet_labels, k.timezone"
        " FROM audit_keys AS k JOIN unnest($1::int[], $2::text[]) AS r(partition, key_id)"
        " ON k.partition = r.partition AND k.key_id = r.key_id",
        [partition for partition, _ in ordered],
        [key_id for _, key_id in ordered],
    )
    return {(r[0], r[1]): KeyInfo(r[2], r[3], tuple(r[4]), r[5]) for r in rows}


async def _read_decisions(
    connection: Connection, refs: set[DecisionRef]
) -> dict[DecisionRef, DecisionRow]:
    if not refs:
        return {}
    ordered = sorted(refs)
    rows = await connection.fetch(
        "SELECT d.partition, d.decision_id, d.key_id, d.vendor, d.operation, d.outcome,"
        " d.amount_micros, d.budget_ids, d.decided_at_ms, d.decided_seq, d.spent_micros,"
        " d.overrun_micros, d.settled_at_ms, d.settled_seq"
        " FROM audit_decisions AS d"
        " JOIN unnest($1::int[], $2::text[]) AS r(partition, decision_id)"
        " ON d.partition = r.partition AND d.decision_id = r.decision_id",
        [partition for partition, _ in ordered],
        [decision_id for _, decision_id in ordered],
    )
    return {
        (r[0], r[1]): DecisionRow(
            partition=r[0],
            decision_id=r[1],
            key_id=r[2],
            vendor=r[3],
            operation=r[4],
            outcome=r[5],
            amount_micros=r[6],
            budget_ids=list(r[7]),
            decided_at_ms=r[8],
            decided_seq=r[9],
            spent_micros=r[10],
            overrun_micros=r[11],
            settled_at_ms=r[12],
            settled_seq=r[13],
            in_store=True,
            changed=False,
        )
        for r in rows
    }


async def _read_budget_zones(connection: Connection, refs: set[BudgetRef]) -> dict[BudgetRef, str]:
    if not refs:
        return {}
    ordered = sorted(refs)
    rows = await connection.fetch(
        "SELECT b.partition, b.tenant, b.budget_id, b.timezone FROM audit_budgets AS b"
        " JOIN unnest($1::int[], $2::text[], $3::text[]) AS r(partition, tenant, budget_id)"
        " ON b.partition = r.partition AND b.tenant = r.tenant AND b.budget_id = r.budget_id",
        [ref[0] for ref in ordered],
        [ref[1] for ref in ordered],
        [ref[2] for ref in ordered],
    )
    return {(r[0], r[1], r[2]): r[3] for r in rows}


def _upsert_counters_sql(
    table: str, keys: Sequence[tuple[str, str]], conflict: Sequence[str]
) -> str:
    """``INSERT ... SELECT * FROM unnest(...) ON CONFLICT (keys) DO UPDATE`` adding the
    counters. Built from constants only (column names and types), never from input."""
    columns = [name for name, _ in keys] + list(COUNTERS)
    types = [kind for _, kind in keys] + ["bigint"] * len(COUNTERS)
    arrays = ", ".join(f"${index}::{kind}[]" for index, kind in enumerate(types, start=1))
    updates = ", ".join(f"{name} = r.{name} + EXCLUDED.{name}" for name in COUNTERS)
    return " ".join(
        [
            "INSERT INTO",
            table,
            f"AS r ({', '.join(columns)}) SELECT * FROM unnest({arrays})",  # noqa: S608
            f"ON CONFLICT ({', '.join(conflict)}) DO UPDATE SET {updates}",
        ]
    )


_UPSERT_KEY_ROLLUPS = _upsert_counters_sql(
    "audit_rollups",
    [
        ("partition", "int"),
        ("key_id", "text"),
        ("vendor", "text"),
        ("day", "date"),
        ("tenant", "text"),
        ("label", "text"),
    ],
    ["partition", "key_id", "vendor", "day"],
)
_UPSERT_BUDGET_ROLLUPS = _upsert_counters_sql(
    "audit_budget_rollups",
    [("partition", "int"), ("tenant", "text"), ("budget_id", "text"), ("day", "date")],
    ["partition", "tenant", "budget_id", "day"],
)
_DECISION_COLUMNS = (
    "partition",
    "decision_id",
    "key_id",
    "vendor",
    "operation",
    "outcome",
    "amount_micros",
    "spent_micros",
    "overrun_micros",
    "budget_ids",
    "decided_at_ms",
    "decided_seq",
    "settled_at_ms",
    "settled_seq",
    "denial_code",
    "denial_scope",
    "denial_scope_id",
)


async def _write_rollup(connection: Connection, rollup: RollupBatch) -> None:
    """Write a batch's effects: one statement per table (COPY where rows carry arrays)."""
    if rollup.new_keys:
        await connection.copy_records_to_table(
            "audit_keys",
            columns=(
                "partition",
                "key_id",
                "tenant",
                "label",
                "fleet_labels",
                "timezone",
                "window",
                "cap_micros",
                "issued_at_ms",
                "expires_at_ms",
            ),
            records=[
                (
                    partition,
                    e.key_id,
                    e.tenant,
                    e.label,
                    list(e.fleet_labels),
                    e.timezone,
                    e.window,
                    e.cap_micros,
                    e.at_ms,
                    e.expires_at_ms,
                )
                for partition, e in rollup.new_keys
            ],
        )
    if rollup.revoked_keys:
        await connection.executemany(
            "UPDATE audit_keys SET revoked_at_ms = $3 WHERE partition = $1 AND key_id = $2",
            rollup.revoked_keys,
        )
    await _write_budgets(connection, rollup)
    inserts = rollup.decisions_to_insert()
    if inserts:
        await connection.copy_records_to_table(
            "audit_decisions",
            columns=_DECISION_COLUMNS,
            records=[_decision_record(row) for row in inserts],
        )
    updates = rollup.decisions_to_update()
    if updates:
        status = await connection.execute(
            "UPDATE audit_decisions AS d SET outcome = u.outcome, spent_micros = u.spent,"
            " overrun_micros = u.overrun, settled_at_ms = u.settled_at_ms,"
            " settled_seq = u.settled_seq"
            " FROM unnest($1::int[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],"
            " $6::bigint[], $7::bigint[])"
            " AS u(partition, decision_id, outcome, spent, overrun, settled_at_ms, settled_seq)"
            " WHERE d.partition = u.partition AND d.decision_id = u.decision_id"
            " AND d.outcome = 'open'",
            [row.partition for row in updates],
            [row.decision_id for row in updates],
            [row.outcome for row in updates],
            [row.spent_micros for row in updates],
            [row.overrun_micros for row in updates],
            [row.settled_at_ms for row in updates],
            [row.settled_seq for row in updates],
        )
        # Each was read as open under this transaction's head locks: only we settle it.
        assert status == f"UPDATE {len(updates)}", status
    await _write_counters(connection, rollup)
    if rollup.finance:
        await connection.copy_records_to_table(
            "audit_finance_outbox",
            columns=("partition", "seq", "tenant", "body"),
            records=[(row.partition, row.seq, row.tenant, row.body) for row in rollup.finance],
        )


async def _write_budgets(connection: Connection, rollup: RollupBatch) -> None:
    if rollup.new_budgets:
        await connection.copy_records_to_table(
            "audit_budgets",
            columns=(
                "partition",
                "tenant",
                "budget_id",
                "scope",
                "match",
                "timezone",
                "window",
                "cap_micros",
                "created_at_ms",
            ),
            records=[
                (
                    partition,
                    e.tenant,
                    e.budget_id,
                    e.scope,
                    e.match,
                    e.timezone,
                    e.window,
                    e.cap_micros,
                    e.at_ms,
                )
                for partition, e in rollup.new_budgets
            ],
        )
    if rollup.budget_caps:
        await connection.executemany(
            "UPDATE audit_budgets SET cap_micros = $4"
            " WHERE partition = $1 AND tenant = $2 AND budget_id = $3",
            rollup.budget_caps,
        )
    if rollup.closed_budgets:
        await connection.executemany(
            "UPDATE audit_budgets SET closed_at_ms = $4"
            " WHERE partition = $1 AND tenant = $2 AND budget_id = $3",
            rollup.closed_budgets,
        )


async def _write_counters(connection: Connection, rollup: RollupBatch) -> None:
    if rollup.key_rollups:
        refs = sorted(rollup.key_rollups)
        rows = [rollup.key_rollups[ref] for ref in refs]
        await connection.execute(
            _UPSERT_KEY_ROLLUPS,
            [ref[0] for ref in refs],
            [ref[1] for ref in refs],
            [ref[2] for ref in refs],
            [ref[3] for ref in refs],
            [row.tenant for row in rows],
            [row.label for row in rows],
            *([row.counters[index] for row in rows] for index in range(len(COUNTERS))),
        )
    if rollup.budget_rollups:
        budget_refs = sorted(rollup.budget_rollups)
        counters = [rollup.budget_rollups[ref] for ref in budget_refs]
        await connection.execute(
            _UPSERT_BUDGET_ROLLUPS,
            [ref[0] for ref in budget_refs],
            [ref[1] for ref in budget_refs],
            [ref[2] for ref in budget_refs],
            [ref[3] for ref in budget_refs],
            *([row[index] for row in counters] for index in range(len(COUNTERS))),
        )


def _decision_record(row: DecisionRow) -> tuple[object, ...]:
    return (
        row.partition,
        row.decision_id,
        row.key_id,
        row.vendor,
        row.operation,
        row.outcome,
        row.amount_micros,
        row.spent_micros,
        row.overrun_micros,
        row.budget_ids,
        row.decided_at_ms,
        row.decided_seq,
        row.settled_at_ms,
        row.settled_seq,
        row.denial_code,
        row.denial_scope,
        row.denial_scope_id,
    )
