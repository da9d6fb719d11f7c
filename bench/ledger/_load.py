"""Load-generator processes: ledger pairs (closed and open loop) and the UPDATE baseline.

A worker is a separate process (the machine has few cores, and the ledger must not share
an interpreter with its load). It receives one job at a time over a pipe, runs it in a
fresh event loop and sends back a :class:`JobResult`. All processes read the same clock
(``time.monotonic``, CLOCK_MONOTONIC on Linux), so the orchestrator gives every worker the
same start time and measurement window.

Cheapness matters more than anything here: the ledger client is the gateway's own
:class:`~spendgate_gateway._ledger_client.LedgerClient` (it coalesces concurrent commands
into one NATS request per partition), each coroutine reuses one ``Reserve`` command, and
nothing else is allocated per pair but the ``Commit``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection

import asyncpg
import msgspec
import nats
from nats.aio.client import Client as NatsClient

from bench._open_loop import Window as Window
from bench._open_loop import open_loop, sleep_until
from bench._workers import WorkerProtocol, run_job, serve_jobs
from spendgate_common.errors import LedgerUnavailableError
from spendgate_common.ledger_v1 import Commit, Granted, Reserve
from spendgate_gateway._ledger_client import LedgerClient

# Deadline of one ledger command, retries included (the gateway's default is 2 s).
LEDGER_TIMEOUT = timedelta(seconds=10)
# Bound of one baseline UPDATE.
BASELINE_STATEMENT_TIMEOUT = timedelta(seconds=10)
# How long a finished run waits for its stragglers (open loop) before giving up on them.
DRAIN_DEADLINE = timedelta(seconds=15)
# Pause after a failed command before the coroutine sends the next one.
ERROR_PAUSE = timedelta(milliseconds=10)

BASELINE_TABLE = "bench_budgets"
BASELINE_ROW_ID = 1
BASELINE_UPDATE = (
    f"UPDATE {BASELINE_TABLE} SET spent = spent + $1"  # noqa: S608 (a constant name)
    " WHERE id = $2 AND spent + $1 <= cap"
)


class KeySpec(msgspec.Struct, frozen=True):
    tenant: str
    key_id: str
    secret_sha256: str


class LedgerClosedJob(msgspec.Struct, frozen=True, tag="ledger_closed"):
    """``concurrency`` coroutines, each: reserve, wait, commit the same amount, wait, again."""

    nats_url: str
    partition_count: int
    keys: list[KeySpec]
    concurrency: int
    amount_micros: int
    inflight_max: int
    window: Window


class LedgerOpenJob(msgspec.Struct, frozen=True, tag="ledger_open"):
    """Pairs started at a fixed rate, whatever the replies do (at most ``outstanding_max``)."""

    nats_url: str
    partition_count: int
    keys: list[KeySpec]
    rate_per_s: float
    outstanding_max: int
    amount_micros: int
    inflight_max: int
    window: Window


class LedgerCountJob(msgspec.Struct, frozen=True, tag="ledger_count"):
    """``concurrency`` coroutines doing reserve+commit pairs until ``pairs`` were sent.

    With ``idempotency_keys`` every reserve carries its own idempotency key (a UUID, 36
    characters, as the ``Idempotency-Key`` header usually holds), so the ledger remembers
    an answer per reservation; without, it remembers only the settled reservation ids.
    """

    nats_url: str
    partition_count: int
    keys: list[KeySpec]
    pairs: int
    concurrency: int
    amount_micros: int
    inflight_max: int
    idempotency_keys: bool


class BaselineJob(msgspec.Struct, frozen=True, tag="baseline"):
    """``concurrency`` coroutines sending the conditional UPDATE through a pool."""

    database_url: str
    concurrency: int
    pool_size: int
    amount_micros: int
    window: Window


class StopJob(msgspec.Struct, frozen=True, tag="stop"):
    pass


AnyJob = LedgerClosedJob | LedgerOpenJob | LedgerCountJob | BaselineJob | StopJob


class JobResult(msgspec.Struct):
    """What one worker saw. Counts and latencies cover operations that ended in the window.

    ``completed``: pairs (baseline: granted UPDATEs) finished in the window;
    ``completed_total``: the same over the whole run, warm-up included (to check the budget
    afterwards); ``latencies_ms``: reserve (baseline: UPDATE) latencies in the window;
    ``started_s``: when each of them started (open loop: was due), in seconds from the
    window's beginning, in the same order;
    ``denied``: reserves refused or UPDATEs that matched no row; ``errors``: commands that
    failed (timeouts, ledger unavailable); ``dropped``: open-loop starts skipped because
    ``outstanding_max`` pairs were still waiting.
    """

    completed: int = 0
    completed_total: int = 0
    latencies_ms: list[float] = msgspec.field(default_factory=list)
    started_s: list[float] = msgspec.field(default_factory=list)
    denied: int = 0
    errors: int = 0
    dropped: int = 0
    first_error: str | None = None


_job_decoder = msgspec.msgpack.Decoder(AnyJob)
_result_decoder = msgspec.msgpack.Decoder(JobResult)
_encoder = msgspec.msgpack.Encoder()


def encode(message: AnyJob | JobResult) -> bytes:
    return _encoder.encode(message)


def decode_result(data: bytes) -> JobResult:
    return _result_decoder.decode(data)


_STOP = encode(StopJob())


def _handle(data: bytes) -> bytes:
    job = _job_decoder.decode(data)
    assert not isinstance(job, StopJob), "serve_jobs() handles the stop message"
    return encode(run_job(_run(job)))


def worker_main(connection: Connection) -> None:
    """Entry point of a worker process: run jobs until a :class:`StopJob` arrives."""
    serve_jobs(connection, _STOP, _handle)


# How the orchestrators drive these workers (bench._workers.WorkerPool).
WORKER_PROTOCOL: WorkerProtocol[AnyJob, JobResult] = WorkerProtocol(
    main=worker_main, encode_job=encode, decode_result=decode_result, stop=_STOP
)


async def _run(job: LedgerClosedJob | LedgerOpenJob | LedgerCountJob | BaselineJob) -> JobResult:
    match job:
        case LedgerClosedJob():
            return await _ledger_closed(job)
        case LedgerOpenJob():
            return await _ledger_open(job)
        case LedgerCountJob():
            return await _ledger_count(job)
        case BaselineJob():
            return await _baseline(job)


@dataclass(slots=True)
class _Tally:
    window: Window
    completed: int = 0
    completed_total: int = 0
    latencies_s: list[float] = field(default_factory=list)
    started_at: list[float] = field(default_factory=list)
    denied: int = 0
    errors: int = 0
    dropped: int = 0
    first_error: str | None = None

    def in_window(self, at: float) -> bool:
        return self.window.begin_at <= at < self.window.end_at

    def latency(self, started_at: float, replied_at: float) -> None:
        """Record the latency of a call that started at ``started_at``."""
        self.latencies_s.append(replied_at - started_at)
        self.started_at.append(started_at)

    def error(self, error: BaseException) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{type(error).__name__}: {error}"

    def result(self) -> JobResult:
        return JobResult(
            completed=self.completed,
            completed_total=self.completed_total,
            latencies_ms=[latency * 1000 for latency in self.latencies_s],
            started_s=[round(at - self.window.begin_at, 4) for at in self.started_at],
            denied=self.denied,
            errors=self.errors,
            dropped=self.dropped,
            first_error=self.first_error,
        )


async def _connect_ledger(
    nats_url: str, partition_count: int, inflight_max: int
) -> tuple[NatsClient, LedgerClient]:
    connection = await nats.connect(nats_url, name="spendgate-bench", connect_timeout=5)
    client = LedgerClient(
        connection,
        partition_count=partition_count,
        timeout=LEDGER_TIMEOUT,
        inflight_max=inflight_max,
    )
    return connection, client


def _reserve(key: KeySpec, amount_micros: int) -> Reserve:
    return Reserve(
        tenant=key.tenant,
        key_id=key.key_id,
        secret_sha256=key.secret_sha256,
        amount_micros=amount_micros,
        vendor="bench",
        operation="pair",
    )


async def _pair(client: LedgerClient, reserve: Reserve, started_at: float, tally: _Tally) -> None:
    """One reserve + commit; the reserve's latency counts from ``started_at``."""
    try:
        granted = await client.execute(reserve)
        replied_at = time.monotonic()
        if not isinstance(granted, Granted):
            tally.denied += 1
            return
        if tally.in_window(replied_at):
            tally.latency(started_at, replied_at)
        commit = Commit(
            tenant=reserve.tenant,
            key_id=reserve.key_id,
            secret_sha256=reserve.secret_sha256,
            reservation_id=granted.reservation_id,
            actual_micros=reserve.amount_micros,
        )
        await client.execute(commit)
    except LedgerUnavailableError as error:
        tally.error(error)
        await asyncio.sleep(ERROR_PAUSE.total_seconds())
        return
    tally.completed_total += 1
    if tally.in_window(time.monotonic()):
        tally.completed += 1


