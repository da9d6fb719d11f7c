"""Applies the numbered SQL migrations in ``migrations/`` on start.

Every service that owns tables calls :func:`apply_migrations` before it serves. A
transaction-scoped advisory lock serialises concurrent starters; each migration runs in
its own transaction together with its row in ``schema_migrations``, so a crash leaves the
schema at a migration boundary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

# Arbitrary constant: the advisory lock key that serialises migration runs.
_MIGRATION_LOCK_KEY = 0x5EED_6A7E
_FILE_PATTERN = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """All migrations shipped in the package, ordered by version; versions must be 1..n."""
    found: list[Migration] = []
    for entry in resources.files("spendgate_common.migrations").iterdir():
        match = _FILE_PATTERN.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda migration: migration.version)
    assert [m.version for m in found] == list(range(1, len(found) + 1)), "migration gap"
    return found


async def apply_migrations(
    connection: asyncpg.Connection[Any] | PoolConnectionProxy[Any],
    up_to: int | None = None,
) -> list[int]:
    """Apply what is missing (only versions up to ``up_to``, when given: a schema as an
    earlier release left it); return the versions applied now (empty when up to date)."""
    async with connection.transaction():
        # Under the lock: concurrent CREATE TABLE IF NOT EXISTS can still collide.
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
    applied_now: list[int] = []
    for migration in load_migrations():
        if up_to is not None and migration.version > up_to:
            break
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
            done = await connection.fetchval(
                "SELECT 1 FROM schema_migrations WHERE version = $1", migration.version
            )
            if done:
                continue
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied_now.append(migration.version)
    return applied_now
