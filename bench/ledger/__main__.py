"""``python -m bench.ledger``: see the package docstring, or ``--help``."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import asyncpg

from bench.ledger import _cpu, _report
from bench.ledger._cluster import Cluster
from bench.ledger._load import (
    AnyJob,
    BaselineJob,
    JobResult,
    KeySpec,
    LedgerClosedJob,
    LedgerOpenJob,
    StopJob,
    Window,
    decode_result,
    encode,
    worker_main,
)

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
# Time between handing out a job and its start: workers connect (and the baseline opens
# its pool) meanwhile, so that every worker starts at the same instant.
JOB_LEAD_S = 1.5
# Most baseline connections in all (the embedded Postgres allows 200; the ledger has 16).
BASELINE_CONNECTIONS_MAX = 128
# Most open-loop pairs waiting per worker before new starts are dropped (and counted).
OPEN_LOOP_OUTSTANDING_MAX = 20_000
# Extra time allowed for a worker's result after the window ended.
RESULT_DEADLINE_S = 60.0
PARTITIONS_BUSY = 8
AMOUNT_MICROS = 1_000  # 0.1 cent per reserve and commit


def _positive_ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError("expected positive integers separated by commas")
    return values


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("SPENDGATE_"):
        raise argparse.ArgumentTypeError("expected SPENDGATE_NAME=value")
    return name, value


def _setting_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError("expected name=value")
    return name, value


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ledger",
        description=(
            "Ledger benchmark: reserve+commit pairs per second on one hot budget (and on 8"
            " partitions) against a real ledger process, embedded NATS and durable Postgres,"
            " next to a one-row conditional UPDATE baseline, plus the p99 at half the peak."
            " Prints a table; writes bench/results/ledger-<timestamp>.json and"
            " ledger-latest.json. Progress goes to stderr."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument(
        "--levels",
        type=_positive_ints,
        default=[16, 64, 256, 1024],
        help="outstanding pairs (and baseline requests) per closed-loop run, comma-separated",
    )
    parser.add_argument(
        "--partitions-concurrency",
        type=int,
        default=None,
        help="outstanding pairs of the 8-partition run (default: the largest level)",
    )
    parser.add_argument(
        "--open-rate",
        type=float,
        default=None,
        help="pairs/s of the open-loop run (default: half of the measured hot-budget peak)",
    )
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument(
        "--client-inflight",
        type=int,
        default=4,
        help="NATS requests in flight per partition per client (the gateway's default)",
    )
    parser.add_argument("--partitions", type=int, default=64, help="ledger partition count")
    parser.add_argument("--replicas", type=int, default=1, help="ledger processes (1 owns all)")
    parser.add_argument(
        "--ledger-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="SPENDGATE_NAME=value",
        help="extra ledger setting (repeatable), e.g. SPENDGATE_LEDGER_BATCH_COMMANDS_MAX=4096",
    )
    parser.add_argument(
        "--postgres-setting",
        type=_setting_pair,
        action="append",
        default=[],
        metavar="name=value",
        help=(
            "Postgres setting (repeatable) on top of the defaults"
            f" {', '.join(f'{k}={v}' for k, v in POSTGRES_SETTINGS.items())};"
            " fsync and synchronous_commit stay on unless set here"
        ),
    )
    parser.add_argument(
        "--skip",
        default="",
        help="runs to leave out, comma-separated: baseline, partitions, open",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-data", action="store_true", help="keep /tmp/spendgate-bench-*")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.clients <= 0:
        parser.error("--duration and --clients must be positive, --warmup not negative")
    return args


def _progress(message: str, *, started: float) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)


def _split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as whole numbers allow (zeros dropped)."""
    shares = [total // parts + (1 if index < total % parts else 0) for index in range(parts)]
    return [share for share in shares if share > 0]


@dataclass(slots=True)
class _Worker:
    process: BaseProcess
    connection: Connection


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: Cluster, started: float) -> None:
        self.args = args
        self.cluster = cluster
        self.started = started
        self.workers: list[_Worker] = []
        self.measurements: list[_report.Measurement] = []

    def progress(self, message: str) -> None:
        _progress(message, started=self.started)

    def start_workers(self) -> None:
        context = multiprocessing.get_context("spawn")
        for index in range(self.args.clients):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=worker_main, args=(child_end,), name=f"bench-client-{index}", daemon=True
            )
            process.start()
            child_end.close()
            self.workers.append(_Worker(process, parent_end))

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                worker.connection.send_bytes(encode(StopJob()))
        for worker in self.workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()

    def window(self) -> Window:
        start_at = time.monotonic() + JOB_LEAD_S
        begin_at = start_at + self.args.warmup
        return Window(start_at, begin_at, begin_at + self.args.duration)

    def run(
        self,
        kind: str,
        concurrency: int,
        jobs: Sequence[AnyJob],
        window: Window,
        *,
        target_rate_per_s: float | None = None,
    ) -> _report.Measurement:
        """Hand one job to each of the first ``len(jobs)`` workers; sample CPU; collect."""
        workers = self.workers[: len(jobs)]
        for worker, job in zip(workers, jobs, strict=True):
            worker.connection.send_bytes(encode(job))
        components = self.cluster.process_ids()
        components["clients"] = [w.process.pid for w in workers if w.process.pid is not None]
        time.sleep(max(0.0, window.begin_at - time.monotonic()))
        before = _cpu.sample(components, with_children={"postgres"})
        time.sleep(max(0.0, window.end_at - time.monotonic()))
        after = _cpu.sample(components, with_children={"postgres"})
        results: list[JobResult] = []
        for worker in workers:
            if not worker.connection.poll(RESULT_DEADLINE_S):
                raise TimeoutError(f"{worker.process.name} sent no result")
            results.append(decode_result(worker.connection.recv_bytes()))
        measurement = _report.Measurement.of(
            kind,
            concurrency=concurrency,
            target_rate_per_s=target_rate_per_s,
            duration_s=self.args.duration,
            results=results,
            cores=_cpu.cores_used(before, after, window.end_at - window.begin_at),
        )
        self.measurements.append(measurement)
        return measurement

    def ledger_closed(self, kind: str, keys: list[KeySpec], concurrency: int) -> None:
        window = self.window()
        jobs = [
            LedgerClosedJob(
                nats_url=self.cluster.nats_server.url,
                partition_count=self.cluster.partition_count,
                keys=keys,
                concurrency=share,
                amount_micros=AMOUNT_MICROS,
                inflight_max=self.args.client_inflight,
                window=window,
            )
            for share in _split(concurrency, len(self.workers))
        ]
        measurement = self.run(kind, concurrency, jobs, window)
        self.progress(f"{kind}, {concurrency} outstanding: {measurement.summary()}")

    def baseline(self, concurrency: int) -> None:
        window = self.window()
        pool_sizes = _split(min(concurrency, BASELINE_CONNECTIONS_MAX), len(self.workers))
        shares = _split(concurrency, len(pool_sizes))
        jobs = [
            BaselineJob(
                database_url=self.cluster.database_url,
                concurrency=share,
                pool_size=pool_size,
                amount_micros=AMOUNT_MICROS,
                window=window,
            )
            for share, pool_size in zip(shares, pool_sizes, strict=True)
        ]
        measurement = self.run("baseline", concurrency, jobs, window)
        self.progress(f"baseline UPDATE, {concurrency} outstanding: {measurement.summary()}")

    def ledger_open(self, keys: list[KeySpec], rate_per_s: float) -> None:
        window = self.window()
        jobs = [
            LedgerOpenJob(
                nats_url=self.cluster.nats_server.url,
                partition_count=self.cluster.partition_count,
                keys=keys,
                rate_per_s=rate_per_s / len(self.workers),
                outstanding_max=OPEN_LOOP_OUTSTANDING_MAX,
                amount_micros=AMOUNT_MICROS,
                inflight_max=self.args.client_inflight,
                window=window,
            )
            for _ in self.workers
        ]
        measurement = self.run("open", 0, jobs, window, target_rate_per_s=round(rate_per_s, 1))
        self.progress(f"open loop at {rate_per_s:,.0f} pairs/s: {measurement.summary()}")


