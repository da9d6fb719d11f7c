"""Postgres side of snapshots: write one, find the newest usable one, keep a few."""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from spendgate_common.pg import translate_errors

# Snapshots kept per partition (older ones are deleted after a new one is written).
SNAPSHOTS_KEPT = 2
# Connecting, and each statement, when a snapshot is stored: it is background work, and a
# large snapshot is tens of megabytes.
SAVE_TIMEOUT = timedelta(minutes=2)


class SnapshotStore:
    def __init__(self, pool: asyncpg.Pool, database_url: str) -> None:
        self._pool = pool
        self._database_url = database_url

    async def save(self, partition: int, seq: int, body: bytes) -> None:
        """Store a snapshot of the log up to ``seq`` and delete all but the newest few.

        Over a new connection, closed afterwards: it runs in a snapshot child
        (spendgate_ledger._snapshot.fork_save_snapshot), which must not touch the
        parent's pool, and it keeps a large write off the pool the appends use.
        """
        timeout_s = SAVE_TIMEOUT.total_seconds()
        async with translate_errors("save snapshot"):
            connection = await asyncpg.connect(
                self._database_url, timeout=timeout_s, command_timeout=timeout_s
            )
            try:
                async with connection.transaction():
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
            finally:
                await connection.close(timeout=timeout_s)

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
