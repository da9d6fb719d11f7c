"""The load-generator processes, as a pool the orchestrators hand jobs to."""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from bench.ledger._load import AnyJob, JobResult, StopJob, decode_result, encode, worker_main

# Bound of a worker's graceful exit after a StopJob.
STOP_DEADLINE_S = 10.0


@dataclass(slots=True)
class _Worker:
    process: BaseProcess
    connection: Connection


class WorkerPool:
    """``count`` worker processes (spawned, so they share nothing with us but a pipe)."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        for index in range(count):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=worker_main, args=(child_end,), name=f"bench-client-{index}", daemon=True
            )
            process.start()
            child_end.close()
            self._workers.append(_Worker(process, parent_end))

    def __len__(self) -> int:
        return len(self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def send(self, jobs: Sequence[AnyJob]) -> list[int]:
        """Hand one job to each of the first ``len(jobs)`` workers; return their pids."""
        assert len(jobs) <= len(self._workers), "more jobs than workers"
        workers = self._workers[: len(jobs)]
        for worker, job in zip(workers, jobs, strict=True):
            worker.connection.send_bytes(encode(job))
        return [w.process.pid for w in workers if w.process.pid is not None]

    def collect(self, count: int, deadline_s: float) -> list[JobResult]:
        """The results of the first ``count`` workers (each within ``deadline_s``)."""
        results = []
        for worker in self._workers[:count]:
            if not worker.connection.poll(deadline_s):
                raise TimeoutError(f"{worker.process.name} sent no result")
            results.append(decode_result(worker.connection.recv_bytes()))
        return results

    def stop(self) -> None:
        for worker in self._workers:
            if worker.process.is_alive():
                worker.connection.send_bytes(encode(StopJob()))
        for worker in self._workers:
            worker.process.join(timeout=STOP_DEADLINE_S)
            if worker.process.is_alive():
                worker.process.kill()
