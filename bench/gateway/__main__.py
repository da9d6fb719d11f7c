"""``python -m bench.gateway``: see the package docstring, or ``--help``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench._results import RESULTS_DIR
from bench._workers import WorkerPool
from bench.gateway import _load, _report
from bench.gateway._runner import CALL_AMOUNT_MICROS, CALL_BODY, Runner, RunSettings
from bench.gateway._stack import GatewayStack
from bench.ledger import _common
from bench.ledger import _load as _ledger_load
from bench.ledger._cluster import POSTGRES_SETTINGS
from bench.ledger._common import (
    add_cluster_arguments,
    positive_ints,
    progress,
    setting_pair,
)

# Defaults of a full run and of --quick (a smoke run of a few seconds); options given on
# the command line win over both.
FULL_DEFAULTS: dict[str, object] = {
    "rates": [100, 250, 500, 750, 1000],
    "duration": 8.0,
    "warmup": 2.0,
    "keys": [64, 1],
    "search": True,
    "ledger_runs": True,
    "pause": 0.5,
}
QUICK_DEFAULTS: dict[str, object] = {
    "rates": [200],
    "duration": 1.0,
    "warmup": 0.5,
    "keys": [1],
    "search": False,
    "ledger_runs": False,
    "pause": 0.1,
}

DESCRIPTION = """\
Gateway benchmark: the latency one gateway process (uvicorn, one worker) adds to a call.
For every rate of --rates it runs an open-loop load (calls sent on a fixed schedule,
latency counted from the scheduled send time, so a stall is not hidden) first straight
at the upstream ("direct"), then through the gateway (POST /stripe/v1/charges with a
vault key: estimate, reserve with the ledger, forward, settle) once for each count of
--keys, against the same minimal Stripe-like upstream. "added" is the gateway's
percentile minus the direct one at the same rate. Then it searches for the highest rate
one gateway holds with an added p99 <= --search-p99-ms.