async def _ledger_closed(job: LedgerClosedJob) -> JobResult:
    connection, client = await _connect_ledger(job.nats_url, job.partition_count, job.inflight_max)
    tally = _Tally(job.window)

    async def pairs_in_a_row(reserve: Reserve) -> None:
        while (started_at := time.monotonic()) < job.window.end_at:
            await _pair(client, reserve, started_at, tally)

    reserves = [_reserve(key, job.amount_micros) for key in job.keys]
    try:
        await sleep_until(job.window.start_at)
        await asyncio.gather(
            *(pairs_in_a_row(reserves[index % len(reserves)]) for index in range(job.concurrency))
        )
    finally:
        await client.close()
        await connection.close()
    return tally.result()


async def _ledger_open(job: LedgerOpenJob) -> JobResult:
    connection, client = await _connect_ledger(job.nats_url, job.partition_count, job.inflight_max)
    tally = _Tally(job.window)
    reserves = [_reserve(key, job.amount_micros) for key in job.keys]

    async def pair(index: int, scheduled_at: float) -> None:
        await _pair(client, reserves[index % len(reserves)], scheduled_at, tally)

    try:
        counts = await open_loop(
            pair,
            start_at=job.window.start_at,
            end_at=job.window.end_at,
            rate_per_s=job.rate_per_s,
            outstanding_max=job.outstanding_max,
            drain_deadline_s=DRAIN_DEADLINE.total_seconds(),
        )
    finally:
        await client.close()
        await connection.close()
    tally.dropped = counts.dropped
    return tally.result()


