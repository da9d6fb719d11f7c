"""Measurements, the acceptance check, the table and the JSON file."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import msgspec

from bench._results import write_results
from bench.ledger._load import JobResult

# The ledger issue's acceptance criterion (issue 3, item 10).
PAIRS_PER_S_MIN = 15_000
BASELINE_RATIO_MIN = 5.0
HALF_LOAD_P99_MS_MAX = 10.0


class Latency(msgspec.Struct, frozen=True):
    """Percentiles in milliseconds (nearest rank) of ``count`` samples."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Latency:
        ordered = sorted(samples_ms)
        if not ordered:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)

        def rank(fraction: float) -> float:
            index = max(0, math.ceil(fraction * len(ordered)) - 1)
            return round(ordered[index], 3)

        return cls(
            len(ordered), rank(0.5), rank(0.9), rank(0.99), rank(0.999), round(ordered[-1], 3)
        )


# Length of the intervals a run's latencies are also reported by (when they started).
INTERVAL_S = 0.5


class Interval(msgspec.Struct, frozen=True, array_like=True):
    """Latencies of the calls that started in ``[start_s, start_s + INTERVAL_S)`` of the
    measured window: a stall shows as the intervals it spoils, not only in the p99."""

    start_s: float
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def intervals(results: Sequence[JobResult], duration_s: float) -> list[Interval]:
    buckets: list[list[float]] = [[] for _ in range(math.ceil(duration_s / INTERVAL_S))]
    for result in results:
        for started_s, latency_ms in zip(result.started_s, result.latencies_ms, strict=True):
            index = min(max(0, int(started_s / INTERVAL_S)), len(buckets) - 1)
            buckets[index].append(latency_ms)
    found = []
    for index, samples in enumerate(buckets):
        latency = Latency.of(samples)
        found.append(
            Interval(
                index * INTERVAL_S, latency.count, latency.p50_ms, latency.p99_ms, latency.max_ms
            )
        )
    return found


class AutovacuumSeen(msgspec.Struct, frozen=True):
    """What Postgres's autovacuum workers did during a window (``_probe.AutovacuumWatch``):
    the distinct ``pg_stat_activity.query`` texts seen (``autovacuum: VACUUM
    pg_toast.pg_toast_16584``, the event log's TOAST table) and the share of looks that
    found at least one worker busy."""

    queries: list[str]
    share: float


