"""Load-generator processes: HTTP/1.1 calls at a fixed rate (open loop) over keep-alive.

The client is a few lines over ``asyncio`` streams, not httpx: the direct runs measure the
load generator plus loopback plus the upstream, and that figure is subtracted from the
proxied one, so the client must be cheap and steady (httpx costs several times more CPU
per call than the minimal upstream does). Requests are prepared bytes (one per key, used
in turn); a call takes an idle connection from a pool (last in, first out, so the same hot
connections serve a steady rate), opens a new one when none is idle (up to
``connections_max``), or waits for one. Every wait counts: latency runs from the
*scheduled* send time to the last byte of the answer (see :mod:`bench._open_loop`).
``send_lag`` (scheduled to written) shows how late the generator itself was.
"""

from __future__ import annotations

import asyncio
import collections
import time
from datetime import timedelta
from multiprocessing.connection import Connection

import msgspec

from bench._open_loop import Window, open_loop
from bench._workers import WorkerProtocol, run_job, serve_jobs

# Longest wait for one answer (a connection that stays silent this long is dropped).
CALL_TIMEOUT = timedelta(seconds=30)
# How long a finished run waits for its stragglers before cancelling them.
DRAIN_DEADLINE = timedelta(seconds=10)
# Bound of one connect.
CONNECT_TIMEOUT = timedelta(seconds=5)
# Largest answer head we read (the gateway's and the upstream's are a few hundred bytes).
RESPONSE_HEAD_BYTES_MAX = 65_536
# A connection idle this long is closed rather than reused: uvicorn closes idle keep-alive
# connections after 5 s, and a request sent just as it does would fail (as httpx's
# keepalive_expiry avoids it).
IDLE_EXPIRY = timedelta(seconds=4)


class CallsJob(msgspec.Struct, frozen=True, tag="calls"):
    """Send ``requests`` (in turn) to ``host:port`` at ``rate_per_s``, the first at
    ``window.start_at + phase_s`` (workers sharing a rate interleave their calls)."""

    host: str
    port: int
    requests: list[bytes]
    rate_per_s: float
    phase_s: float
    connections_initial: int
    connections_max: int
    outstanding_max: int
    window: Window


class StopJob(msgspec.Struct, frozen=True, tag="stop"):
    pass


AnyJob = CallsJob | StopJob


class CallsResult(msgspec.Struct):
    """What one worker saw. Window counts are by *scheduled* time, so a slow call at the
    end of the window still counts (once it answered, or as ``unanswered``).

    ``scheduled``: calls scheduled in the window; ``latencies_ms``: of those, the 2xx
    answers, scheduled time to last byte; ``send_lags_ms``: scheduled time to request
    written, for the same calls; ``statuses``: every answer in the window by status;
    ``errors``: connection failures and timeouts in the window; ``ok_total``: 2xx answers
    over the whole run, warm-up included (to compare with what the upstream and ledger
    counted); ``dropped``/``unanswered``: calls not started because ``outstanding_max``
    were waiting / cancelled at the drain deadline (whole run).
    """

    scheduled: int = 0
    latencies_ms: list[float] = msgspec.field(default_factory=list)
    send_lags_ms: list[float] = msgspec.field(default_factory=list)
    statuses: dict[int, int] = msgspec.field(default_factory=dict)
    errors: int = 0
    ok_total: int = 0
    dropped: int = 0
    unanswered: int = 0
    first_error: str | None = None
    # Connections open when the run ended (at least ``connections_initial``).
    connections_open: int = 0


class ProtocolError(Exception):
    """An answer this client does not understand (no Content-Length, a broken head)."""


_job_decoder = msgspec.msgpack.Decoder(AnyJob)
_result_decoder = msgspec.msgpack.Decoder(CallsResult)
_encoder = msgspec.msgpack.Encoder()


def encode(message: AnyJob | CallsResult) -> bytes:
    return _encoder.encode(message)


def decode_result(data: bytes) -> CallsResult:
    return _result_decoder.decode(data)


_STOP = encode(StopJob())


def _handle(data: bytes) -> bytes:
    job = _job_decoder.decode(data)
    assert isinstance(job, CallsJob), "serve_jobs() handles the stop message"
    return encode(run_job(_run_calls(job)))


def worker_main(connection: Connection) -> None:
    """Entry point of a worker process: run jobs until a :class:`StopJob` arrives."""
    serve_jobs(connection, _STOP, _handle)


WORKER_PROTOCOL: WorkerProtocol[AnyJob, CallsResult] = WorkerProtocol(
    main=worker_main, encode_job=encode, decode_result=decode_result, stop=_STOP
)


