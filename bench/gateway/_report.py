"""Runs, rate points, the rate search, the target check, the table and the JSON document."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import msgspec

from bench._results import write_results
from bench.gateway._load import CallsResult
from bench.ledger._report import Latency, Measurement

# The gateway issue's target (issue 4, item 7): added latency at 500 calls/s, one process.
TARGET_RATE_PER_S = 500
TARGET_ADDED_P50_MS_MAX = 2.0
TARGET_ADDED_P99_MS_MAX = 10.0


class Run(msgspec.Struct, frozen=True):
    """One open-loop run at one rate. ``target``: ``direct`` (the upstream itself) or
    ``gateway`` (through the gateway, with ``keys`` vault keys); ``phase``: ``rates`` (the
    fixed rates) or ``search``. Latencies in ms from the scheduled send time to the last
    byte of a 2xx answer; ``send_lag``: scheduled time to request written (the load
    generator's own lateness). ``cores``: CPU each component used during the window;
    ``*_cpu_us_per_call``: that CPU divided by the calls answered."""

    target: str
    phase: str
    keys: int | None
    rate_per_s: float
    duration_s: float
    scheduled: int
    answered_per_s: float
    latency: Latency
    send_lag: Latency
    statuses: dict[str, int]
    errors: int
    dropped: int
    unanswered: int
    first_error: str | None
    connections: int
    cores: dict[str, float]
    gateway_cpu_us_per_call: float | None
    upstream_cpu_us_per_call: float | None
    clients_cpu_us_per_call: float | None
    ok_total: int

    @classmethod
    def of(
        cls,
        *,
        target: str,
        phase: str,
        keys: int | None,
        rate_per_s: float,
        duration_s: float,
        results: Sequence[CallsResult],
        cores: dict[str, float],
    ) -> Run:
        answered = sum(len(result.latencies_ms) for result in results)
        statuses: dict[str, int] = {}
        for result in results:
            for status, count in result.statuses.items():
                statuses[str(status)] = statuses.get(str(status), 0) + count
        errors = [result.first_error for result in results if result.first_error is not None]

        def per_call(component: str) -> float | None:
            if component not in cores or not answered:
                return None
            return round(cores[component] * duration_s * 1e6 / answered, 1)

        return cls(
            target=target,
            phase=phase,
            keys=keys,
            rate_per_s=rate_per_s,
            duration_s=duration_s,
            scheduled=sum(result.scheduled for result in results),
            answered_per_s=round(answered / duration_s, 1),
            latency=Latency.of([ms for result in results for ms in result.latencies_ms]),
            send_lag=Latency.of([ms for result in results for ms in result.send_lags_ms]),
            statuses=statuses,
            errors=sum(result.errors for result in results),
            dropped=sum(result.dropped for result in results),
            unanswered=sum(result.unanswered for result in results),
            first_error=errors[0] if errors else None,
            connections=sum(result.connections_open for result in results),
            cores=cores,
            gateway_cpu_us_per_call=per_call("gateway"),
            upstream_cpu_us_per_call=per_call("upstream"),
            clients_cpu_us_per_call=per_call("clients"),
            ok_total=sum(result.ok_total for result in results),
        )

    @property
    def healthy(self) -> bool:
        """Every call scheduled in the window answered 2xx; none was dropped or cancelled."""
        return (
            self.errors == 0
            and self.dropped == 0
            and self.unanswered == 0
            and self.latency.count == self.scheduled > 0
        )

    def summary(self) -> str:
        problems = ""
        if not self.healthy:
            problems = (
                f", NOT HEALTHY: {self.latency.count}/{self.scheduled} answered 2xx,"
                f" statuses {self.statuses}, errors {self.errors}, dropped {self.dropped},"
                f" unanswered {self.unanswered}"
            )
            if self.first_error:
                problems += f" ({self.first_error})"
        cpu = ""
        if self.gateway_cpu_us_per_call is not None:
            cpu = f", gateway {self.gateway_cpu_us_per_call:,.0f} us/call"
        return (
            f"p50 {self.latency.p50_ms:.2f} ms, p99 {self.latency.p99_ms:.2f} ms,"
            f" max {self.latency.max_ms:.2f} ms, send lag p99 {self.send_lag.p99_ms:.2f} ms"
            f"{cpu}{problems}"
        )


class LedgerRun(msgspec.Struct, frozen=True):
    """Reserve + commit pairs straight to the ledger on the first ``keys`` keys, at the
    proxied run's rate (the ledger benchmark's open-loop measurement: reserve latency from
    the scheduled time, ``ledger_cpu_us_per_pair``, cores)."""

    keys: int
    measurement: Measurement


class Point(msgspec.Struct, frozen=True):
    """One rate with ``keys`` keys: the direct and proxied percentiles and their difference
    (``added_*`` = gateway minus direct, at the same rate); ``reserve_*``: the ledger-only
    run's reserve latency at the same rate (None when not measured), the ledger's share of
    the added latency. ``holds``: the runs were healthy and the added p99 within the
    search bound."""

    phase: str
    rate_per_s: float
    keys: int
    direct_p50_ms: float
    direct_p99_ms: float
    gateway_p50_ms: float
    gateway_p99_ms: float
    gateway_p999_ms: float
    added_p50_ms: float
    added_p99_ms: float
    reserve_p50_ms: float | None
    reserve_p99_ms: float | None
    gateway_cpu_us_per_call: float | None
    gateway_cores: float | None
    healthy: bool
    holds: bool

    @classmethod
    def of(
        cls,
        phase: str,
        direct: Run,
        gateway: Run,
        ledger: LedgerRun | None,
        added_p99_ms_max: float,
    ) -> Point:
        assert gateway.keys is not None
        added_p50 = round(gateway.latency.p50_ms - direct.latency.p50_ms, 3)
        added_p99 = round(gateway.latency.p99_ms - direct.latency.p99_ms, 3)
        healthy = gateway.healthy and direct.healthy
        return cls(
            phase=phase,
            rate_per_s=gateway.rate_per_s,
            keys=gateway.keys,
            direct_p50_ms=direct.latency.p50_ms,
            direct_p99_ms=direct.latency.p99_ms,
            gateway_p50_ms=gateway.latency.p50_ms,
            gateway_p99_ms=gateway.latency.p99_ms,
            gateway_p999_ms=gateway.latency.p999_ms,
            added_p50_ms=added_p50,
            added_p99_ms=added_p99,
            reserve_p50_ms=None if ledger is None else ledger.measurement.latency.p50_ms,
            reserve_p99_ms=None if ledger is None else ledger.measurement.latency.p99_ms,
            gateway_cpu_us_per_call=gateway.gateway_cpu_us_per_call,
            gateway_cores=gateway.cores.get("gateway"),
            healthy=healthy,
            holds=healthy and added_p99 <= added_p99_ms_max,
        )


class Search(msgspec.Struct, frozen=True):
    """The highest rate one gateway holds (healthy, added p99 <= ``added_p99_ms_max``) with
    ``keys`` keys: ``max_rate_per_s`` held, ``failed_rate_per_s`` the lowest rate seen
    not to hold (None: none failed up to the search's ceiling)."""

    keys: int
    added_p99_ms_max: float
    max_rate_per_s: float
    failed_rate_per_s: float | None
    steps: int


class TargetCheck(msgspec.Struct, frozen=True):
    rate_per_s: float
    keys: int
    added_p50_ms: float
    added_p99_ms: float
    p50_ok: bool
    p99_ok: bool
    healthy: bool

    @property
    def met(self) -> bool:
        return self.p50_ok and self.p99_ok and self.healthy


def target_checks(points: Sequence[Point]) -> list[TargetCheck]:
    """The issue's target at TARGET_RATE_PER_S for each key count measured there."""
    return [
        TargetCheck(
            rate_per_s=point.rate_per_s,
            keys=point.keys,
            added_p50_ms=point.added_p50_ms,
            added_p99_ms=point.added_p99_ms,
            p50_ok=point.added_p50_ms <= TARGET_ADDED_P50_MS_MAX,
            p99_ok=point.added_p99_ms <= TARGET_ADDED_P99_MS_MAX,
            healthy=point.healthy,
        )
        for point in points
        if point.phase == "rates" and point.rate_per_s == TARGET_RATE_PER_S
    ]


class Report(msgspec.Struct, frozen=True):
    started_at: str
    settings: dict[str, object]
    environment: dict[str, object]
    points: list[Point]
    search: Search | None
    target: list[TargetCheck]
    runs: list[Run]
    ledger_runs: list[LedgerRun]
    checks: dict[str, object]


def _cores(cores: dict[str, float]) -> str:
    return "  ".join(f"{name} {share:.2f}" for name, share in cores.items())


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def table(report: Report) -> str:
    """The human-readable report (plain text, fixed-width columns)."""
    lines = [
        "latency one gateway process adds to a call (open loop; ms from the scheduled send"
        " time to the answer's last byte)",
        f"{'rate/s':>7} {'keys':>4} | {'direct p50':>10} {'p99':>6} |"
        f" {'gateway p50':>11} {'p99':>6} {'p99.9':>6} | {'added p50':>9} {'p99':>6} |"
        f" {'reserve p50':>11} {'p99':>6} | {'gw us/call':>10} {'gw cores':>8} | holds",
    ]
    for point in report.points:
        cpu = point.gateway_cpu_us_per_call
        cores = point.gateway_cores
        lines.append(
            f"{point.rate_per_s:>7,.0f} {point.keys:>4} |"
            f" {_ms(point.direct_p50_ms):>10} {_ms(point.direct_p99_ms):>6} |"
            f" {_ms(point.gateway_p50_ms):>11} {_ms(point.gateway_p99_ms):>6}"
            f" {_ms(point.gateway_p999_ms):>6} |"
            f" {_ms(point.added_p50_ms):>9} {_ms(point.added_p99_ms):>6} |"
            f" {_ms(point.reserve_p50_ms):>11} {_ms(point.reserve_p99_ms):>6} |"
            f" {'-' if cpu is None else f'{cpu:,.0f}':>10}"
            f" {'-' if cores is None else f'{cores:.2f}':>8} |"
            f" {'yes' if point.holds else 'NO'}{'' if point.phase == 'rates' else ' (search)'}"
        )
    lines.append(
        "added: gateway minus direct percentile at the same rate; reserve: the ledger's"
        " round trip alone at that rate (ledger-only run), the rest of 'added' is the"
        " gateway's own work; gw us/call: gateway CPU per call (steadier than latencies on a"
        " busy machine); holds: every call answered 2xx, added p99 within the search bound"
    )
    if report.search is not None:
        search = report.search
        failed = search.failed_rate_per_s
        lines.append(
            f"highest rate held with added p99 <= {search.added_p99_ms_max:g} ms"
            f" ({search.keys} keys): {search.max_rate_per_s:,.0f} calls/s"
            + ("" if failed is None else f" (not held at {failed:,.0f}/s)")
            + f", {search.steps} search steps"
        )
    for check in report.target:
        mark = {True: "ok", False: "NOT MET"}
        lines.append(
            f"target at {check.rate_per_s:,.0f}/s, {check.keys} keys:"
            f" added p50 {check.added_p50_ms:.2f} ms (<= {TARGET_ADDED_P50_MS_MAX:g}:"
            f" {mark[check.p50_ok]}), added p99 {check.added_p99_ms:.2f} ms"
            f" (<= {TARGET_ADDED_P99_MS_MAX:g}: {mark[check.p99_ok]})"
            + ("" if check.healthy else ", run NOT HEALTHY")
        )
    lines.append(
        "cores used during each run ('other': anything else on the machine; 'steal': taken"
        " by the hypervisor, which freezes the whole machine)"
    )
    for run in report.runs:
        keys = "" if run.keys is None else f" {run.keys} keys"
        lines.append(f"  {run.target:>7} {run.rate_per_s:>7,.0f}/s{keys}: {_cores(run.cores)}")
    for ledger_run in report.ledger_runs:
        measurement = ledger_run.measurement
        lines.append(
            f"   ledger {measurement.target_rate_per_s or 0:>7,.0f}/s {ledger_run.keys} keys:"
            f" {_cores(measurement.cores)}"
        )
    return "\n".join(lines)


def write(report: Report, results_dir: Path) -> Path:
    """Write ``gateway-<timestamp>.json`` and ``gateway-latest.json``; return the first."""
    return write_results(report, results_dir, "gateway")
