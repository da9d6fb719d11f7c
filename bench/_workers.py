"""Load-generator processes, as a pool the orchestrators hand jobs to (every benchmark).

A worker is a spawned process (it shares nothing with us but a pipe), so the load does not
share an interpreter with the orchestrator or with the system under test. What runs in it
and how jobs and results cross the pipe is a :class:`WorkerProtocol` that each benchmark
defines next to its jobs (``bench.ledger._load``, ``bench.gateway._load``).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Generic, TypeVar

# Bound of a worker's graceful exit after the stop message.
STOP_DEADLINE_S = 10.0

JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WorkerProtocol(Generic[JobT, ResultT]):
    """What a worker runs, and how its jobs and results are encoded.

    ``main`` (a module-level function, so that a spawned process can import it) gets the
    child's end of the pipe; it answers every job with one result and returns when it
    reads ``stop``.
    """

    main: Callable[[Connection], None]
    encode_job: Callable[[JobT], bytes]
    decode_result: Callable[[bytes], ResultT]
    stop: bytes


def serve_jobs(connection: Connection, stop: bytes, handle: Callable[[bytes], bytes]) -> None:
    """The loop of a worker process (call it from ``WorkerProtocol.main``): answer every
    job with ``handle(job)`` until the ``stop`` message arrives."""
    while (job := connection.recv_bytes()) != stop:
        connection.send_bytes(handle(job))
    connection.close()


def run_job(job: Coroutine[Any, Any, T]) -> T:
    """Run one load-generator job with the garbage collector off: a load generator is the
    measuring instrument, and a full collection of its growing latency lists would stall
    its loop and show up as the system's latency. Reference counting still frees almost
    everything; the cycles left are collected after the job. (Not on uvloop: libuv's
    timers have millisecond resolution, and the open-loop schedule sleeps for less, so
    it would spin.)"""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        return asyncio.run(job)
    finally:
        gc.enable()
        gc.unfreeze()
        gc.collect()


@dataclass(slots=True)
class _Worker:
    process: BaseProcess
    connection: Connection


class WorkerPool(Generic[JobT, ResultT]):
    """``count`` worker processes that run ``protocol.main``."""

    def __init__(self, count: int, protocol: WorkerProtocol[JobT, ResultT]) -> None:
        context = multiprocessing.get_context("spawn")
        self._protocol = protocol
        self._workers: list[_Worker] = []
        for index in range(count):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=protocol.main, args=(child_end,), name=f"bench-client-{index}", daemon=True
            )
            process.start()
            child_end.close()
            self._workers.append(_Worker(process, parent_end))

    def __len__(self) -> int:
        return len(self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def send(self, jobs: Sequence[JobT]) -> list[int]:
        """Hand one job to each of the first ``len(jobs)`` workers; return their pids."""
        assert len(jobs) <= len(self._workers), "more jobs than workers"
        workers = self._workers[: len(jobs)]
        for worker, job in zip(workers, jobs, strict=True):
            worker.connection.send_bytes(self._protocol.encode_job(job))
        return [w.process.pid for w in workers if w.process.pid is not None]

    def collect(self, count: int, deadline_s: float) -> list[ResultT]:
        """The results of the first ``count`` workers (each within ``deadline_s``)."""
        results = []
        for worker in self._workers[:count]:
            if not worker.connection.poll(deadline_s):
                raise TimeoutError(f"{worker.process.name} sent no result")
            results.append(self._protocol.decode_result(worker.connection.recv_bytes()))
        return results

    def stop(self) -> None:
        for worker in self._workers:
            if worker.process.is_alive():
                worker.connection.send_bytes(self._protocol.stop)
        for worker in self._workers:
            worker.process.join(timeout=STOP_DEADLINE_S)
            if worker.process.is_alive():
                worker.process.kill()