async def _ledger_count(job: LedgerCountJob) -> JobResult:
    connection, client = await _connect_ledger(job.nats_url, job.partition_count, job.inflight_max)
    # Counts everything: the window is "always".
    tally = _Tally(Window(0.0, 0.0, float("inf")))
    sent = 0

    async def pairs_in_a_row(reserve: Reserve) -> None:
        nonlocal sent
        while sent < job.pairs:
            sent += 1
            if job.idempotency_keys:
                reserve = msgspec.structs.replace(reserve, idempotency_key=str(uuid.uuid4()))
            await _pair(client, reserve, time.monotonic(), tally)

    reserves = [_reserve(key, job.amount_micros) for key in job.keys]
    try:
        await asyncio.gather(
            *(pairs_in_a_row(reserves[index % len(reserves)]) for index in range(job.concurrency))
        )
    finally:
        await client.close()
        await connection.close()
    return tally.result()


async def _baseline(job: BaselineJob) -> JobResult:
    pool = await asyncpg.create_pool(
        job.database_url,
        min_size=job.pool_size,
        max_size=job.pool_size,
        command_timeout=BASELINE_STATEMENT_TIMEOUT.total_seconds(),
    )
    assert pool is not None
    tally = _Tally(job.window)

    async def updates_in_a_row() -> None:
        while (started_at := time.monotonic()) < job.window.end_at:
            try:
                status = await pool.execute(BASELINE_UPDATE, job.amount_micros, BASELINE_ROW_ID)
            except (asyncpg.PostgresError, OSError, TimeoutError) as error:
                tally.error(error)
                await asyncio.sleep(ERROR_PAUSE.total_seconds())
                continue
            replied_at = time.monotonic()
            if status != "UPDATE 1":
                tally.denied += 1
                continue
            tally.completed_total += 1
            if tally.in_window(replied_at):
                tally.completed += 1
                tally.latency(started_at, replied_at)

    try:
        await sleep_until(job.window.start_at)
        await asyncio.gather(*(updates_in_a_row() for _ in range(job.concurrency)))
    finally:
        await pool.close()
    return tally.result()
