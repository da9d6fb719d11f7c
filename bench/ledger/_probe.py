"""Counters of the running system at one instant: bytes on disk, WAL, stream, memory, CPU.

Two probes taken around a workload give what the workload cost: Postgres table and index
bytes of ``events`` and ``snapshots``, WAL bytes (``pg_wal_lsn_diff``), JetStream messages
and bytes of ``SPENDGATE_EVENTS`` (as the stream reports them and as files on disk), the
resident memory of the ledger and NATS processes, and CPU seconds per component.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import msgspec
import nats

from bench.ledger import _cpu
from bench.ledger._report import AutovacuumSeen
from spendgate_common.subjects import EVENTS_STREAM

# Pause between two looks while waiting for the relay to publish everything.
DRAIN_POLL_S = 0.25


class Counters(msgspec.Struct, frozen=True):
    """What one probe read (sizes in bytes; ``wal_lsn`` as Postgres writes it)."""

    events: int  # sum of the partitions' last_seq: events in the log
    published: int  # sum of the relays' watermarks
    # The event log's table (event_batches): all of it, then heap and TOAST, then indexes.
    events_total_bytes: int
    events_heap_bytes: int
    events_index_bytes: int
    snapshots_total_bytes: int
    database_bytes: int
    wal_lsn: str
    stream_messages: int
    stream_bytes: int
    stream_file_bytes: int  # the stream's files under the NATS store directory
    ledger_rss_bytes: int
    nats_rss_bytes: int


@dataclass(frozen=True, slots=True)
class Probe:
    counters: Counters
    cpu: _cpu.CpuSample
    at: float  # time.monotonic()


class AutovacuumWatch(threading.Thread):
    """Looks at Postgres's autovacuum workers every ``interval_s`` from ``begin_at`` to
    ``end_at`` (``time.monotonic()``), from a thread of its own, so that a run can say
    whether (and how much of the time) a vacuum shared the machine with it: a throttled
    vacuum of the event log costs Postgres about a tenth of a core. It connects at once,
    before the window (a connection costs Postgres a fork); ``result()`` waits for the
    end."""

    def __init__(
        self, database_url: str, begin_at: float, end_at: float, interval_s: float = 0.5
    ) -> None:
        super().__init__(name="autovacuum-watch", daemon=True)
        self._database_url = database_url
        self._begin_at = begin_at
        self._end_at = end_at
        self._interval_s = interval_s
        self._seen: AutovacuumSeen | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._seen = asyncio.run(self._watch())
        except BaseException as error:  # reported by result(), in the caller's thread
            self._error = error

    async def _watch(self) -> AutovacuumSeen:
        connection = await asyncpg.connect(self._database_url)
        queries: set[str] = set()
        looks = busy = 0
        try:
            at = self._begin_at
            while at < self._end_at:
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                rows = await connection.fetch(
                    "SELECT query FROM pg_stat_activity"
                    " WHERE backend_type = 'autovacuum worker' AND query <> ''"
                )
                looks += 1
                busy += bool(rows)
                queries.update(row["query"] for row in rows)
                at += self._interval_s
        finally:
            await connection.close()
        return AutovacuumSeen(sorted(queries), round(busy / looks, 3) if looks else 0.0)

    def result(self, timeout_s: float) -> AutovacuumSeen:
        self.join(timeout_s)
        if self._error is not None:
            raise self._error
        assert self._seen is not None, "the autovacuum watch did not finish"
        return self._seen


async def _postgres_counters(database_url: str) -> dict[str, object]:
    connection = await asyncpg.connect(database_url)
    try:
        row = await connection.fetchrow(
            "SELECT (SELECT coalesce(sum(last_seq), 0)::bigint FROM partition_leases) AS events,"
            " (SELECT coalesce(sum(published_seq), 0)::bigint FROM outbox_watermarks) AS published,"
            " pg_total_relation_size('event_batches') AS events_total_bytes,"
            " pg_table_size('event_batches') AS events_heap_bytes,"
            " pg_indexes_size('event_batches') AS events_index_bytes,"
            " pg_total_relation_size('snapshots') AS snapshots_total_bytes,"
            " pg_database_size(current_database()) AS database_bytes,"
            " pg_current_wal_lsn()::text AS wal_lsn"
        )
    finally:
        await connection.close()
    assert row is not None
    return dict(row.items())


async def _stream_counters(nats_url: str) -> tuple[int, int]:
    connection = await nats.connect(nats_url, connect_timeout=5)
    try:
        info = await connection.jetstream().stream_info(EVENTS_STREAM)
    finally:
        await connection.close()
    return info.state.messages, info.state.bytes


def _stream_file_bytes(nats_store: Path) -> int:
    return sum(
        path.stat().st_size
        for directory in nats_store.rglob(EVENTS_STREAM)
        if directory.is_dir()
        for path in directory.rglob("*")
        if path.is_file()
    )


def _rss(pid: int) -> int:
    """Resident set size of a process (``VmRSS`` in ``/proc/<pid>/status``), 0 if gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def take(
    *,
    database_url: str,
    nats_url: str,
    nats_store: Path,
    components: Mapping[str, Sequence[int]],
) -> Probe:
    """Read every counter now. ``components``: pids by name (``ledger``, ``nats``, ...);
    the ledger's counts its reaped children (snapshot forks), Postgres its live ones."""
    cpu = _cpu.sample(components, with_children={"postgres"}, with_reaped=frozenset({"ledger"}))
    postgres = asyncio.run(_postgres_counters(database_url))
    messages, stream_bytes = asyncio.run(_stream_counters(nats_url))
    [ledger_pid] = components["ledger"]
    [nats_pid] = components["nats"]
    counters = msgspec.convert(
        postgres
        | {
            "stream_messages": messages,
            "stream_bytes": stream_bytes,
            "stream_file_bytes": _stream_file_bytes(nats_store),
            "ledger_rss_bytes": _rss(ledger_pid),
            "nats_rss_bytes": _rss(nats_pid),
        },
        Counters,
    )
    return Probe(counters, cpu, time.monotonic())


