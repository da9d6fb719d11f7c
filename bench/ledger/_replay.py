"""Recovery of one partition, timed in-process with the ledger's own ``StateLoader``.

The loader is the one a replica runs when it takes a partition over: the newest usable
snapshot, then the log after it. To time the cases separately it is given a snapshot
store that hides every snapshot (a replay of the whole log) or all but the one at or
below a given seq (that snapshot and the log's tail after it). It also measures what the
recovered state occupies on the Python heap (``tracemalloc``), the floor under the RSS
that the live ledger process shows.
"""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from datetime import timedelta

import asyncpg
import msgspec

from spendgate_common import pg
from spendgate_ledger._partition import StateConfig, StateLoader
from spendgate_ledger._snapshot_store import SnapshotStore
from spendgate_ledger._state import PartitionState
from spendgate_ledger._store import LedgerStore

# The ledger's defaults (docs/ledger.md): hold 15 min, answers 24 h, settled ids 1 h.
HOLD_DEFAULT = timedelta(minutes=15)
IDEMPOTENCY_RETENTION = timedelta(hours=24)
SETTLED_RETENTION = timedelta(hours=1)
STATEMENT_TIMEOUT = timedelta(seconds=60)
CONNECT_DEADLINE = timedelta(seconds=10)


class _NoSnapshots(SnapshotStore):
    async def newest(self, partition: int, max_seq: int) -> list[tuple[int, bytes]]:
        return []


class _SnapshotsUpTo(SnapshotStore):
    def __init__(self, pool: asyncpg.Pool, database_url: str, ceiling: int) -> None:
        super().__init__(pool, database_url)
        self._ceiling = ceiling

    async def newest(self, partition: int, max_seq: int) -> list[tuple[int, bytes]]:
        return await super().newest(partition, min(max_seq, self._ceiling))


class Timing(msgspec.Struct, frozen=True):
    """``repeats`` loads of one case; times in milliseconds (median and every one)."""

    case: str
    snapshot_seq: int
    events_replayed: int
    last_seq: int
    remembered_answers: int
    settled_ids: int
    wall_ms: float
    cpu_ms: float
    wall_ms_each: list[float]
    cpu_ms_each: list[float]


class StateSize(msgspec.Struct, frozen=True):
    """Python heap bytes of one recovered state (tracemalloc) and what it holds."""

    heap_bytes: int
    remembered_answers: int
    settled_ids: int
    open_holds: int


class Snapshot(msgspec.Struct, frozen=True):
    seq: int
    body_bytes: int  # msgpack as encoded
    stored_bytes: int  # pg_column_size: after TOAST compression


class Replayer:
    """StateLoaders of one partition against the benchmark's database."""

    def __init__(
        self, pool: asyncpg.Pool, database_url: str, partition_count: int, snapshot_every: int
    ) -> None:
        self._pool = pool
        self._database_url = database_url
        self._store = LedgerStore(pool, "bench-footprint")
        self._config = StateConfig(
            partition_count=partition_count,
            hold_default=HOLD_DEFAULT,
            retention=IDEMPOTENCY_RETENTION,
            settled_retention=SETTLED_RETENTION,
        )
        self._snapshot_every = snapshot_every

    @classmethod
    async def connect(
        cls, database_url: str, partition_count: int, snapshot_every: int
    ) -> Replayer:
        pool = await pg.create_pool(
            database_url,
            min_size=1,
            max_size=2,
            statement_timeout=STATEMENT_TIMEOUT,
            connect_deadline=CONNECT_DEADLINE,
        )
        return cls(pool, database_url, partition_count, snapshot_every)

    async def close(self) -> None:
        await self._pool.close()

    def _loader(self, snapshots: SnapshotStore) -> StateLoader:
        return StateLoader(
            self._store, snapshots, self._config, snapshot_every_events=self._snapshot_every
        )

    async def snapshots(self, partition: int) -> list[Snapshot]:
        rows = await self._pool.fetch(
            "SELECT seq, octet_length(body) AS body_bytes, pg_column_size(body) AS stored"
            " FROM snapshots WHERE partition = $1 ORDER BY seq",
            partition,
        )
        return [Snapshot(row["seq"], row["body_bytes"], row["stored"]) for row in rows]

    async def time_load(
        self, case: str, partition: int, *, snapshots_up_to: int | None, repeats: int
    ) -> Timing:
        """Load the partition ``repeats`` times: with no snapshot (``snapshots_up_to`` 0),
        the newest (None) or the newest at or below a seq."""
        if snapshots_up_to == 0:
            snapshots: SnapshotStore = _NoSnapshots(self._pool, self._database_url)
        elif snapshots_up_to is None:
            snapshots = SnapshotStore(self._pool, self._database_url)
        else:
            snapshots = _SnapshotsUpTo(self._pool, self._database_url, snapshots_up_to)
        loader = self._loader(snapshots)
        walls, cpus = [], []
        state: PartitionState | None = None
        snapshot_seq = 0
        for _ in range(repeats):
            state = None
            gc.collect()
            found = await snapshots.newest(partition, 2**62)
            snapshot_seq = found[0][0] if found else 0
            wall_started, cpu_started = time.perf_counter(), time.process_time()
            state = await loader.load(partition, expected_last_seq=None)
            walls.append(round((time.perf_counter() - wall_started) * 1000, 1))
            cpus.append(round((time.process_time() - cpu_started) * 1000, 1))
        assert state is not None
        return Timing(
            case=case,
            snapshot_seq=snapshot_seq,
            events_replayed=state.last_seq - snapshot_seq,
            last_seq=state.last_seq,
            remembered_answers=len(state.idempotency),
            settled_ids=len(state.settled),
            wall_ms=statistics.median(walls),
            cpu_ms=statistics.median(cpus),
            wall_ms_each=walls,
            cpu_ms_each=cpus,
        )

    async def state_size(self, partition: int) -> StateSize:
        """Heap bytes of the partition's state, recovered from its newest snapshot."""
        loader = self._loader(SnapshotStore(self._pool, self._database_url))
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            state = await loader.load(partition, expected_last_seq=None)
            gc.collect()
            heap_bytes = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        return StateSize(
            heap_bytes=heap_bytes,
            remembered_answers=len(state.idempotency),
            settled_ids=len(state.settled),
            open_holds=len(state.holds),
        )