async def _postgres_settings(database_url: str) -> dict[str, object]:
    connection = await asyncpg.connect(database_url)
    try:
        names = (
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "wal_sync_method",
            "wal_init_zero",
            "max_wal_size",
            "wal_buffers",
            "shared_buffers",
        )
        return {name: await connection.fetchval(f"SHOW {name}") for name in names}
    finally:
        await connection.close()


def _git_revision() -> str:
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return described.stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    _progress("starting NATS, Postgres (durable) and the ledger", started=started)
    postgres_overrides = POSTGRES_SETTINGS | dict(args.postgres_setting)
    cluster = Cluster.start(args.partitions, dict(args.ledger_env), postgres_overrides)
    bench = Bench(args, cluster, started)
    try:
        cluster.start_ledgers(args.replicas)
        asyncio.run(cluster.create_baseline_table())
        hot_tenant = cluster.tenants_in_distinct_partitions(1, "bench-hot")
        busy_tenants = cluster.tenants_in_distinct_partitions(PARTITIONS_BUSY, "bench-busy")
        [hot_key] = asyncio.run(cluster.issue_keys(hot_tenant))
        busy_keys = asyncio.run(cluster.issue_keys(busy_tenants))
        postgres_settings = asyncio.run(_postgres_settings(cluster.database_url))
        bench.progress(f"postgres: {postgres_settings}")
        bench.start_workers()
        for level in args.levels:
            bench.ledger_closed("hot", [hot_key], level)
            if "baseline" not in skip:
                bench.baseline(level)
        if "partitions" not in skip:
            bench.ledger_closed(
                "partitions", busy_keys, args.partitions_concurrency or max(args.levels)
            )
        hot_runs = [m for m in bench.measurements if m.kind == "hot"]
        if "open" not in skip:
            rate = args.open_rate or max(m.throughput_per_s for m in hot_runs) / 2
            bench.ledger_open([hot_key], rate)
        state = asyncio.run(cluster.query_key(hot_key))
        hot_pairs = sum(m.completed_total for m in bench.measurements if m.kind in ("hot", "open"))
        checks: dict[str, object] = {
            "hot_key_reserved_micros": state.reserved_micros,
            "hot_key_committed_micros": state.committed_micros,
            "hot_key_expected_committed_micros": hot_pairs * AMOUNT_MICROS,
            "consistent": state.reserved_micros == 0
            and state.committed_micros == hot_pairs * AMOUNT_MICROS,
        }
    finally:
        bench.stop_workers()
        cluster.close(keep_data=args.keep_data)
    verdict = _report.acceptance(bench.measurements)
    print(_report.table(bench.measurements, verdict))
    report = _report.Report(
        started_at=started_at,
        settings={
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "levels": args.levels,
            "clients": args.clients,
            "client_inflight_per_partition": args.client_inflight,
            "partition_count": args.partitions,
            "replicas": args.replicas,
            "ledger_env": dict(args.ledger_env),
            "postgres_settings": postgres_overrides,
            "amount_micros": AMOUNT_MICROS,
            "baseline_connections_max": BASELINE_CONNECTIONS_MAX,
        },
        environment={
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "git": _git_revision(),
            "postgres": postgres_settings,
        },
        measurements=bench.measurements,
        acceptance=verdict,
        checks=checks,
    )
    path = _report.write(report, args.results_dir)
    print(f"consistency check: {'ok' if checks['consistent'] else 'FAILED'} {checks}")
    print(f"results: {path}")
    return 0 if checks["consistent"] else 1


if __name__ == "__main__":
    sys.exit(main())
