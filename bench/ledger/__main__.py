"""``python -m bench.ledger``: see the package docstring, or ``--help``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench._workers import WorkerPool
from bench.ledger import _common, _cpu, _probe, _report
from bench.ledger._cluster import POSTGRES_SETTINGS, Cluster
from bench.ledger._common import (
    RESULTS_DIR,
    add_cluster_arguments,
    positive_ints,
    progress,
    split,
)
from bench.ledger._load import (
    WORKER_PROTOCOL,
    AnyJob,
    BaselineJob,
    JobResult,
    KeySpec,
    LedgerClosedJob,
    LedgerOpenJob,
    Window,
)

# Time between handing out a job and its start: workers connect (and the baseline opens
# its pool) meanwhile, so that every worker starts at the same instant.
JOB_LEAD_S = 1.5
# Most baseline connections in all (the embedded Postgres allows 200; the ledger has 16).
BASELINE_CONNECTIONS_MAX = 128
# Bound of the wait for the relay to publish the closed-loop runs' events.
RELAY_DRAIN_DEADLINE_S = 300.0
# Most open-loop pairs waiting per worker before new starts are dropped (and counted).
OPEN_LOOP_OUTSTANDING_MAX = 20_000
# Extra time allowed for a worker's result after the window ended.
RESULT_DEADLINE_S = 60.0
PARTITIONS_BUSY = 8
AMOUNT_MICROS = 1_000  # 0.1 cent per reserve and commit


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
        type=positive_ints,
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
    parser.add_argument(
        "--open-duration",
        type=float,
        default=None,
        help=(
            "measured seconds of the open-loop run (default: --duration). A minute or more"
            " lets autovacuum's work on the event log come and go as in a steady state"
            " (at half the peak it ran 37-38%% of a minute); a short run shows either"
            " the vacuum of the closed-loop runs' writes throughout, or none"
        ),
    )
    parser.add_argument(
        "--open-clients",
        type=int,
        default=1,
        help=(
            "load-generator processes of the open-loop run (at most --clients). One process"
            " sends 15-20k pairs/s with under half a core; every further one is another"
            " interpreter competing with the ledger for the same two cores, which shows in"
            " the p99 (15 vs 10 ms at 15,000 pairs/s with 2 vs 1)"
        ),
    )
    add_cluster_arguments(parser, replicas=True)
    parser.add_argument(
        "--skip",
        default="",
        help="runs to leave out, comma-separated: baseline, partitions, open",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-data", action="store_true", help="keep /tmp/spendgate-bench-*")
    args = parser.parse_args(argv)
    if args.open_duration is None:
        args.open_duration = args.duration
    elif args.open_duration <= 0:
        parser.error("--open-duration must be positive")
    if args.duration <= 0 or args.warmup < 0 or args.clients <= 0:
        parser.error("--duration and --clients must be positive, --warmup not negative")
    if not 0 < args.open_clients <= args.clients:
        parser.error("--open-clients must be between 1 and --clients")
    return args


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: Cluster, started: float) -> None:
        self.args = args
        self.cluster = cluster
        self.started = started
        self.workers: WorkerPool[AnyJob, JobResult] | None = None
        self.measurements: list[_report.Measurement] = []

    def progress(self, message: str) -> None:
        progress(message, started=self.started)

    def start_workers(self) -> None:
        self.workers = WorkerPool(self.args.clients, WORKER_PROTOCOL)

    def stop_workers(self) -> None:
        if self.workers is not None:
            self.workers.stop()

    @property
    def pool(self) -> WorkerPool[AnyJob, JobResult]:
        assert self.workers is not None, "start_workers() first"
        return self.workers

    def window(self, duration_s: float) -> Window:
        """The next run's window, of ``duration_s`` measured seconds."""
        # Every run starts with the kernel's write-back queue empty. Postgres extends its
        # files with zero pages and the kernel writes dirty pages back in bursts once they
        # are 30 s old (hundreds of MB on this machine's single virtual disk, during which
        # a WAL flush waits up to ~0.5 s): without this, a run pays for the writes of the
        # runs before it (the baseline's UPDATEs above all). Its own writes it pays for.
        os.sync()
        start_at = time.monotonic() + JOB_LEAD_S
        begin_at = start_at + self.args.warmup
        return Window(start_at, begin_at, begin_at + duration_s)

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
        components = self.cluster.process_ids()
        components["clients"] = self.pool.send(jobs)
        vacuum = _probe.AutovacuumWatch(self.cluster.database_url, window.begin_at, window.end_at)
        vacuum.start()
        time.sleep(max(0.0, window.begin_at - time.monotonic()))
        before = _cpu.sample(components, with_children={"postgres"})
        time.sleep(max(0.0, window.end_at - time.monotonic()))
        after = _cpu.sample(components, with_children={"postgres"})
        results = self.pool.collect(len(jobs), RESULT_DEADLINE_S)
        measured_s = round(window.end_at - window.begin_at, 6)
        measurement = _report.Measurement.of(
            kind,
            concurrency=concurrency,
            target_rate_per_s=target_rate_per_s,
            duration_s=measured_s,
            results=results,
            cores=_cpu.cores_used(before, after, measured_s),
            autovacuum=vacuum.result(RESULT_DEADLINE_S),
        )
        self.measurements.append(measurement)
        return measurement

    def ledger_closed(self, kind: str, keys: list[KeySpec], concurrency: int) -> None:
        window = self.window(self.args.duration)
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
            for share in split(concurrency, len(self.pool))
        ]
        measurement = self.run(kind, concurrency, jobs, window)
        self.progress(f"{kind}, {concurrency} outstanding: {measurement.summary()}")

    def baseline(self, concurrency: int) -> None:
        window = self.window(self.args.duration)
        pool_sizes = split(min(concurrency, BASELINE_CONNECTIONS_MAX), len(self.pool))
        shares = split(concurrency, len(pool_sizes))
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
        # The closed-loop runs leave the relay behind (it publishes to JetStream after the
        # commit, at its own pace): catching up would be counted as the open run's latency.
        waited_from = time.monotonic()
        events = _probe.wait_published(
            self.cluster.database_url, self.cluster.nats_server.url, RELAY_DRAIN_DEADLINE_S
        )
        self.progress(
            f"relay caught up ({events:,} events published) after"
            f" {time.monotonic() - waited_from:.1f} s"
        )
        window = self.window(self.args.open_duration)
        processes = self.args.open_clients
        jobs = [
            LedgerOpenJob(
                nats_url=self.cluster.nats_server.url,
                partition_count=self.cluster.partition_count,
                keys=keys,
                rate_per_s=rate_per_s / processes,
                outstanding_max=OPEN_LOOP_OUTSTANDING_MAX,
                amount_micros=AMOUNT_MICROS,
                inflight_max=self.args.client_inflight,
                window=window,
            )
            for _ in range(processes)
        ]
        measurement = self.run("open", 0, jobs, window, target_rate_per_s=round(rate_per_s, 1))
        self.progress(
            f"open loop at {rate_per_s:,.0f} pairs/s from {processes} load process(es):"
            f" {measurement.summary()}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    progress("starting NATS, Postgres (durable) and the ledger", started=started)
    postgres_overrides = POSTGRES_SETTINGS | dict(args.postgres_setting)
    cluster = Cluster.start(
        args.partitions,
        dict(args.ledger_env),
        postgres_overrides,
        nats_store_dir=args.nats_store_dir,
    )
    bench = Bench(args, cluster, started)
    try:
        cluster.start_ledgers(args.replicas)
        asyncio.run(cluster.create_baseline_table())
        hot_tenant = cluster.tenants_in_distinct_partitions(1, "bench-hot")
        busy_tenants = cluster.tenants_in_distinct_partitions(PARTITIONS_BUSY, "bench-busy")
        [hot_key] = asyncio.run(cluster.issue_keys(hot_tenant))
        busy_keys = asyncio.run(cluster.issue_keys(busy_tenants))
        postgres_settings = _common.postgres_settings(cluster.database_url)
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
            "open_duration_s": args.open_duration,
            "warmup_s": args.warmup,
            "levels": args.levels,
            "clients": args.clients,
            "open_loop_clients": args.open_clients,
            "client_inflight_per_partition": args.client_inflight,
            "partition_count": args.partitions,
            "replicas": args.replicas,
            "ledger_env": dict(args.ledger_env),
            "postgres_settings": postgres_overrides,
            "nats_store_dir": str(args.nats_store_dir or "(the run's temporary directory)"),
            "amount_micros": AMOUNT_MICROS,
            "baseline_connections_max": BASELINE_CONNECTIONS_MAX,
        },
        environment=_common.environment(postgres_settings),
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