async def _drained(database_url: str, nats_url: str) -> tuple[int, int, int]:
    connection = await asyncpg.connect(database_url)
    try:
        events = await connection.fetchval(
            "SELECT coalesce(sum(last_seq), 0)::bigint FROM partition_leases"
        )
        published = await connection.fetchval(
            "SELECT coalesce(sum(published_seq), 0)::bigint FROM outbox_watermarks"
        )
    finally:
        await connection.close()
    messages, _ = await _stream_counters(nats_url)
    return int(events), int(published), messages


def wait_published(database_url: str, nats_url: str, deadline_s: float) -> int:
    """Wait until every event in the log is in the stream (the watermarks say so: they
    move only after JetStream acknowledged the events); return the number of events."""
    give_up_at = time.monotonic() + deadline_s
    while True:
        events, published, messages = asyncio.run(_drained(database_url, nats_url))
        if events == published and (messages > 0 or events == 0):
            return events
        if time.monotonic() > give_up_at:
            raise TimeoutError(
                f"relay not drained: {events} events, {published} published,"
                f" {messages} messages in the stream"
            )
        time.sleep(DRAIN_POLL_S)


async def _wal_lsn(database_url: str) -> str:
    connection = await asyncpg.connect(database_url)
    try:
        return str(await connection.fetchval("SELECT pg_current_wal_lsn()::text"))
    finally:
        await connection.close()


def wal_lsn(database_url: str) -> str:
    """Postgres's current WAL position (compare two with :func:`wal_diff`)."""
    return asyncio.run(_wal_lsn(database_url))


async def _wal_diff(database_url: str, after: str, before: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        value = await connection.fetchval(
            "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)", after, before
        )
    finally:
        await connection.close()
    return int(value)


def wal_diff(database_url: str, after: str, before: str) -> int:
    """WAL bytes written between two positions (``pg_wal_lsn_diff``)."""
    return asyncio.run(_wal_diff(database_url, after, before))


def wal_bytes(database_url: str, before: Probe, after: Probe) -> int:
    return wal_diff(database_url, after.counters.wal_lsn, before.counters.wal_lsn)