def request_bytes(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """A complete HTTP/1.1 POST (keep-alive) with ``body``."""
    lines = [f"POST {path} HTTP/1.1", f"host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ---------------------------------------------------------------------------- the client


class _Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    async def exchange(self, request: bytes) -> tuple[int, float]:
        """Send ``request``, read the whole answer; its status and when it was written."""
        self.writer.write(request)
        written_at = time.monotonic()
        head = await self.reader.readuntil(b"\r\n\r\n")
        if len(head) > RESPONSE_HEAD_BYTES_MAX or not head.startswith(b"HTTP/1.1 "):
            raise ProtocolError(f"not an HTTP/1.1 answer: {head[:40]!r}")
        status = int(head[9:12])
        lowered = head.lower()
        start = lowered.find(b"\r\ncontent-length:")
        if start < 0:
            raise ProtocolError("answer without content-length")
        end = lowered.index(b"\r\n", start + 2)
        length = int(lowered[start + len(b"\r\ncontent-length:") : end])
        if length:
            await self.reader.readexactly(length)
        return status, written_at

    @property
    def usable(self) -> bool:
        """False once the server closed the connection (or we began to), or soon will."""
        if time.monotonic() - self.idle_since > IDLE_EXPIRY.total_seconds():
            return False
        return not (self.reader.at_eof() or self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


class _Pool:
    """Keep-alive connections to one server: idle ones reused last in, first out."""

    def __init__(self, host: str, port: int, connections_max: int) -> None:
        self._host = host
        self._port = port
        self._connections_max = connections_max
        self._idle: list[_Connection] = []
        self._waiters: collections.deque[asyncio.Future[_Connection]] = collections.deque()
        self._every: set[_Connection] = set()
        self._replacing: set[asyncio.Task[None]] = set()
        # Connections open or being opened.
        self.opened = 0

    async def _open(self) -> _Connection:
        # Counted before the connect, so that concurrent callers respect the bound.
        self.opened += 1
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT.total_seconds()):
                reader, writer = await asyncio.open_connection(self._host, self._port)
        except BaseException:
            self.opened -= 1
            raise
        connection = _Connection(reader, writer)
        self._every.add(connection)
        return connection

    async def fill(self, count: int) -> None:
        """Open ``count`` idle connections ahead of the load (so connects are not measured)."""
        opened = await asyncio.gather(*(self._open() for _ in range(count)))
        self._idle.extend(opened)

    async def acquire(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable:
                return connection
            # Idle too long: the server closed it or is about to (IDLE_EXPIRY).
            self._forget(connection)
        if self.opened < self._connections_max:
            return await self._open()
        waiter: asyncio.Future[_Connection] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return await waiter

    def release(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self._idle.append(connection)

    def _forget(self, connection: _Connection) -> None:
        connection.close()
        self._every.discard(connection)
        self.opened -= 1

    def discard(self, connection: _Connection) -> None:
        """Close a connection in an unknown state; a waiter gets a new one instead."""
        self._forget(connection)
        if self._waiters:
            task = asyncio.get_running_loop().create_task(self._replace())
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _replace(self) -> None:
        try:
            connection = await self._open()
        except (OSError, TimeoutError) as error:
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(error)
                    return
            return
        self.release(connection)

    def close(self) -> None:
        for task in self._replacing:
            task.cancel()
        for connection in self._every:
            connection.close()
        self._every.clear()
        self._idle.clear()


class _Tally:
    def __init__(self, window: Window) -> None:
        self.window = window
        self.result = CallsResult()

    def answered(self, scheduled_at: float, status: int, written_at: float) -> None:
        answered_at = time.monotonic()
        result = self.result
        ok = 200 <= status < 300
        result.ok_total += ok
        if not self.window.measures(scheduled_at):
            return
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if ok:
            result.latencies_ms.append((answered_at - scheduled_at) * 1000)
            result.send_lags_ms.append((written_at - scheduled_at) * 1000)

    def failed(self, scheduled_at: float, error: BaseException) -> None:
        if not self.window.measures(scheduled_at):
            return
        self.result.errors += 1
        if self.result.first_error is None:
            self.result.first_error = f"{type(error).__name__}: {error}"


async def _call(pool: _Pool, request: bytes, scheduled_at: float, tally: _Tally) -> None:
    if tally.window.measures(scheduled_at):
        tally.result.scheduled += 1
    try:
        connection = await pool.acquire()
    except (OSError, TimeoutError) as error:
        tally.failed(scheduled_at, error)
        return
    try:
        async with asyncio.timeout(CALL_TIMEOUT.total_seconds()):
            status, written_at = await connection.exchange(request)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError, ValueError) as error:
        pool.discard(connection)
        tally.failed(scheduled_at, error)
        return
    except asyncio.CancelledError:
        pool.discard(connection)
        raise
    pool.release(connection)
    tally.answered(scheduled_at, status, written_at)


async def _run_calls(job: CallsJob) -> CallsResult:
    pool = _Pool(job.host, job.port, job.connections_max)
    tally = _Tally(job.window)
    requests = job.requests

    async def call(index: int, scheduled_at: float) -> None:
        await _call(pool, requests[index % len(requests)], scheduled_at, tally)

    try:
        try:
            await pool.fill(min(job.connections_initial, job.connections_max))
        except (OSError, TimeoutError) as error:
            tally.result.errors += 1
            tally.result.first_error = f"connect: {type(error).__name__}: {error}"
            return tally.result
        counts = await open_loop(
            call,
            start_at=job.window.start_at + job.phase_s,
            end_at=job.window.end_at,
            rate_per_s=job.rate_per_s,
            outstanding_max=job.outstanding_max,
            drain_deadline_s=DRAIN_DEADLINE.total_seconds(),
        )
    finally:
        pool.close()
    result = tally.result
    result.dropped = counts.dropped
    result.unanswered = counts.unfinished
    result.connections_open = pool.opened
    return result