class Measurement(msgspec.Struct, frozen=True):
    """One bounded run. ``kind``: hot, baseline, partitions or open.

    ``throughput_per_s`` counts reserve + commit pairs (baseline: granted UPDATEs) that
    finished in the window; ``latency`` is the reserve (baseline: UPDATE) latency, from
    the send (open loop: from the intended send time) to the reply; ``cores`` is the CPU
    each component used during the window; ``intervals``: the latency by half-second of
    the window (by when the calls started).
    """

    kind: str
    concurrency: int
    target_rate_per_s: float | None
    duration_s: float
    throughput_per_s: float
    latency: Latency
    denied: int
    errors: int
    dropped: int
    first_error: str | None
    cores: dict[str, float]
    completed_total: int
    # Ledger process CPU per pair (or per UPDATE: 0): robust to other load on the machine.
    ledger_cpu_us_per_pair: float
    intervals: list[Interval] = msgspec.field(default_factory=list)
    # Autovacuum work seen during the window (pg_stat_activity's query, looked at twice a
    # second), and the share of those looks that found a worker busy.
    autovacuum: list[str] = msgspec.field(default_factory=list)
    autovacuum_share: float = 0.0

    @classmethod
    def of(
        cls,
        kind: str,
        *,
        concurrency: int,
        target_rate_per_s: float | None,
        duration_s: float,
        results: Sequence[JobResult],
        cores: dict[str, float],
        autovacuum: AutovacuumSeen | None = None,
    ) -> Measurement:
        samples = [latency for result in results for latency in result.latencies_ms]
        errors = [result.first_error for result in results if result.first_error is not None]
        throughput = sum(result.completed for result in results) / duration_s
        ledger_cpu_us = cores.get("ledger", 0.0) * 1e6 / throughput if throughput else 0.0
        return cls(
            kind=kind,
            concurrency=concurrency,
            target_rate_per_s=target_rate_per_s,
            duration_s=duration_s,
            throughput_per_s=round(throughput, 1),
            latency=Latency.of(samples),
            denied=sum(result.denied for result in results),
            errors=sum(result.errors for result in results),
            dropped=sum(result.dropped for result in results),
            first_error=errors[0] if errors else None,
            cores=cores,
            completed_total=sum(result.completed_total for result in results),
            ledger_cpu_us_per_pair=round(ledger_cpu_us, 1),
            intervals=intervals(results, duration_s),
            autovacuum=autovacuum.queries if autovacuum is not None else [],
            autovacuum_share=autovacuum.share if autovacuum is not None else 0.0,
        )

    def vacuum_note(self) -> str:
        """``autovacuum 55% of the window: <queries>``, or "" when none was seen."""
        if not self.autovacuum:
            return ""
        return f"autovacuum {self.autovacuum_share:.0%} of the window: {', '.join(self.autovacuum)}"

    def summary(self) -> str:
        rate = f"{self.throughput_per_s:,.0f}/s"
        cores = ", ".join(f"{name} {used:.2f}" for name, used in self.cores.items())
        problems = ""
        if self.errors or self.denied or self.dropped:
            problems = f", errors {self.errors} denied {self.denied} dropped {self.dropped}"
            if self.first_error:
                problems += f" ({self.first_error})"
        note = self.vacuum_note()
        vacuum = f"; {note}" if note else ""
        return (
            f"{rate}, p50 {self.latency.p50_ms:.2f} ms, p99 {self.latency.p99_ms:.2f} ms"
            f"{problems}; cores: {cores}{vacuum}"
        )


class Acceptance(msgspec.Struct, frozen=True):
    hot_peak_pairs_per_s: float
    baseline_peak_per_s: float
    ratio: float
    half_load_rate_per_s: float
    half_load_p99_ms: float
    pairs_per_s_ok: bool
    ratio_ok: bool
    half_load_p99_ok: bool

    @property
    def passed(self) -> bool:
        return self.pairs_per_s_ok and self.ratio_ok and self.half_load_p99_ok


def acceptance(measurements: Sequence[Measurement]) -> Acceptance | None:
    hot = [m.throughput_per_s for m in measurements if m.kind == "hot"]
    baseline = [m.throughput_per_s for m in measurements if m.kind == "baseline"]
    half = [m for m in measurements if m.kind == "open"]
    if not hot or not baseline or not half:
        return None
    ratio = max(hot) / max(baseline) if max(baseline) > 0 else math.inf
    return Acceptance(
        hot_peak_pairs_per_s=max(hot),
        baseline_peak_per_s=max(baseline),
        ratio=round(ratio, 2),
        half_load_rate_per_s=half[0].throughput_per_s,
        half_load_p99_ms=half[0].latency.p99_ms,
        pairs_per_s_ok=max(hot) >= PAIRS_PER_S_MIN,
        ratio_ok=ratio >= BASELINE_RATIO_MIN,
        half_load_p99_ok=half[0].latency.p99_ms <= HALF_LOAD_P99_MS_MAX,
    )


