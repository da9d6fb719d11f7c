"""Ledger replicas' heartbeats: how many are alive decides each one's fair share."""

from __future__ import annotations

import math
from datetime import timedelta

import asyncpg

from spendgate_common.pg import translate_errors


def fair_share(partition_count: int, live_replicas: int) -> int:
    """Partitions one replica should own: ``ceil(partition_count / live_replicas)``."""
    assert partition_count > 0
    return math.ceil(partition_count / max(1, live_replicas))


class ReplicaRegistry:
    def __init__(self, pool: asyncpg.Pool, owner: str) -> None:
        self._pool = pool
        self._owner = owner

    async def heartbeat(self, lease: timedelta) -> int:
        """Mark this replica alive for one lease period; return how many are alive."""
        async with translate_errors("heartbeat"), self._pool.acquire() as connection:
            await connection.execute(
                "INSERT INTO ledger_replicas (owner, expires_at) VALUES ($1, now() + $2::interval)"
                " ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at",
                self._owner,
                lease,
            )
            alive = await connection.fetchval(
                "SELECT count(*) FROM ledger_replicas WHERE expires_at > now()"
            )
            # Forget replicas that have been gone for a while (bounded table).
            await connection.execute(
                "DELETE FROM ledger_replicas WHERE expires_at < now() - interval '1 hour'"
            )
        return int(alive or 1)

    async def leave(self) -> None:
        """Stop counting this replica (on shutdown), so the others grow their share."""
        async with translate_errors("leave"), self._pool.acquire() as connection:
            await connection.execute("DELETE FROM ledger_replicas WHERE owner = $1", self._owner)
