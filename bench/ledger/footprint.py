"""``python -m bench.ledger.footprint``: what a reservation costs in bytes, memory and time.

The sizing figures of docs/deploy.md, measured against the same system as the throughput
benchmark (embedded NATS with JetStream, durable Postgres, one real ``python -m
spendgate_ledger`` process, load-generator processes using the gateway's client):

* **growth**: N reserve+commit pairs on a few keys (one partition each), once without
  idempotency keys (the ledger remembers each settled reservation id) and once, on a
  fresh system, with a new idempotency key per reserve (it also remembers each answer).
  Probes before and after (once the relay has published everything) give Postgres table
  and index bytes of ``events`` and ``snapshots``, WAL bytes (``pg_wal_lsn_diff``),
  JetStream bytes of ``SPENDGATE_EVENTS``, the RSS of the ledger and NATS processes, and
  CPU seconds of ledger (snapshot forks included), NATS and Postgres, per pair and event;
* **replay**: a partition with one snapshot interval of events (50,000 by default) is
  recovered by the ledger's own ``StateLoader``, in-process: from the log alone, from
  its snapshot, and (after another interval) from the older snapshot plus a full
  interval of log: the replay part of a takeover. The state's heap size is measured too;
* **spread**: open loop at fixed rates over keys in every partition (a few pairs per
  second per partition, as production spreads tenants), for the CPU per pair when batches
  are small.

CPU seconds and bytes do not depend much on other load on the machine; wall-clock rates
and replay times do (they are reported, with that caveat). Prints a table and writes
``bench/results/footprint-<timestamp>.json`` and ``footprint-latest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from bench._results import write_results
from bench._workers import WorkerPool
from bench.ledger import _common, _cpu, _probe, _report
from bench.ledger._cluster import POSTGRES_SETTINGS, Cluster
from bench.ledger._common import (
    RESULTS_DIR,
    add_cluster_arguments,
    progress,
    split,
)
from bench.ledger._load import (
    WORKER_PROTOCOL,
    AnyJob,
    JobResult,
    KeySpec,
    LedgerCountJob,
    LedgerOpenJob,
    Window,
)
from bench.ledger._replay import Replayer, Snapshot, StateSize, Timing
from spendgate_common.partitioning import partition_for_tenant

AMOUNT_MICROS = 1_000
# Time between handing out an open-loop job and its start (workers connect meanwhile).
JOB_LEAD_S = 1.5
# Bound of the wait for the relay to publish every event, and for a snapshot to appear.
DRAIN_DEADLINE_S = 300.0
SNAPSHOT_DEADLINE_S = 120.0
# Most open-loop pairs waiting per worker before new starts are dropped (and counted).
OPEN_LOOP_OUTSTANDING_MAX = 20_000
# A worker's result may take this long after its job ended (open loop), or this long
# per 1,000 pairs plus the former (counted jobs: they end when their pairs are done).
RESULT_DEADLINE_S = 60.0
RESULT_DEADLINE_S_PER_1000_PAIRS = 2.0
STEPS = ("plain", "idempotent", "replay", "spread")
SNAPSHOT_EVERY_SETTING = "SPENDGATE_LEDGER_SNAPSHOT_EVERY_EVENTS"


def _spread_runs(text: str) -> list[tuple[int, int]]:
    runs = []
    for part in text.split(","):
        keys, sep, rate = part.strip().partition("@")
        if not sep or not keys.isdigit() or not rate.isdigit() or int(keys) * int(rate) == 0:
            raise argparse.ArgumentTypeError("expected KEYS@RATE pairs, e.g. 64@1000,8@3000")
        runs.append((int(keys), int(rate)))
    return runs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ledger.footprint",
        description=(
            "What a reserve+commit pair costs: Postgres table, index and WAL bytes, JetStream"
            " bytes, ledger and NATS memory (with and without idempotency keys), CPU per"
            " pair, and the time to recover a partition from its log and snapshots. Against"
            " a real ledger process, embedded NATS and durable Postgres. Prints a table;"
            " writes bench/results/footprint-<timestamp>.json and footprint-latest.json."
            " Progress goes to stderr."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--pairs", type=int, default=200_000, help="pairs per growth run")
    parser.add_argument("--keys", type=int, default=4, help="keys (one partition each)")
    parser.add_argument("--concurrency", type=int, default=512, help="outstanding pairs")
    parser.add_argument(
        "--warmup-pairs", type=int, default=4_000, help="pairs before the first probe"
    )
    parser.add_argument(
        "--snapshot-every",
        type=int,
        default=50_000,
        help=f"the ledger's {SNAPSHOT_EVERY_SETTING}, and the replayed log's length",
    )
    parser.add_argument("--replay-repeats", type=int, default=3, help="loads per replay case")
    parser.add_argument(
        "--spread",
        type=_spread_runs,
        default="64@250,64@1000,16@2500,8@3000",
        metavar="KEYS@RATE,...",
        help=(
            "open-loop runs: RATE pairs/s over KEYS keys in as many partitions, from a few"
            " pairs/s per partition (production spreads tenants thinly) to a busy one; the"
            " faster runs may saturate a small machine (see their p50 and 'other')"
        ),
    )
    parser.add_argument("--spread-duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--spread-warmup", type=float, default=2.0, help="unmeasured seconds")
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds after the drain (snapshots finish)"
    )
    add_cluster_arguments(parser, replicas=False)
    parser.add_argument(
        "--skip",
        default="",
        help=(
            "steps to leave out, comma-separated: plain (growth without idempotency keys),"
            " idempotent (growth with), replay, spread"
        ),
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-data", action="store_true", help="keep /tmp/spendgate-bench-*")
    args = parser.parse_args(argv)
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    if not skip <= set(STEPS):
        parser.error(f"--skip takes {', '.join(STEPS)}")
    args.skip = skip
    if min(args.pairs, args.keys, args.concurrency, args.clients, args.replay_repeats) <= 0:
        parser.error("--pairs, --keys, --concurrency, --clients, --replay-repeats must be > 0")
    if args.keys + 1 > args.partitions or max(k for k, _ in args.spread) > args.partitions:
        parser.error("--keys + 1 and the keys of --spread must not exceed --partitions")
    if args.snapshot_every < 2 or args.warmup_pairs < 0:
        parser.error("--snapshot-every must be at least 2, --warmup-pairs not negative")
    if any(name == SNAPSHOT_EVERY_SETTING for name, _ in args.ledger_env):
        parser.error(f"set {SNAPSHOT_EVERY_SETTING} with --snapshot-every")
    return args


# ----------------------------------------------------------------------------- results


class Growth(msgspec.Struct, frozen=True):
    """What ``pairs`` reserve+commit pairs added (after-probe minus before-probe).

    ``per_pair`` and ``per_event`` divide the byte and CPU deltas; the RSS deltas are of
    the live processes (allocator slack included). ``pairs_per_s`` is wall-clock and moves
    with other load on the machine.
    """

    variant: str
    idempotency_keys: bool
    keys: int
    concurrency: int
    pairs: int
    events: int
    errors: int
    denied: int
    first_error: str | None
    wall_s: float
    pairs_per_s: float
    deltas: dict[str, int]
    cpu_s: dict[str, float]
    per_pair: dict[str, float]
    per_event: dict[str, float]
    before: _probe.Counters
    after: _probe.Counters


class Replay(msgspec.Struct, frozen=True):
    variant: str
    idempotency_keys: bool
    partition: int
    timings: list[Timing]
    snapshots: list[Snapshot]
    state: StateSize


class Spread(msgspec.Struct, frozen=True):
    """An open-loop run over ``keys`` partitions; ``cpu_us_per_pair`` by component."""

    keys: int
    pairs_per_s_per_partition: float
    measurement: _report.Measurement
    cpu_us_per_pair: dict[str, float]
    # WAL written during the window per pair finished in it (small batches: more commits).
    wal_bytes_per_pair: float


class Derived(msgspec.Struct, frozen=True):
    """Per remembered item, from the two growth runs (None when one of them is missing)."""

    rss_bytes_per_settled_id: float | None
    rss_bytes_per_answer: float | None
    heap_bytes_per_settled_id: float | None
    heap_bytes_per_answer: float | None
    snapshot_bytes_per_settled_id: float | None
    snapshot_bytes_per_answer: float | None


class FootprintReport(msgspec.Struct, frozen=True):
    started_at: str
    settings: dict[str, object]
    environment: dict[str, object]
    growth: list[Growth]
    replay: list[Replay]
    # Cores used by each component with no load, before the spread runs.
    idle_cores: dict[str, float]
    spread: list[Spread]
    derived: Derived


# ----------------------------------------------------------------------------- the runs


@dataclass(slots=True)
class Footprint:
    args: argparse.Namespace
    cluster: Cluster
    workers: WorkerPool[AnyJob, JobResult]
    started: float

    def progress(self, message: str) -> None:
        progress(message, started=self.started)

    def components(self) -> dict[str, list[int]]:
        return self.cluster.process_ids() | {"clients": self.workers.pids}

    def probe(self) -> _probe.Probe:
        return _probe.take(
            database_url=self.cluster.database_url,
            nats_url=self.cluster.nats_server.url,
            nats_store=self.cluster.nats_server.data_dir,
            components=self.components(),
        )

    def wait_published(self) -> int:
        return _probe.wait_published(
            self.cluster.database_url, self.cluster.nats_server.url, DRAIN_DEADLINE_S
        )

    def run_pairs(self, keys: list[KeySpec], pairs: int, *, idempotency_keys: bool) -> JobResult:
        """``pairs`` reserve+commit pairs on ``keys``, split over the workers; the sum."""
        shares = split(pairs, len(self.workers))
        concurrency = split(self.args.concurrency, len(shares))
        jobs = [
            LedgerCountJob(
                nats_url=self.cluster.nats_server.url,
                partition_count=self.cluster.partition_count,
                keys=keys,
                pairs=share,
                concurrency=outstanding,
                amount_micros=AMOUNT_MICROS,
                inflight_max=self.args.client_inflight,
                idempotency_keys=idempotency_keys,
            )
            for share, outstanding in zip(shares, concurrency, strict=True)
        ]
        self.workers.send(jobs)
        deadline_s = RESULT_DEADLINE_S + pairs / 1000 * RESULT_DEADLINE_S_PER_1000_PAIRS
        results = self.workers.collect(len(jobs), deadline_s)
        errors = [result.first_error for result in results if result.first_error]
        return JobResult(
            completed=sum(result.completed for result in results),
            completed_total=sum(result.completed_total for result in results),
            denied=sum(result.denied for result in results),
            errors=sum(result.errors for result in results),
            first_error=errors[0] if errors else None,
        )

    def growth(self, variant: str, keys: list[KeySpec], *, idempotency_keys: bool) -> Growth:
        args = self.args
        if args.warmup_pairs:
            self.run_pairs(keys, args.warmup_pairs, idempotency_keys=idempotency_keys)
        self.wait_published()
        before = self.probe()
        self.progress(f"{variant}: {args.pairs:,} pairs on {len(keys)} keys")
        result = self.run_pairs(keys, args.pairs, idempotency_keys=idempotency_keys)
        wall_s = time.monotonic() - before.at
        events = self.wait_published()
        time.sleep(args.settle)
        after = self.probe()
        wal = _probe.wal_bytes(self.cluster.database_url, before, after)
        deltas = {
            name: getattr(after.counters, name) - getattr(before.counters, name)
            for name in (
                "events",
                "events_total_bytes",
                "events_heap_bytes",
                "events_index_bytes",
                "snapshots_total_bytes",
                "database_bytes",
                "stream_messages",
                "stream_bytes",
                "stream_file_bytes",
                "ledger_rss_bytes",
                "nats_rss_bytes",
            )
        } | {"wal_bytes": wal}
        cpu_s = {
            name: round(spent, 3)
            for name, spent in _cpu.seconds_used(before.cpu, after.cpu).items()
            if name not in ("machine", "steal")
        }
        pairs = result.completed_total
        new_events = deltas["events"]
        if not pairs or not new_events:
            raise RuntimeError(f"{variant}: no pair completed ({result.first_error})")
        per_pair = {name: round(value / pairs, 1) for name, value in deltas.items()}
        per_pair |= {f"{name}_cpu_us": round(s * 1e6 / pairs, 1) for name, s in cpu_s.items()}
        per_event = {
            name: round(deltas[name] / new_events, 1)
            for name in (
                "events_total_bytes",
                "events_heap_bytes",
                "events_index_bytes",
                "wal_bytes",
                "stream_bytes",
                "stream_file_bytes",
                "nats_rss_bytes",
            )
        }
        growth = Growth(
            variant=variant,
            idempotency_keys=idempotency_keys,
            keys=len(keys),
            concurrency=args.concurrency,
            pairs=pairs,
            events=new_events,
            errors=result.errors,
            denied=result.denied,
            first_error=result.first_error,
            wall_s=round(wall_s, 2),
            pairs_per_s=round(pairs / wall_s, 1),
            deltas=deltas,
            cpu_s=cpu_s,
            per_pair=per_pair,
            per_event=per_event,
            before=before.counters,
            after=after.counters,
        )
        self.progress(
            f"{variant}: {pairs:,} pairs, {new_events:,} events ({events:,} in the log),"
            f" errors {result.errors}; per pair: events {per_pair['events_total_bytes']:.0f} B,"
            f" WAL {per_pair['wal_bytes']:.0f} B, stream {per_pair['stream_bytes']:.0f} B,"
            f" ledger RSS {per_pair['ledger_rss_bytes']:.0f} B,"
            f" ledger {per_pair['ledger_cpu_us']:.0f} us"
        )
        return growth

    def wait_snapshot(self, partition: int, above_seq: int) -> Snapshot:
        """The newest snapshot of ``partition`` once one above ``above_seq`` is stored."""
        give_up_at = time.monotonic() + SNAPSHOT_DEADLINE_S
        while True:
            found = asyncio.run(_snapshots(self, partition))
            newer = [snapshot for snapshot in found if snapshot.seq > above_seq]
            if newer:
                return newer[-1]
            if time.monotonic() > give_up_at:
                raise TimeoutError(f"partition {partition}: no snapshot after seq {above_seq}")
            time.sleep(0.25)

    def replay(self, variant: str, key: KeySpec, *, idempotency_keys: bool) -> Replay:
        """Fill a fresh partition with one snapshot interval of events, time its recovery
        (log only, snapshot), add another interval, time the older snapshot + that tail."""
        args = self.args
        partition = partition_for_tenant(key.tenant, self.cluster.partition_count)
        stage_pairs = math.ceil(args.snapshot_every / 2)
        replayer_args = (self.cluster.database_url, self.cluster.partition_count)
        self.progress(f"replay ({variant}): {stage_pairs:,} pairs into partition {partition}")
        self.run_pairs([key], stage_pairs, idempotency_keys=idempotency_keys)
        self.wait_published()
        first = self.wait_snapshot(partition, 0)

        async def stage_one() -> list[Timing]:
            replayer = await Replayer.connect(*replayer_args, args.snapshot_every)
            try:
                return [
                    await replayer.time_load(
                        "log only", partition, snapshots_up_to=0, repeats=args.replay_repeats
                    ),
                    await replayer.time_load(
                        "snapshot", partition, snapshots_up_to=None, repeats=args.replay_repeats
                    ),
                ]
            finally:
                await replayer.close()

        timings = asyncio.run(stage_one())
        for timing in timings:
            self.progress(f"replay ({variant}): {_timing_line(timing)}")
        self.run_pairs([key], stage_pairs, idempotency_keys=idempotency_keys)
        self.wait_published()
        self.wait_snapshot(partition, first.seq)

        async def stage_two() -> tuple[Timing, StateSize, list[Snapshot]]:
            replayer = await Replayer.connect(*replayer_args, args.snapshot_every)
            try:
                timing = await replayer.time_load(
                    "snapshot + tail",
                    partition,
                    snapshots_up_to=first.seq,
                    repeats=args.replay_repeats,
                )
                size = await replayer.state_size(partition)
                return timing, size, await replayer.snapshots(partition)
            finally:
                await replayer.close()

        tail, size, snapshots = asyncio.run(stage_two())
        self.progress(f"replay ({variant}): {_timing_line(tail)}")
        self.progress(
            f"replay ({variant}): state {size.heap_bytes:,} heap bytes for"
            f" {size.remembered_answers:,} answers and {size.settled_ids:,} settled ids"
        )
        return Replay(
            variant, idempotency_keys, partition, [*timings, tail], [first, *snapshots[-1:]], size
        )

    def idle(self) -> dict[str, float]:
        """Cores each component uses with no load (lease rounds, heartbeats, sweeps)."""
        before = _cpu.sample(
            self.components(), with_children={"postgres"}, with_reaped=frozenset({"ledger"})
        )
        time.sleep(self.args.spread_duration)
        after = _cpu.sample(
            self.components(), with_children={"postgres"}, with_reaped=frozenset({"ledger"})
        )
        cores = _cpu.cores_used(before, after, self.args.spread_duration)
        self.progress(f"idle, {self.cluster.partition_count} partitions owned: cores {cores}")
        return cores

    def spread(self, keys: list[KeySpec], rate_per_s: int) -> Spread:
        args = self.args
        start_at = time.monotonic() + JOB_LEAD_S
        begin_at = start_at + args.spread_warmup
        window = Window(start_at, begin_at, begin_at + args.spread_duration)
        jobs = [
            LedgerOpenJob(
                nats_url=self.cluster.nats_server.url,
                partition_count=self.cluster.partition_count,
                keys=keys,
                rate_per_s=rate_per_s / len(self.workers),
                outstanding_max=OPEN_LOOP_OUTSTANDING_MAX,
                amount_micros=AMOUNT_MICROS,
                inflight_max=args.client_inflight,
                window=window,
            )
            for _ in range(len(self.workers))
        ]
        components = self.components()
        components["clients"] = self.workers.send(jobs)
        time.sleep(max(0.0, window.begin_at - time.monotonic()))
        before = _cpu.sample(
            components, with_children={"postgres"}, with_reaped=frozenset({"ledger"})
        )
        lsn_before = _probe.wal_lsn(self.cluster.database_url)
        time.sleep(max(0.0, window.end_at - time.monotonic()))
        after = _cpu.sample(
            components, with_children={"postgres"}, with_reaped=frozenset({"ledger"})
        )
        lsn_after = _probe.wal_lsn(self.cluster.database_url)
        results = self.workers.collect(len(jobs), RESULT_DEADLINE_S)
        wal = _probe.wal_diff(self.cluster.database_url, lsn_after, lsn_before)
        measurement = _report.Measurement.of(
            "spread",
            concurrency=0,
            target_rate_per_s=float(rate_per_s),
            duration_s=args.spread_duration,
            results=results,
            cores=_cpu.cores_used(before, after, window.end_at - window.begin_at),
        )
        throughput = measurement.throughput_per_s
        per_pair = {
            name: round(used * 1e6 / throughput, 1) if throughput else 0.0
            for name, used in measurement.cores.items()
            if name in ("ledger", "nats", "postgres", "clients")
        }
        self.progress(
            f"spread over {len(keys)} partitions at {rate_per_s:,}/s: {measurement.summary()};"
            f" us/pair {per_pair}"
        )
        pairs = throughput * args.spread_duration
        return Spread(
            keys=len(keys),
            pairs_per_s_per_partition=round(rate_per_s / len(keys), 1),
            measurement=measurement,
            cpu_us_per_pair=per_pair,
            wal_bytes_per_pair=round(wal / pairs, 1) if pairs else 0.0,
        )


async def _snapshots(footprint: Footprint, partition: int) -> list[Snapshot]:
    replayer = await Replayer.connect(
        footprint.cluster.database_url,
        footprint.cluster.partition_count,
        footprint.args.snapshot_every,
    )
    try:
        return await replayer.snapshots(partition)
    finally:
        await replayer.close()


def _timing_line(timing: Timing) -> str:
    return (
        f"{timing.case}: snapshot at {timing.snapshot_seq:,} + {timing.events_replayed:,}"
        f" events ({timing.remembered_answers:,} answers, {timing.settled_ids:,} settled ids)"
        f" in {timing.wall_ms:,.0f} ms wall, {timing.cpu_ms:,.0f} ms CPU"
    )


def _derive(growth: list[Growth], replay: list[Replay]) -> Derived:
    plain = next((g for g in growth if not g.idempotency_keys), None)
    keyed = next((g for g in growth if g.idempotency_keys), None)
    rss_settled = rss_answer = None
    if plain is not None:
        rss_settled = plain.per_pair["ledger_rss_bytes"]
        if keyed is not None:
            rss_answer = round(keyed.per_pair["ledger_rss_bytes"] - rss_settled, 1)
    heap_settled = heap_answer = snap_settled = snap_answer = None
    plain_replay = next((r for r in replay if not r.idempotency_keys), None)
    keyed_replay = next((r for r in replay if r.idempotency_keys), None)
    if plain_replay is not None and plain_replay.state.settled_ids:
        heap_settled = round(plain_replay.state.heap_bytes / plain_replay.state.settled_ids, 1)
        newest = plain_replay.snapshots[-1]
        snap_settled = round(newest.body_bytes / plain_replay.state.settled_ids, 1)
        if keyed_replay is not None and keyed_replay.state.remembered_answers:
            state = keyed_replay.state
            heap_answer = round(
                (state.heap_bytes - heap_settled * state.settled_ids) / state.remembered_answers, 1
            )
            body = keyed_replay.snapshots[-1].body_bytes
            snap_answer = round(
                (body - snap_settled * state.settled_ids) / state.remembered_answers, 1
            )
    return Derived(rss_settled, rss_answer, heap_settled, heap_answer, snap_settled, snap_answer)


# ----------------------------------------------------------------------------- report


def table(report: FootprintReport) -> str:
    lines: list[str] = []
    if report.growth:
        lines.append("growth per reserve+commit pair (2 events per pair)")
        lines.append(f"{'':44}" + "".join(f"{g.variant:>24}" for g in report.growth))
        rows: list[tuple[str, str, str]] = [
            ("pairs (errors)", "pairs", ""),
            ("event log + indexes, bytes/event", "events_total_bytes", "event"),
            ("  heap and TOAST, bytes/event", "events_heap_bytes", "event"),
            ("  indexes, bytes/event", "events_index_bytes", "event"),
            ("event log + indexes, bytes/pair", "events_total_bytes", "pair"),
            ("snapshots table growth, bytes/pair", "snapshots_total_bytes", "pair"),
            ("database growth, bytes/pair", "database_bytes", "pair"),
            ("WAL, bytes/pair", "wal_bytes", "pair"),
            ("JetStream (stream state), bytes/event", "stream_bytes", "event"),
            ("JetStream (files), bytes/event", "stream_file_bytes", "event"),
            ("ledger RSS growth, bytes/pair", "ledger_rss_bytes", "pair"),
            ("NATS RSS growth, bytes/event", "nats_rss_bytes", "event"),
            ("ledger RSS before, MB", "ledger_rss_before", ""),
            ("ledger CPU (with snapshot forks), us/pair", "ledger_cpu_us", "pair"),
            ("NATS CPU, us/pair", "nats_cpu_us", "pair"),
            ("Postgres CPU, us/pair", "postgres_cpu_us", "pair"),
            ("load generators CPU, us/pair", "clients_cpu_us", "pair"),
            ("pairs/s (wall clock: noisy)", "pairs_per_s", ""),
        ]
        for label, name, unit in rows:
            cells = []
            for g in report.growth:
                if name == "pairs":
                    cells.append(f"{g.pairs:,} ({g.errors})")
                elif name == "pairs_per_s":
                    cells.append(f"{g.pairs_per_s:,.0f}")
                elif name == "ledger_rss_before":
                    cells.append(f"{g.before.ledger_rss_bytes / 1e6:,.1f}")
                else:
                    value = (g.per_event if unit == "event" else g.per_pair).get(name, math.nan)
                    cells.append(f"{value:,.1f}")
            lines.append(f"{label:44}" + "".join(f"{cell:>24}" for cell in cells))
    d = report.derived
    lines.append("remembered per reservation (ledger memory):")
    lines.append(
        f"  settled id: RSS {_num(d.rss_bytes_per_settled_id)} B,"
        f" heap {_num(d.heap_bytes_per_settled_id)} B,"
        f" snapshot {_num(d.snapshot_bytes_per_settled_id)} B"
    )
    lines.append(
        f"  idempotency answer: RSS {_num(d.rss_bytes_per_answer)} B,"
        f" heap {_num(d.heap_bytes_per_answer)} B,"
        f" snapshot {_num(d.snapshot_bytes_per_answer)} B"
    )
    for replay in report.replay:
        lines.append(f"recovery of partition {replay.partition} ({replay.variant}):")
        for timing in replay.timings:
            lines.append(f"  {_timing_line(timing)}")
        sizes = ", ".join(
            f"at {s.seq:,}: {s.body_bytes:,} B ({s.stored_bytes:,} stored)"
            for s in replay.snapshots
        )
        lines.append(f"  snapshots {sizes}")
    if report.idle_cores:
        lines.append(
            "idle (no load, every partition owned): cores "
            + ", ".join(f"{name} {used:.3f}" for name, used in report.idle_cores.items())
        )
    for spread in report.spread:
        m = spread.measurement
        lines.append(
            f"spread over {spread.keys} partitions, open loop at {m.target_rate_per_s or 0:,.0f}"
            f" pairs/s ({spread.pairs_per_s_per_partition:g} per partition):"
            f" {m.throughput_per_s:,.0f} done, dropped {m.dropped}, p50 {m.latency.p50_ms:.2f} ms,"
            f" p99 {m.latency.p99_ms:.2f} ms; CPU us/pair "
            + ", ".join(f"{name} {us:.0f}" for name, us in spread.cpu_us_per_pair.items())
            + f"; WAL {spread.wal_bytes_per_pair:,.0f} B/pair"
            + f"; other {m.cores.get('other', 0.0):.2f} cores"
        )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def write(report: FootprintReport, results_dir: Path) -> Path:
    return write_results(report, results_dir, "footprint")


# ----------------------------------------------------------------------------- main


@dataclass(slots=True)
class _Results:
    growth: list[Growth] = field(default_factory=list)
    replay: list[Replay] = field(default_factory=list)
    idle_cores: dict[str, float] = field(default_factory=dict)
    spread: list[Spread] = field(default_factory=list)


def _one_system(
    args: argparse.Namespace,
    started: float,
    variant: str,
    *,
    idempotency_keys: bool,
    with_spread: bool,
    postgres: dict[str, object],
) -> _Results:
    """A fresh cluster: the growth run of ``variant``, its replay, maybe the spread runs."""
    step = "idempotent" if idempotency_keys else "plain"
    do_growth = step not in args.skip
    do_replay = "replay" not in args.skip
    results = _Results()
    if not (do_growth or do_replay or with_spread):
        return results
    progress(f"{variant}: starting NATS, Postgres (durable) and the ledger", started=started)
    ledger_env = dict(args.ledger_env) | {SNAPSHOT_EVERY_SETTING: str(args.snapshot_every)}
    cluster = Cluster.start(
        args.partitions,
        ledger_env,
        POSTGRES_SETTINGS | dict(args.postgres_setting),
        nats_store_dir=args.nats_store_dir,
    )
    workers: WorkerPool[AnyJob, JobResult] | None = None
    try:
        cluster.start_ledgers(1)
        if not postgres:
            postgres.update(_common.postgres_settings(cluster.database_url))
        workers = WorkerPool(args.clients, WORKER_PROTOCOL)
        run = Footprint(args, cluster, workers, started)
        tenants = cluster.tenants_in_distinct_partitions(args.keys + 1, f"footprint-{step}")
        keys = asyncio.run(cluster.issue_keys(tenants))
        if do_growth:
            results.growth.append(run.growth(variant, keys[:-1], idempotency_keys=idempotency_keys))
        if do_replay:
            results.replay.append(run.replay(variant, keys[-1], idempotency_keys=idempotency_keys))
        if with_spread:
            results.idle_cores = run.idle()
            spread_tenants = cluster.tenants_in_distinct_partitions(
                max(keys for keys, _ in args.spread), "footprint-spread"
            )
            spread_keys = asyncio.run(cluster.issue_keys(spread_tenants))
            results.spread = [run.spread(spread_keys[:keys], rate) for keys, rate in args.spread]
    finally:
        if workers is not None:
            workers.stop()
        cluster.close(keep_data=args.keep_data)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    postgres: dict[str, object] = {}
    every = _Results()
    for variant, keyed in (("settled ids only", False), ("with idempotency keys", True)):
        results = _one_system(
            args,
            started,
            variant,
            idempotency_keys=keyed,
            with_spread=not keyed and "spread" not in args.skip,
            postgres=postgres,
        )
        every.growth += results.growth
        every.replay += results.replay
        every.idle_cores |= results.idle_cores
        every.spread += results.spread
    report = FootprintReport(
        started_at=started_at,
        settings={
            "pairs": args.pairs,
            "keys": args.keys,
            "concurrency": args.concurrency,
            "warmup_pairs": args.warmup_pairs,
            "snapshot_every_events": args.snapshot_every,
            "replay_repeats": args.replay_repeats,
            "spread": [{"keys": keys, "pairs_per_s": rate} for keys, rate in args.spread],
            "spread_duration_s": args.spread_duration,
            "settle_s": args.settle,
            "clients": args.clients,
            "client_inflight_per_partition": args.client_inflight,
            "partition_count": args.partitions,
            "ledger_env": dict(args.ledger_env),
            "postgres_settings": POSTGRES_SETTINGS | dict(args.postgres_setting),
            "amount_micros": AMOUNT_MICROS,
            "skip": sorted(args.skip),
        },
        environment=_common.environment(postgres),
        growth=every.growth,
        replay=every.replay,
        idle_cores=every.idle_cores,
        spread=every.spread,
        derived=_derive(every.growth, every.replay),
    )
    print(table(report))
    path = write(report, args.results_dir)
    print(f"results: {path}")
    failed = [g.variant for g in every.growth if g.errors or g.denied]
    if failed:
        print(f"errors or denials during {', '.join(failed)}: figures are suspect", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