def table(measurements: Sequence[Measurement], verdict: Acceptance | None) -> str:
    """The human-readable report (plain text, fixed-width columns)."""
    lines = [
        "hot budget (1 key, 1 partition): reserve+commit pairs vs. one-row UPDATE baseline",
        f"{'outstanding':>11} | {'pairs/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'us/pair':>7} |"
        f" {'UPDATE/s':>9} {'p50 ms':>7} {'p99 ms':>7} | {'ratio':>6}",
    ]
    baseline = {m.concurrency: m for m in measurements if m.kind == "baseline"}
    for hot in (m for m in measurements if m.kind == "hot"):
        row = (
            f"{hot.concurrency:>11} | {hot.throughput_per_s:>9,.0f} {hot.latency.p50_ms:>7.2f}"
            f" {hot.latency.p99_ms:>7.2f} {hot.ledger_cpu_us_per_pair:>7.1f} |"
        )
        base = baseline.get(hot.concurrency)
        if base is None:
            row += f" {'-':>9} {'-':>7} {'-':>7} | {'-':>6}"
        else:
            ratio = hot.throughput_per_s / base.throughput_per_s if base.throughput_per_s else 0
            row += (
                f" {base.throughput_per_s:>9,.0f} {base.latency.p50_ms:>7.2f}"
                f" {base.latency.p99_ms:>7.2f} | {ratio:>5.1f}x"
            )
        lines.append(row)
    for m in measurements:
        if m.kind == "partitions":
            lines.append(
                f"8 partitions busy, {m.concurrency} outstanding:"
                f" {m.throughput_per_s:,.0f} pairs/s, p50 {m.latency.p50_ms:.2f} ms,"
                f" p99 {m.latency.p99_ms:.2f} ms"
            )
        elif m.kind == "open":
            lines.append(
                f"open loop at {m.target_rate_per_s or 0:,.0f} pairs/s (half the peak):"
                f" {m.throughput_per_s:,.0f} pairs/s done, reserve p50 {m.latency.p50_ms:.2f} ms,"
                f" p99 {m.latency.p99_ms:.2f} ms, p99.9 {m.latency.p999_ms:.2f} ms,"
                f" max {m.latency.max_ms:.2f} ms, dropped {m.dropped}"
            )
            lines += interval_lines(m)
    lines.append(
        "us/pair: ledger process CPU per pair; 'other' below: CPU used by anything else on"
        " the machine during the run; 'steal': CPU the hypervisor took (a capped virtual"
        " machine is frozen whole, for ~100 ms at a time: its latency tail is the machine's)"
    )
    lines.append(
        "cores used during each run (and Postgres autovacuum work seen during it, part of"
        " postgres's cores):"
    )
    for m in measurements:
        cores = "  ".join(f"{name} {used:.2f}" for name, used in m.cores.items())
        note = m.vacuum_note()
        vacuum = f"  [{note}]" if note else ""
        lines.append(f"  {m.kind:>10} {m.concurrency:>5}: {cores}{vacuum}")
    if verdict is not None:
        mark = {True: "ok", False: "NOT MET"}
        lines += [
            "acceptance (issue 3, item 10):",
            f"  >= {PAIRS_PER_S_MIN:,} pairs/s on one hot budget:"
            f" {verdict.hot_peak_pairs_per_s:,.0f} {mark[verdict.pairs_per_s_ok]}",
            f"  >= {BASELINE_RATIO_MIN:g}x the baseline ({verdict.baseline_peak_per_s:,.0f}/s):"
            f" {verdict.ratio:.1f}x {mark[verdict.ratio_ok]}",
            f"  p99 <= {HALF_LOAD_P99_MS_MAX:g} ms at half load"
            f" ({verdict.half_load_rate_per_s:,.0f}/s): {verdict.half_load_p99_ms:.2f} ms"
            f" {mark[verdict.half_load_p99_ok]}",
        ]
    return "\n".join(lines)


def interval_lines(m: Measurement, per_line: int = 6) -> list[str]:
    """The run's latency by half-second, ``start s: p50/p99 ms``, a few to a line."""
    cells = [
        f"{interval.start_s:4.1f}s {interval.p50_ms:5.1f}/{interval.p99_ms:5.1f}"
        for interval in m.intervals
    ]
    lines = [f"  by half-second of the window (start: reserve p50/p99 ms, {INTERVAL_S:g} s each):"]
    for first in range(0, len(cells), per_line):
        lines.append("    " + "   ".join(cells[first : first + per_line]))
    return lines


class Report(msgspec.Struct, frozen=True):
    started_at: str
    settings: dict[str, object]
    environment: dict[str, object]
    measurements: list[Measurement]
    acceptance: Acceptance | None
    checks: dict[str, object]


def write(report: Report, results_dir: Path) -> Path:
    """Write ``ledger-<timestamp>.json`` and ``ledger-latest.json``; return the first."""
    return write_results(report, results_dir, "ledger")
