"""What the benchmark runs against: embedded NATS, durable Postgres, ledger processes.

Everything lives under a fresh ``/tmp/spendgate-bench-*`` directory (Postgres runs as the
``pgserver`` user when we are root, so its data must not sit under a 0700 directory such
as pytest's), on free ports, and is stopped and removed by :meth:`Cluster.close`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import asyncpg
import nats
from nats.aio.client import Client as NatsClient

from bench.ledger._load import BASELINE_ROW_ID, BASELINE_TABLE, KeySpec
from spendgate_cli.embedded import EmbeddedNats, EmbeddedPostgres
from spendgate_cli.services import ServiceProcess, readiness_probe, service_argv
from spendgate_common.ledger_v1 import (
    AnyResult,
    CommandBatch,
    IssueKey,
    KeyCreated,
    KeyState,
    QueryKey,
    decode_result_batch,
    encode_batch,
)
from spendgate_common.limits import AMOUNT_MICROS_MAX
from spendgate_common.partitioning import partition_for_tenant
from spendgate_common.subjects import ledger_command_subject
from spendgate_common.vault_keys import new_vault_key

DATABASE = "spendgate_bench"
# Postgres settings of the benchmark's cluster. Durability stays on (fsync,
# synchronous_commit, full_page_writes: their defaults); these only keep the WAL from
# stalling commits under a sustained 10+ MB/s: new WAL segments are not zero-filled
# first (a 16 MB write and fsync every ~1.5 s, which stalled commits for tens of ms),
# fewer checkpoints, and a WAL buffer that holds a large batch.
POSTGRES_SETTINGS = {
    "wal_init_zero": "off",
    "max_wal_size": "4GB",
    "min_wal_size": "1GB",
    "wal_buffers": "16MB",
}
LEDGER_READY_DEADLINE = timedelta(seconds=60)
LEDGER_STOP_DEADLINE = timedelta(seconds=30)
# Bound of one setup request (issue keys, query a key).
SETUP_REQUEST_TIMEOUT = timedelta(seconds=10)
# A key that outlives any benchmark (2100-01-01).
KEY_EXPIRES_AT_MS = 4_102_444_800_000
# Tenants tried while looking for ones that land in distinct partitions.
TENANT_CANDIDATES_MAX = 10_000


@dataclass(slots=True)
class Cluster:
    root: Path
    nats_server: EmbeddedNats
    postgres: EmbeddedPostgres
    partition_count: int
    ledger_env: dict[str, str]
    ledgers: list[ServiceProcess] = field(default_factory=list)

    @property
    def database_url(self) -> str:
        return self.postgres.url(DATABASE)

    @classmethod
    def start(
        cls,
        partition_count: int,
        ledger_env: Mapping[str, str],
        postgres_settings: Mapping[str, str],
        *,
        nats_store_dir: Path | None = None,
    ) -> Cluster:
        """Start NATS and a durable Postgres (fsync on) under a fresh temporary directory.

        ``postgres_settings`` are written with ALTER SYSTEM before a restart (so settings
        that need one, such as ``wal_buffers``, take effect too). ``nats_store_dir``: where
        JetStream's store goes instead (a fresh directory in it, removed with the rest).
        """
        root = Path(tempfile.mkdtemp(prefix="spendgate-bench-"))
        nats_store = (
            Path(tempfile.mkdtemp(prefix="spendgate-bench-nats-", dir=nats_store_dir))
            if nats_store_dir is not None
            else root / "nats"
        )
        nats_server = EmbeddedNats(nats_store)
        postgres = EmbeddedPostgres(root / "postgres", durable=True)
        cluster = cls(root, nats_server, postgres, partition_count, dict(ledger_env))
        try:
            nats_server.start()
            postgres.start()
            if postgres_settings:
                asyncio.run(_alter_system(postgres.url(), postgres_settings))
                postgres.restart()
            postgres.create_database(DATABASE)
        except BaseException:
            cluster.close(keep_data=False)
            raise
        return cluster

    def start_ledgers(self, replicas: int) -> None:
        """Start ``replicas`` ledger processes and wait until each is ready.

        The first claims every partition; the others wait as hot standbys.
        """
        env = {
            name: value for name, value in os.environ.items() if not name.startswith("SPENDGATE_")
        }
        env |= {
            "PYTHONUNBUFFERED": "1",
            "SPENDGATE_DATABASE_URL": self.database_url,
            "SPENDGATE_NATS_URL": self.nats_server.url,
            "SPENDGATE_PARTITION_COUNT": str(self.partition_count),
            **self.ledger_env,
        }
        for index in range(replicas):
            log_path = self.root / f"ledger-{index}.log"
            process = ServiceProcess.spawn(f"ledger-{index}", service_argv("ledger"), env, log_path)
            self.ledgers.append(process)
            process.wait_ready(readiness_probe("ledger", env, process), LEDGER_READY_DEADLINE)

    def close(self, *, keep_data: bool) -> None:
        for ledger in self.ledgers:
            ledger.terminate(LEDGER_STOP_DEADLINE.total_seconds())
        self.nats_server.stop()
        self.postgres.stop()
        if not keep_data:
            shutil.rmtree(self.root, ignore_errors=True)
            shutil.rmtree(self.nats_server.data_dir, ignore_errors=True)
            # Beside its store: outside the root with --nats-store-dir.
            self.nats_server.log_path.unlink(missing_ok=True)

    def process_ids(self) -> dict[str, list[int]]:
        """Pids of the server and ledger processes, by component (Postgres: the postmaster)."""
        ids: dict[str, list[int]] = {
            "ledger": [ledger.pid for ledger in self.ledgers if ledger.is_running]
        }
        if self.nats_server.pid is not None:
            ids["nats"] = [self.nats_server.pid]
        if self.postgres.pid is not None:
            ids["postgres"] = [self.postgres.pid]
        return ids

    # ------------------------------------------------------------------- preparation

    async def create_baseline_table(self) -> None:
        connection = await asyncpg.connect(self.database_url)
        try:
            await connection.execute(
                f"CREATE TABLE IF NOT EXISTS {BASELINE_TABLE}"
                " (id bigint PRIMARY KEY, spent bigint NOT NULL, cap bigint NOT NULL)"
            )
            await connection.execute(
                f"INSERT INTO {BASELINE_TABLE} (id, spent, cap) VALUES ($1, 0, $2)"  # noqa: S608
                " ON CONFLICT (id) DO UPDATE SET spent = 0",
                BASELINE_ROW_ID,
                AMOUNT_MICROS_MAX,
            )
        finally:
            await connection.close()

    async def issue_keys(self, tenants: Sequence[str]) -> list[KeySpec]:
        """One key per tenant with the largest cap (``total`` window, never expires)."""
        specs = []
        connection = await nats.connect(self.nats_server.url)
        try:
            for tenant in tenants:
                key = new_vault_key(tenant)
                command = IssueKey(
                    tenant=tenant,
                    key_id=key.key_id,
                    label=f"bench-{tenant}",
                    secret_sha256=key.secret_sha256,
                    cap_micros=AMOUNT_MICROS_MAX,
                    window="total",
                    timezone="UTC",
                    expires_at_ms=KEY_EXPIRES_AT_MS,
                )
                [result] = await self._request(connection, command)
                assert isinstance(result, KeyCreated), result
                specs.append(KeySpec(tenant, key.key_id, key.secret_sha256))
        finally:
            await connection.close()
        return specs

    async def query_key(self, key: KeySpec) -> KeyState:
        connection = await nats.connect(self.nats_server.url)
        try:
            command = QueryKey(tenant=key.tenant, key_id=key.key_id)
            [result] = await self._request(connection, command)
        finally:
            await connection.close()
        assert isinstance(result, KeyState), result
        return result

    async def _request(
        self, connection: NatsClient, command: IssueKey | QueryKey
    ) -> list[AnyResult]:
        partition = partition_for_tenant(command.tenant, self.partition_count)
        reply = await connection.request(
            ledger_command_subject(partition),
            encode_batch(CommandBatch(partition, [command])),
            timeout=SETUP_REQUEST_TIMEOUT.total_seconds(),
        )
        return list(decode_result_batch(reply.data).results)

    def tenants_in_distinct_partitions(self, count: int, prefix: str) -> list[str]:
        """``count`` tenants named ``<prefix>-<n>`` that map to ``count`` different partitions."""
        assert count <= self.partition_count
        chosen: dict[int, str] = {}
        for number in range(TENANT_CANDIDATES_MAX):
            tenant = f"{prefix}-{number}"
            chosen.setdefault(partition_for_tenant(tenant, self.partition_count), tenant)
            if len(chosen) == count:
                return list(chosen.values())
        raise AssertionError(f"no {count} distinct partitions among {TENANT_CANDIDATES_MAX}")


async def _alter_system(url: str, settings: Mapping[str, str]) -> None:
    connection = await asyncpg.connect(url)
    try:
        for name, value in settings.items():
            # ALTER SYSTEM takes no parameters; names are checked, values quoted.
            assert name.replace("_", "").isalnum(), name
            quoted = value.replace("'", "''")
            await connection.execute(f"ALTER SYSTEM SET {name} = '{quoted}'")
    finally:
        await connection.close()
