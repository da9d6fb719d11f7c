"""Verification: recompute every partition's chain from the ledger's event log.

:func:`verify` reads ``events`` and ``audit_chain`` in one read-only, repeatable-read
transaction (one consistent snapshot while the ledger and the auditor keep writing),
streaming both in ``(partition, seq)`` order through server-side cursors, so memory stays
bounded by one page per table whatever the size of the log. Each partition is checked by
the pure :class:`~spendgate_auditor._verifier.PartitionVerifier`; docs/audit.md lists what
each problem means.

:func:`verify_main` is the command-line form (``spendgate audit verify``).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import asyncpg

from spendgate_auditor._verifier import (
    HeadRow,
    PartitionReport,
    PartitionVerifier,
    Problem,
    ProblemKind,
)
from spendgate_common.errors import StoreUnavailableError
from spendgate_common.pg import translate_errors

if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "PartitionReport",
    "Problem",
    "ProblemKind",
    "VerifyReport",
    "format_report",
    "verify",
    "verify_main",
]

# Rows a cursor fetches per round trip (per table).
VERIFY_PAGE_ROWS = 5_000
CONNECT_TIMEOUT = timedelta(seconds=10)
# Bound of one round trip (one page), not of the whole verification.
STATEMENT_TIMEOUT = timedelta(seconds=60)
# Exit status of verify_main when verification could not run (database unreachable).
EXIT_CODE_UNVERIFIED = 2


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Every partition found in the events log, the audit chain or the heads, by number."""

    partitions: tuple[PartitionReport, ...]

    @property
    def ok(self) -> bool:
        """No problem in any partition (events not yet audited are not a problem)."""
        return all(report.ok for report in self.partitions)

    @property
    def broken(self) -> list[PartitionReport]:
        return [report for report in self.partitions if not report.ok]

    @property
    def events(self) -> int:
        return sum(report.events for report in self.partitions)

    @property
    def verified(self) -> int:
        return sum(report.verified for report in self.partitions)

    @property
    def not_yet_audited(self) -> int:
        return sum(report.not_yet_audited for report in self.partitions)


async def verify(database_url: str, *, partition: int | None = None) -> VerifyReport:
    """Verify every partition's chain (or only ``partition``) against the events log.

    Raises ``StoreUnavailableError`` when Postgres cannot be reached or fails mid-way,
    and asyncpg's ``UndefinedTableError`` when the database has no Spendgate schema.
    """
    async with translate_errors("connect for verification"):
        connection: asyncpg.Connection[Any] = await asyncpg.connect(
            database_url,
            timeout=CONNECT_TIMEOUT.total_seconds(),
            command_timeout=STATEMENT_TIMEOUT.total_seconds(),
        )
    try:
        async with (
            translate_errors("verify"),
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            return await _verify_snapshot(connection, partition)
    finally:
        await connection.close()


async def _verify_snapshot(
    connection: asyncpg.Connection[Any], partition: int | None
) -> VerifyReport:
    where, arguments = ("", ()) if partition is None else (" WHERE partition = $1", (partition,))
    heads = {
        row["partition"]: HeadRow(row["seq"], bytes(row["link"]))
        for row in await connection.fetch(
            f"SELECT partition, seq, link FROM audit_heads{where}",  # noqa: S608 (constant)
            *arguments,
        )
    }
    events = _rows(
        connection,
        f"SELECT partition, seq, body FROM events{where} ORDER BY partition, seq",  # noqa: S608
        arguments,
    )
    chain = _rows(
        connection,
        f"SELECT partition, seq, link FROM audit_chain{where} ORDER BY partition, seq",  # noqa: S608
        arguments,
    )
    reports: list[PartitionReport] = []
    verifier: PartitionVerifier | None = None
    event = await anext(events, None)
    chained = await anext(chain, None)
    while event is not None or chained is not None:
        key = min(row[:2] for row in (event, chained) if row is not None)
        if verifier is None or verifier.partition != key[0]:
            if verifier is not None:
                reports.append(verifier.finish(heads.pop(verifier.partition, None)))
            verifier = PartitionVerifier(key[0])
        body = event[2] if event is not None and event[:2] == key else None
        link = chained[2] if chained is not None and chained[:2] == key else None
        verifier.observe(key[1], body, link)
        if body is not None:
            event = await anext(events, None)
        if link is not None:
            chained = await anext(chain, None)
    if verifier is not None:
        reports.append(verifier.finish(heads.pop(verifier.partition, None)))
    # Heads of partitions without any row: fine at seq 0, a deleted chain otherwise.
    for head_partition, head in heads.items():
        if head.seq > 0:
            reports.append(PartitionVerifier(head_partition).finish(head))
    return VerifyReport(tuple(sorted(reports, key=lambda report: report.partition)))


async def _rows(
    connection: asyncpg.Connection[Any], query: str, arguments: tuple[int, ...]
) -> AsyncIterator[tuple[int, int, bytes]]:
    """``(partition, seq, bytes)`` rows of ``query``, a page at a time, in query order."""
    async for row in connection.cursor(query, *arguments, prefetch=VERIFY_PAGE_ROWS):
        yield row[0], row[1], bytes(row[2])


def format_report(report: VerifyReport) -> list[str]:
    """Human-readable lines: one per partition, then the verdict (one line per break)."""
    lines: list[str] = []
    for partition in report.partitions:
        if partition.problem is not None:
            problem = partition.problem
            lines.append(
                f"partition {partition.partition}: BROKEN at seq {problem.seq}"
                f" ({problem.kind}): {problem.reason}"
            )
        elif partition.not_yet_audited:
            lines.append(
                f"partition {partition.partition}: OK, {partition.verified} events verified,"
                f" {partition.not_yet_audited} not yet audited"
            )
        else:
            lines.append(
                f"partition {partition.partition}: OK, {partition.verified} events verified"
            )
    if report.ok:
        verdict = f"OK: {report.verified} events in {len(report.partitions)} partitions verified"
        if report.not_yet_audited:
            verdict += f", {report.not_yet_audited} events not yet audited"
        lines.append(verdict)
    for broken in report.broken:
        assert broken.problem is not None
        lines.append(
            f"BROKEN: partition {broken.partition} at seq {broken.problem.seq}:"
            f" {broken.problem.reason}"
        )
    return lines


def verify_main(database_url: str, *, partition: int | None = None) -> int:
    """Run :func:`verify`, print its report to stdout; return the process exit status.

    0: every chain verified (events not yet audited are listed, not failures); 1: a chain
    is broken; 2 (``EXIT_CODE_UNVERIFIED``): verification could not run, with the reason
    on stderr. Must be called outside a running event loop.
    """
    try:
        report = asyncio.run(verify(database_url, partition=partition))
    except StoreUnavailableError as error:
        print(f"ERROR: cannot verify: {error}", file=sys.stderr)
        return EXIT_CODE_UNVERIFIED
    except asyncpg.UndefinedTableError as error:
        print(f"ERROR: cannot verify: no Spendgate schema ({error})", file=sys.stderr)
        return EXIT_CODE_UNVERIFIED
    except asyncpg.PostgresError as error:
        print(f"ERROR: cannot verify: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_CODE_UNVERIFIED
    for line in format_report(report):
        print(line)
    return 0 if report.ok else 1
