"""``python -m bench.auditor``: see the package docstring, or ``--help``."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats

from bench._results import RESULTS_DIR, write_results
from bench.auditor._events import partition_events
from spendgate_cli.embedded import EmbeddedNats, EmbeddedPostgres
from spendgate_cli.services import ServiceProcess, service_argv
from spendgate_common.event_batches import COLUMNS, batch_row
from spendgate_common.event_messages_v2 import (
    StreamedEvent,
    encode_events,
    message_headers,
    split_runs,
)
from spendgate_common.events_v1 import encode_event
from spendgate_common.limits import EVENT_MESSAGE_EVENTS_MAX
from spendgate_common.migrate import apply_migrations
from spendgate_common.nats_adapter import ensure_events_stream
from spendgate_common.subjects import FINANCE_STREAM, events_subject
from spendgate_ledger._store import EventRow

# The acceptance criterion (issue 5, item 7).
CATCH_UP_S_MAX = 30.0
DATABASE = "spendgate"
PUBLISH_WINDOW = 2_000
POLL_INTERVAL_S = 0.05
CATCH_UP_DEADLINE_S = 600.0


class Result(msgspec.Struct, frozen=True):
    events: int
    partitions: int
    events_per_message: int
    fetch_messages_max: int
    catch_up_s: float
    events_per_s: float
    start_to_first_chain_s: float
    finance_events: int
    checkpoints: int
    rollup_rows: int
    passed: bool
    machine: dict[str, Any]
    started_at: str


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.auditor",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--fetch-messages-max", type=int, default=512)
    parser.add_argument(
        "--events-per-message",
        type=int,
        default=1,
        choices=range(1, EVENT_MESSAGE_EVENTS_MAX + 1),
        metavar=f"1..{EVENT_MESSAGE_EVENTS_MAX}",
        help="events per stream message, as the ledger's appended batches carry them: 1 is"
        " a thinly spread fleet (every append one event), the worst case for the auditor;"
        f" {EVENT_MESSAGE_EVENTS_MAX} a hot partition",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def progress(message: str, started: float) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)


async def load(
    database_url: str, nats_url: str, events: int, partitions: int, events_per_message: int
) -> None:
    """Fill the event log (COPY) and the stream (windows of async publishes of version 2
    messages, ``events_per_message`` events each)."""
    connection: asyncpg.Connection[Any] = await asyncpg.connect(database_url)
    client = await nats.connect(nats_url)
    try:
        await apply_migrations(connection)
        jetstream = client.jetstream()
        await ensure_events_stream(jetstream)
        per_partition = [
            events // partitions + (p < events % partitions) for p in range(partitions)
        ]
        for partition, count in enumerate(per_partition):
            bodies = [encode_event(event) for event in partition_events(partition, count)]
            rows = [EventRow(seq, "x", body) for seq, body in enumerate(bodies, 1)]
            # One batch per message, as the ledger appends and the relay publishes them.
            runs = list(split_runs(rows, events_max=events_per_message))
            await connection.copy_records_to_table(
                "event_batches",
                columns=COLUMNS,
                records=[
                    batch_row(partition, 1, run[0].seq, ["x"] * len(run), [r.body for r in run])
                    for run in runs
                ],
            )
            for start in range(0, len(runs), PUBLISH_WINDOW):
                acks = []
                for run in runs[start : start + PUBLISH_WINDOW]:
                    headers = message_headers(partition, run[0].seq, run[-1].seq)
                    body = encode_events([StreamedEvent(r.seq, msgspec.Raw(r.body)) for r in run])
                    acks.append(
                        await jetstream.publish_async(
                            events_subject(partition), body, headers=headers
                        )
                    )
                await asyncio.gather(*acks)
    finally:
        await client.close()
        await connection.close()


async def time_catch_up(
    database_url: str, nats_url: str, args: argparse.Namespace, started: float
) -> Result:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_")},
        "SPENDGATE_DATABASE_URL": database_url,
        "SPENDGATE_NATS_URL": nats_url,
        "SPENDGATE_PARTITION_COUNT": str(args.partitions),
        "SPENDGATE_AUDITOR_FETCH_MESSAGES_MAX": str(args.fetch_messages_max),
        "SPENDGATE_AUDITOR_ACK_PENDING_MAX": str(max(4_096, 2 * args.fetch_messages_max)),
        "PYTHONUNBUFFERED": "1",
    }
    connection: asyncpg.Connection[Any] = await asyncpg.connect(database_url)
    log_path = Path(tempfile.gettempdir()) / "spendgate-bench-auditor.log"
    t0 = time.monotonic()
    auditor = ServiceProcess.spawn("auditor", service_argv("auditor"), env, log_path)
    first_chain_s = 0.0
    try:
        while True:
            chained = await connection.fetchval("SELECT coalesce(sum(seq), 0) FROM audit_heads")
            if chained and not first_chain_s:
                first_chain_s = time.monotonic() - t0
            pending = await connection.fetchval("SELECT count(*) FROM audit_finance_outbox")
            if chained >= args.events and pending == 0:
                break
            if not auditor.is_running:
                raise RuntimeError(f"the auditor exited:\n{auditor.log_tail()}")
            if time.monotonic() - t0 > CATCH_UP_DEADLINE_S:
                raise TimeoutError(f"not caught up: {chained} of {args.events}")
            await asyncio.sleep(POLL_INTERVAL_S)
        catch_up_s = time.monotonic() - t0
        progress(f"caught up in {catch_up_s:.2f} s", started)
        checkpoints = await connection.fetchval("SELECT count(*) FROM audit_checkpoints")
        rollup_rows = await connection.fetchval("SELECT count(*) FROM audit_rollups")
    finally:
        auditor.terminate(20.0)
        await connection.close()
    client = await nats.connect(nats_url)
    try:
        finance = (await client.jetstream().stream_info(FINANCE_STREAM)).state.messages
    finally:
        await client.close()
    return Result(
        events=args.events,
        partitions=args.partitions,
        events_per_message=args.events_per_message,
        fetch_messages_max=args.fetch_messages_max,
        catch_up_s=round(catch_up_s, 3),
        events_per_s=round(args.events / catch_up_s, 1),
        start_to_first_chain_s=round(first_chain_s, 3),
        finance_events=finance,
        checkpoints=checkpoints,
        rollup_rows=rollup_rows,
        passed=catch_up_s < CATCH_UP_S_MAX,
        machine={
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def print_table(result: Result) -> None:
    rows = [
        ("events", f"{result.events:,}"),
        ("partitions", str(result.partitions)),
        ("events per message", str(result.events_per_message)),
        ("batch (fetch) size", f"{result.fetch_messages_max} messages"),
        ("catch-up time", f"{result.catch_up_s:.2f} s (limit {CATCH_UP_S_MAX:.0f} s)"),
        ("throughput", f"{result.events_per_s:,.0f} events/s"),
        ("process start to first link", f"{result.start_to_first_chain_s:.2f} s"),
        ("finance events published", f"{result.finance_events:,}"),
        ("signed checkpoints", f"{result.checkpoints:,}"),
        ("rollup rows", f"{result.rollup_rows:,}"),
        ("cores", str(result.machine["cores"])),
        ("verdict", "PASS" if result.passed else "FAIL"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="spendgate-bench-"))
    nats_server = EmbeddedNats(root / "nats")
    postgres = EmbeddedPostgres(root / "postgres", durable=True)
    try:
        nats_server.start()
        postgres.start()
        postgres.create_database(DATABASE)
        database_url = postgres.url(DATABASE)
        progress(f"loading {args.events:,} events into Postgres and JetStream", started)
        asyncio.run(
            load(
                database_url,
                nats_server.url,
                args.events,
                args.partitions,
                args.events_per_message,
            )
        )
        progress("starting the auditor", started)
        result = asyncio.run(time_catch_up(database_url, nats_server.url, args, started))
    finally:
        postgres.stop()
        nats_server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print_table(result)
    write_results(result, args.results_dir, "auditor")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
