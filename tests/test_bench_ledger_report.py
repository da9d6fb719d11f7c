"""bench/ledger's report: the latency by half-second of a run's window, autovacuum beside it."""

from __future__ import annotations

import asyncio
import math
import time

import msgspec

from bench.ledger._load import JobResult
from bench.ledger._probe import AutovacuumWatch
from bench.ledger._report import AutovacuumSeen, Measurement, intervals, table


def test_latencies_are_reported_by_the_half_second_they_started_in() -> None:
    # Two load processes; a stall in the second half-second of a 1.5 s window.
    results = [
        JobResult(latencies_ms=[2.0, 3.0, 40.0], started_s=[0.1, 0.4, 0.6]),
        JobResult(latencies_ms=[50.0, 4.0, 5.0], started_s=[0.9, 1.2, -0.01]),
    ]
    found = intervals(results, 1.5)
    assert [interval.start_s for interval in found] == [0.0, 0.5, 1.0]
    assert [interval.count for interval in found] == [3, 2, 1]
    # A call that started just before the window (a closed loop's) counts in the first.
    assert found[0].max_ms == 5.0
    assert (found[1].p50_ms, found[1].max_ms) == (40.0, 50.0)
    assert found[2].p99_ms == 4.0


def _open_run(
    results: list[JobResult], cores: dict[str, float], autovacuum: AutovacuumSeen | None = None
) -> Measurement:
    """An open-loop run of 1.5 s at 2 pairs/s."""
    return Measurement.of(
        "open",
        concurrency=0,
        target_rate_per_s=2.0,
        duration_s=1.5,
        results=results,
        cores=cores,
        autovacuum=autovacuum,
    )


def test_an_empty_half_second_has_no_percentiles_and_the_table_shows_them_all() -> None:
    results = [JobResult(completed=2, latencies_ms=[1.0, 9.0], started_s=[0.2, 1.1])]
    measurement = _open_run(results, {"ledger": 0.1})
    assert measurement.intervals[1].count == 0
    assert math.isnan(measurement.intervals[1].p99_ms)
    text = table([measurement], None)
    assert "by half-second of the window" in text
    assert " 0.0s   1.0/  1.0" in text
    assert " 1.0s   9.0/  9.0" in text


def test_autovacuum_seen_beside_a_run_is_shown_with_its_cores() -> None:
    results = [JobResult(completed=3, latencies_ms=[1.0, 2.0, 9.0], started_s=[0.2, 0.7, 1.1])]
    vacuum = "autovacuum: VACUUM ANALYZE public.events"
    seen = _open_run(results, {"postgres": 0.36}, AutovacuumSeen([vacuum], 0.55))
    quiet = Measurement.of(
        "hot", concurrency=16, target_rate_per_s=None, duration_s=1.5, results=results, cores={}
    )
    note = f"autovacuum 55% of the window: {vacuum}"
    assert seen.summary().endswith(f"cores: postgres 0.36; {note}")
    assert "autovacuum" not in quiet.summary()
    text = table([quiet, seen], None)
    assert f"open     0: postgres 0.36  [{note}]" in text
    assert "hot    16: \n" in text + "\n"
    # Results written before the field existed still load.
    encoded = msgspec.json.encode(seen)
    fields = b',"autovacuum":["' + vacuum.encode() + b'"],"autovacuum_share":0.55'
    assert fields in encoded
    old = msgspec.json.decode(encoded.replace(fields, b""), type=Measurement)
    assert (old.autovacuum, old.autovacuum_share) == ([], 0.0)


async def test_the_autovacuum_watch_reads_a_quiet_database_as_quiet(database_url: str) -> None:
    begin_at = time.monotonic() + 0.2
    watch = AutovacuumWatch(database_url, begin_at, begin_at + 0.5, interval_s=0.1)
    watch.start()
    # Another thread with its own event loop: this loop stays free meanwhile.
    while watch.is_alive():
        await asyncio.sleep(0.05)
    assert watch.result(timeout_s=0) == AutovacuumSeen([], 0.0)
    assert time.monotonic() >= begin_at + 0.4  # it looked until the window's end
