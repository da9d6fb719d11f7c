"""Postgres side of snapshots: write one, find the newest usable one, keep a few."""

from __future__ import annotations

import asyncpg

from spendgate_common.pg import translate_errors

# Snapshots kept per partition (older ones are deleted after a new one is written).
SNAPSHOTS_KEPT = 2


class SnapshotStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def save(self, partition: int, seq: int, body: bytes) -> None:
        """Store a snapshot of the log up to ``seq`` and delete all but the newest few."""
        async with translate_errors("save snapshot"), self._pool.acquire() as connection:
            await connection.execute(
                "INSERT INTO snapshots (partition, seq, body) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING",
                partition,
                seq,
                body,
            )
            await connection.execute(
                "DELETE FROM snapshots WHERE partition = $1 AND seq < ("
                " SELECT min(seq) FROM (SELECT seq FROM snapshots WHERE partition = $1"
                " ORDER BY seq DESC LIMIT $2) AS newest)",
                partition,
                SNAPSHOTS_KEPT,
            )

    async def newest(self, partition: int, max_seq: int) -> list[tuple[int, bytes]]:
        """Snapshots at or below ``max_seq``, newest first (the caller tries them in order)."""
        async with translate_errors("load snapshot"), self._pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT seq, body FROM snapshots WHERE partition = $1 AND seq <= $2"
                " ORDER BY seq DESC LIMIT $3",
                partition,
                max_seq,
                SNAPSHOTS_KEPT,
            )
        return [(row["seq"], bytes(row["body"])) for row in rows]