It starts its own embedded NATS, durable Postgres, one ledger process, the upstream, the
gateway, and --clients load-generator processes. Prints a table; writes
bench/results/gateway-<timestamp>.json and gateway-latest.json. Progress goes to stderr.
A full run takes about seven minutes; --quick about ten seconds (a smoke test).
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default (where it has one)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway",
        description=DESCRIPTION,
        formatter_class=_HelpFormatter,
        # Options whose default depends on --quick are filled in after parsing.
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--rates",
        type=positive_ints,
        help="calls/s of the fixed-rate runs, comma-separated (default: 100,250,500,750,1000)",
    )
    parser.add_argument("--duration", type=float, help="measured seconds per run (default: 8)")
    parser.add_argument(
        "--warmup", type=float, help="unmeasured seconds before each run's window (default: 2)"
    )
    parser.add_argument(
        "--keys",
        type=positive_ints,
        help=(
            "vault keys the proxied calls use in turn, one proxied run per count,"
            " comma-separated (default: 64,1). N keys live in N tenants in N distinct"
            " partitions (beyond the partition count, several share one); 1 is one hot key"
        ),
    )
    parser.add_argument(
        "--search",
        action=argparse.BooleanOptionalAction,
        help="search for the highest rate held (default: on; off with --quick)",
    )
    parser.add_argument(
        "--ledger-runs",
        action=argparse.BooleanOptionalAction,
        help=(
            "at each fixed rate, also reserve+commit pairs straight to the ledger (the"
            " gateway's client, same keys) to split the added latency into the ledger's round"
            " trip and the gateway's own work (default: on; off with --quick)"
        ),
    )
    parser.add_argument(
        "--search-p99-ms",
        type=float,
        default=_report.TARGET_ADDED_P99_MS_MAX,
        help="added p99 (ms) a rate must stay within to count as held",
    )
    parser.add_argument(
        "--search-steps", type=int, default=6, help="most rates the search measures"
    )
    parser.add_argument(
        "--search-rate-max", type=int, default=20_000, help="highest rate the search tries"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        default=False,
        help="smoke run: one rate (200/s), 1 s windows, one hot key, no search",
    )
    parser.add_argument(
        "--gateway-env",
        type=setting_pair,
        action="append",
        default=[],
        metavar="NAME=value",
        help=(
            "extra environment variable of the gateway process (repeatable), e.g."
            " SPENDGATE_GATEWAY_LEDGER_INFLIGHT_MAX=8 or OTEL_SDK_DISABLED=true"
        ),
    )
    add_cluster_arguments(parser, replicas=False)
    parser.add_argument(
        "--connections-max",
        type=int,
        default=256,
        help="keep-alive connections per load-generator process, at most",
    )
    parser.add_argument(
        "--pause",
        type=float,
        help="seconds between runs, before waiting for the gateway to be idle (default: 0.5)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--keep-data", action="store_true", default=False, help="keep /tmp/spendgate-bench-*"
    )
    args = parser.parse_args(argv)
    for name, value in (QUICK_DEFAULTS if args.quick else FULL_DEFAULTS).items():
        if not hasattr(args, name):
            setattr(args, name, value)
    if args.duration <= 0 or args.warmup < 0 or args.clients <= 0 or args.connections_max <= 0:
        parser.error("--duration, --clients, --connections-max must be positive, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    progress("starting NATS, Postgres (durable), ledger, upstream and gateway", started=started)
    postgres_overrides = POSTGRES_SETTINGS | dict(args.postgres_setting)
    stack = GatewayStack.start(
        partition_count=args.partitions,
        ledger_env=dict(args.ledger_env),
        postgres_settings=postgres_overrides,
        gateway_env=dict(args.gateway_env),
        nats_store_dir=args.nats_store_dir,
    )
    calls: WorkerPool[_load.AnyJob, _load.CallsResult] | None = None
    pairs: WorkerPool[_ledger_load.AnyJob, _ledger_load.JobResult] | None = None
    try:
        postgres_settings = _common.postgres_settings(stack.cluster.database_url)
        runtime = stack.gateway_runtime()
        progress(f"gateway runtime: {runtime}", started=started)
        calls = WorkerPool(args.clients, _load.WORKER_PROTOCOL)
        pairs = WorkerPool(1, _ledger_load.WORKER_PROTOCOL)
        runner = Runner(_run_settings(args), stack, calls, pairs, max(args.keys), started)
        for rate in args.rates:
            runner.point("rates", float(rate), args.keys)
        search = runner.search(args.keys[0]) if args.search else None
        checks = runner.checks()
    finally:
        for pool in (calls, pairs):
            if pool is not None:
                pool.stop()
        stack.close(keep_data=args.keep_data)
    report = _report.Report(
        started_at=started_at,
        settings=_settings_record(args, postgres_overrides),
        environment=_common.environment(postgres_settings) | {"gateway_runtime": runtime},
        points=runner.points,
        search=search,
        target=_report.target_checks(runner.points),
        runs=runner.runs,
        ledger_runs=runner.ledger_runs,
        checks=checks,
    )
    print(_report.table(report))
    path = _report.write(report, args.results_dir)
    print(f"consistency check: {'ok' if checks['consistent'] else 'FAILED'} {checks}")
    print(f"results: {path}")
    return 0 if checks["consistent"] else 1


def _run_settings(args: argparse.Namespace) -> RunSettings:
    return RunSettings(
        duration_s=args.duration,
        warmup_s=args.warmup,
        pause_s=args.pause,
        connections_max=args.connections_max,
        ledger_inflight_max=args.client_inflight,
        added_p99_ms_max=args.search_p99_ms,
        ledger_runs=args.ledger_runs,
        search_steps_max=args.search_steps,
        search_rate_max_per_s=args.search_rate_max,
    )


def _settings_record(args: argparse.Namespace, postgres: dict[str, str]) -> dict[str, object]:
    return {
        "rates_per_s": args.rates,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "keys": args.keys,
        "quick": args.quick,
        "search": args.search,
        "ledger_runs": args.ledger_runs,
        "search_added_p99_ms_max": args.search_p99_ms,
        "search_steps_max": args.search_steps,
        "search_rate_max_per_s": args.search_rate_max,
        "clients": args.clients,
        "client_inflight_per_partition": args.client_inflight,
        "connections_max_per_client": args.connections_max,
        "partition_count": args.partitions,
        "gateway_env": dict(args.gateway_env),
        "ledger_env": dict(args.ledger_env),
        "postgres_settings": postgres,
        "nats_store_dir": str(args.nats_store_dir or "(the run's temporary directory)"),
        "call": f"POST /stripe/v1/charges {CALL_BODY.decode()}",
        "call_amount_micros": CALL_AMOUNT_MICROS,
        "upstream": "bench.gateway._upstream (asyncio, fixed charge answer)",
        "gateway_server": "python -m spendgate_gateway (uvicorn, one worker)",
    }


if __name__ == "__main__":
    sys.exit(main())
