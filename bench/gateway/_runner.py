"""The runs of the gateway benchmark: direct, proxied and ledger-only, the search, checks.

At each rate: one *direct* run (the load generator straight at the upstream), then for
each key count a *proxied* run (the same calls through the gateway) and, unless turned
off, a *ledger-only* run: reserve + commit pairs at the same rate on the same keys through
the gateway's own ``LedgerClient`` from a separate process (the ledger benchmark's open
loop). Its reserve latency is the part of the added latency that is the ledger's round
trip (NATS, the ledger, a durable Postgres commit); the rest is the gateway's own work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from bench._open_loop import Window
from bench._workers import WorkerPool
from bench.gateway import _report
from bench.gateway._load import AnyJob, CallsJob, CallsResult, request_bytes
from bench.gateway._stack import DIRECT_UPSTREAM_KEY, GATEWAY_UPSTREAM_KEY, HOST, GatewayStack
from bench.ledger import _cpu
from bench.ledger._common import progress
from bench.ledger._load import AnyJob as LedgerJob
from bench.ledger._load import JobResult, KeySpec, LedgerOpenJob
from bench.ledger._report import Measurement
from spendgate_common.vault_keys import parse_vault_key

# Time between handing out a job and its start: workers open their connections meanwhile.
JOB_LEAD_S = 0.5
# Connections each worker opens before its run (more are opened when all are busy).
CONNECTIONS_INITIAL = 8
# Calls waiting per worker before new ones are dropped (and counted): ~10 s at 2,000/s.
OUTSTANDING_MAX = 20_000
# Extra time allowed for a worker's result after the window ended (the drain is 10 s).
RESULT_DEADLINE_S = 60.0
# After a run the gateway and ledger must be idle (below this many cores) before the next
# one starts, so that the backlog of an overloaded run does not leak into the next.
IDLE_CORES_MAX = 0.05
IDLE_SAMPLE_S = 0.2
IDLE_DEADLINE = timedelta(seconds=60)
# How long the final check waits for the gateway's background settles.
SETTLE_DEADLINE = timedelta(seconds=30)
SETTLE_POLL_S = 0.25
# Every call charges one cent (10,000 micro-USD), form-encoded as Stripe's SDK sends it.
CALL_BODY = b"amount=1&currency=usd&source=tok_visa"
CALL_AMOUNT_MICROS = 10_000
CALL_HEADERS = {
    "content-type": "application/x-www-form-urlencoded",
    "user-agent": "Stripe/v1 PythonBindings/12.0.0",
    "stripe-version": "2024-06-20",
    "accept": "*/*",
}
# The gateway's setting of NATS requests in flight per partition: the ledger-only runs
# use the gateway's value (else --client-inflight), so that they coalesce as it does.
GATEWAY_LEDGER_INFLIGHT_SETTING = "SPENDGATE_GATEWAY_LEDGER_INFLIGHT_MAX"
# The search: grow by this factor until a rate does not hold, then bisect until the held
# and the failed rate are within this ratio; rates are rounded to this step.
SEARCH_GROWTH = 1.5
SEARCH_RESOLUTION = 1.1
SEARCH_RATE_STEP = 10

JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True, slots=True)
class RunSettings:
    duration_s: float
    warmup_s: float
    pause_s: float
    connections_max: int
    ledger_inflight_max: int
    added_p99_ms_max: float
    ledger_runs: bool
    search_steps_max: int
    search_rate_max_per_s: float


class Runner:
    def __init__(
        self,
        settings: RunSettings,
        stack: GatewayStack,
        calls: WorkerPool[AnyJob, CallsResult],
        pairs: WorkerPool[LedgerJob, JobResult],
        keys: int,
        started: float,
    ) -> None:
        self.settings = settings
        self.stack = stack
        self.calls = calls
        self.pairs = pairs
        self.started = started
        self.runs: list[_report.Run] = []
        self.ledger_runs: list[_report.LedgerRun] = []
        self.points: list[_report.Point] = []
        self.direct_requests = [
            request_bytes(
                HOST,
                stack.upstream_port,
                "/v1/charges",
                {"authorization": f"Bearer {DIRECT_UPSTREAM_KEY}", **CALL_HEADERS},
                CALL_BODY,
            )
        ]
        self.progress(f"issuing {keys} vault keys through POST /v1/keys")
        self.keys = stack.issue_keys(keys, "bench-gw")
        self.gateway_requests = [
            request_bytes(
                HOST,
                stack.gateway_port,
                "/stripe/v1/charges",
                {"authorization": f"Bearer {key.key}", **CALL_HEADERS},
                CALL_BODY,
            )
            for key in self.keys
        ]
        self.key_specs = []
        for key in self.keys:
            parsed = parse_vault_key(key.key)
            assert parsed is not None, "the gateway issued a malformed key"
            self.key_specs.append(KeySpec(parsed.tenant, parsed.key_id, parsed.secret_sha256))

    def progress(self, message: str) -> None:
        progress(message, started=self.started)

    # ------------------------------------------------------------------------- runs

    def _window(self) -> Window:
        start_at = time.monotonic() + JOB_LEAD_S
        begin_at = start_at + self.settings.warmup_s
        return Window(start_at, begin_at, begin_at + self.settings.duration_s)

    def _measure(
        self, pool: WorkerPool[JobT, ResultT], jobs: Sequence[JobT], window: Window
    ) -> tuple[list[ResultT], dict[str, float]]:
        """Hand the jobs out, sample every component's CPU over the window, collect."""
        components = self.stack.process_ids()
        components["clients"] = pool.send(jobs)
        time.sleep(max(0.0, window.begin_at - time.monotonic()))
        before = _cpu.sample(components, with_children={"postgres"})
        time.sleep(max(0.0, window.end_at - time.monotonic()))
        after = _cpu.sample(components, with_children={"postgres"})
        results = pool.collect(len(jobs), RESULT_DEADLINE_S)
        self.wait_idle()
        return results, _cpu.cores_used(before, after, window.end_at - window.begin_at)

    def run_calls(self, phase: str, rate_per_s: float, keys: int | None) -> _report.Run:
        """One open-loop run of HTTP calls: direct (``keys`` None) or through the gateway."""
        window = self._window()
        if keys is None:
            port, requests = self.stack.upstream_port, self.direct_requests
        else:
            port, requests = self.stack.gateway_port, self.gateway_requests[:keys]
        clients = len(self.calls)
        jobs = [
            CallsJob(
                host=HOST,
                port=port,
                requests=requests,
                rate_per_s=rate_per_s / clients,
                # Workers interleave: worker i starts i calls' intervals after worker 0.
                phase_s=index / rate_per_s,
                connections_initial=CONNECTIONS_INITIAL,
                connections_max=self.settings.connections_max,
                outstanding_max=OUTSTANDING_MAX,
                window=window,
            )
            for index in range(clients)
        ]
        results, cores = self._measure(self.calls, jobs, window)
        run = _report.Run.of(
            target="direct" if keys is None else "gateway",
            phase=phase,
            keys=keys,
            rate_per_s=rate_per_s,
            duration_s=self.settings.duration_s,
            results=results,
            cores=cores,
        )
        self.runs.append(run)
        label = "direct" if keys is None else f"gateway, {keys} keys"
        self.progress(f"{phase}: {label} at {rate_per_s:,.0f}/s: {run.summary()}")
        return run

    def run_pairs(self, rate_per_s: float, keys: int) -> _report.LedgerRun:
        """Reserve + commit pairs at ``rate_per_s`` on the first ``keys`` keys, straight to
        the ledger with the gateway's client (its reserve latency, from the scheduled time)."""
        window = self._window()
        inflight = self.stack.gateway_env.get(GATEWAY_LEDGER_INFLIGHT_SETTING)
        job = LedgerOpenJob(
            nats_url=self.stack.cluster.nats_server.url,
            partition_count=self.stack.cluster.partition_count,
            keys=self.key_specs[:keys],
            rate_per_s=rate_per_s,
            outstanding_max=OUTSTANDING_MAX,
            amount_micros=CALL_AMOUNT_MICROS,
            inflight_max=int(inflight) if inflight else self.settings.ledger_inflight_max,
            window=window,
        )
        results, cores = self._measure(self.pairs, [job], window)
        measurement = Measurement.of(
            "open",
            concurrency=0,
            target_rate_per_s=rate_per_s,
            duration_s=self.settings.duration_s,
            results=results,
            cores=cores,
        )
        ledger_run = _report.LedgerRun(keys=keys, measurement=measurement)
        self.ledger_runs.append(ledger_run)
        self.progress(
            f"rates: ledger only, {keys} keys at {rate_per_s:,.0f} pairs/s: {measurement.summary()}"
        )
        return ledger_run

    def wait_idle(self) -> None:
        """Pause, then wait (bounded) until the gateway and the ledger stopped working."""
        time.sleep(self.settings.pause_s)
        components = {
            name: pids
            for name, pids in self.stack.process_ids().items()
            if name in ("gateway", "ledger")
        }
        give_up_at = time.monotonic() + IDLE_DEADLINE.total_seconds()
        while time.monotonic() < give_up_at:
            before = _cpu.sample(components, with_children=set())
            time.sleep(IDLE_SAMPLE_S)
            used = _cpu.seconds_used(before, _cpu.sample(components, with_children=set()))
            if all(used.get(name, 0.0) / IDLE_SAMPLE_S < IDLE_CORES_MAX for name in components):
                return
        self.progress("the gateway or the ledger did not become idle; going on")

    def point(self, phase: str, rate_per_s: float, keys: Sequence[int]) -> list[_report.Point]:
        """A direct run, then per key count a proxied run (and a ledger-only one)."""
        direct = self.run_calls(phase, rate_per_s, None)
        points = []
        for count in keys:
            proxied = self.run_calls(phase, rate_per_s, count)
            ledger = None
            if self.settings.ledger_runs and phase == "rates":
                ledger = self.run_pairs(rate_per_s, count)
            point = _report.Point.of(phase, direct, proxied, ledger, self.settings.added_p99_ms_max)
            self.progress(
                f"  added at {rate_per_s:,.0f}/s, {count} keys: p50 {point.added_p50_ms:.2f} ms,"
                f" p99 {point.added_p99_ms:.2f} ms{'' if point.holds else ' (does NOT hold)'}"
            )
            points.append(point)
        self.points += points
        return points

    # ----------------------------------------------------------------------- search

    def search(self, keys: int) -> _report.Search:
        """The highest rate that holds with ``keys`` keys, starting from the fixed-rate
        points: grow by SEARCH_GROWTH until a rate fails, then bisect (geometrically)
        until held and failed are within SEARCH_RESOLUTION, at most ``search_steps_max``."""
        settings = self.settings
        measured = [point for point in self.points if point.keys == keys]
        held = max((p.rate_per_s for p in measured if p.holds), default=0.0)
        failing = [p.rate_per_s for p in measured if not p.holds and p.rate_per_s > held]
        failed = min(failing, default=None)
        steps = 0
        while steps < settings.search_steps_max:
            if failed is None:
                rate = _round_rate(min(held * SEARCH_GROWTH, settings.search_rate_max_per_s))
            elif held and failed / held <= SEARCH_RESOLUTION:
                break
            else:
                rate = _round_rate(math.sqrt(held * failed) if held else failed / 2)
            if rate <= held or rate == failed:
                break
            steps += 1
            self.progress(f"search ({keys} keys): step {steps}, {rate:,.0f}/s")
            [point] = self.point("search", rate, [keys])
            if point.holds:
                held = rate
            else:
                failed = rate
        return _report.Search(keys, settings.added_p99_ms_max, held, failed, steps)

    # ----------------------------------------------------------------------- checks

    def checks(self) -> dict[str, object]:
        """Everything that reached the upstream through the gateway, and every ledger-only
        pair, was committed at its amount, and nothing is still reserved."""
        give_up_at = time.monotonic() + SETTLE_DEADLINE.total_seconds()
        usage = self.stack.usage(self.keys)
        while usage.reserved_micros and time.monotonic() < give_up_at:
            time.sleep(SETTLE_POLL_S)
            usage = self.stack.usage(self.keys)
        calls = self.stack.upstream_calls()
        via_gateway = calls.get(GATEWAY_UPSTREAM_KEY, 0)
        answered = sum(run.ok_total for run in self.runs if run.target == "gateway")
        pairs = sum(run.measurement.completed_total for run in self.ledger_runs)
        expected = (via_gateway + pairs) * CALL_AMOUNT_MICROS
        return {
            "upstream_calls_via_gateway": via_gateway,
            "upstream_calls_direct": calls.get(DIRECT_UPSTREAM_KEY, 0),
            "gateway_2xx_seen_by_clients": answered,
            "ledger_only_pairs": pairs,
            "committed_micros": usage.committed_micros,
            "expected_committed_micros": expected,
            "reserved_micros": usage.reserved_micros,
            "consistent": usage.reserved_micros == 0
            and usage.committed_micros == expected
            and answered <= via_gateway,
        }


def _round_rate(rate: float) -> float:
    return float(max(SEARCH_RATE_STEP, round(rate / SEARCH_RATE_STEP) * SEARCH_RATE_STEP))
