"""Verification: recompute every partition's chain from the ledger's event log.

:func:`verify` reads ``event_batches``, ``audit_chain`` and ``audit_checkpoints`` in one
read-only, repeatable-read transaction (one consistent snapshot while the ledger and the
auditor keep writing), streaming them in ``(partition, seq)`` order through server-side
cursors, so memory stays bounded by one page per table whatever the size of the log.
Each partition is checked by the pure
:class:`~spendgate_auditor._verifier.PartitionVerifier`, which recomputes the links from
the event bodies and checks every checkpoint's Ed25519 signature with the trusted public
keys: those in ``audit_signing_keys``, or only the ones the caller pins
(``trusted_keys``). docs/audit.md lists what each problem means.

:func:`verify_main` is the command-line form (``spendgate audit verify``).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from spendgate_auditor._chain import LINK_BYTES
from spendgate_auditor._signing import (
    PUBLIC_KEY_BYTES,
    SigningKeyError,
    key_id_of,
    parse_public_key,
)
from spendgate_auditor._verifier import (
    CheckpointRow,
    HeadRow,
    PartitionReport,
    PartitionVerifier,
    Problem,
    ProblemKind,
    check_signature,
)
from spendgate_common.errors import StoreUnavailableError
from spendgate_common.event_batches import MalformedBatchError, split_batch
from spendgate_common.pg import translate_errors

if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "PartitionReport",
    "Problem",
    "ProblemKind",
    "VerifyReport",
    "format_report",
    "load_trusted_keys",
    "verify",
    "verify_main",
]

# Rows a cursor fetches per round trip (per table).
VERIFY_PAGE_ROWS = 5_000
# Event batch rows a cursor fetches per round trip (a batch holds up to a few thousand
# events: a page stays within tens of megabytes).
VERIFY_PAGE_BATCHES = 64
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


TrustedKeys = Mapping[str, Ed25519PublicKey]


def trusted_keys_of(public_keys: list[bytes]) -> dict[str, Ed25519PublicKey]:
    """Raw 32-byte Ed25519 public keys by their key id."""
    keys: dict[str, Ed25519PublicKey] = {}
    for raw in public_keys:
        assert len(raw) == PUBLIC_KEY_BYTES, len(raw)
        keys[key_id_of(raw)] = Ed25519PublicKey.from_public_bytes(raw)
    return keys


async def verify(
    database_url: str,
    *,
    partition: int | None = None,
    from_seq: int | None = None,
    trusted_keys: TrustedKeys | None = None,
) -> VerifyReport:
    """Verify every partition's chain (or only ``partition``) against the events log.

    ``from_seq``: verify each partition from the newest checkpoint before ``from_seq``
    on (its signature checked, its link trusted), so at least from ``from_seq``; from
    seq 1 when there is no such checkpoint. ``trusted_keys``: the public keys whose
    signatures count; ``None`` trusts every key in ``audit_signing_keys`` (whoever can
    write to Postgres can add one: pin the keys to be safe from that).

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
            keys = trusted_keys
            if keys is None:
                keys = trusted_keys_of(await _stored_public_keys(connection))
            return await _verify_snapshot(connection, partition, from_seq, keys)
    finally:
        await connection.close()


async def _stored_public_keys(connection: asyncpg.Connection[Any]) -> list[bytes]:
    rows = await connection.fetch("SELECT public_key FROM audit_signing_keys")
    # A malformed stored key cannot verify anything; leaving it out reports its
    # checkpoints as signed by an unknown key.
    return [bytes(row[0]) for row in rows if len(row[0]) == PUBLIC_KEY_BYTES]


@dataclass(frozen=True, slots=True)
class _Start:
    """Where a partition's verification starts: ``seq``, trusting ``previous`` before it."""

    seq: int
    previous: bytes
    problem: Problem | None = None


async def _starts(
    connection: asyncpg.Connection[Any],
    partition: int | None,
    from_seq: int,
    keys: TrustedKeys,
) -> dict[int, _Start]:
    """Per partition, the newest checkpoint before ``from_seq`` as the trusted start."""
    rows = await connection.fetch(
        "SELECT DISTINCT ON (partition) partition, seq, link, key_id, signature"
        " FROM audit_checkpoints WHERE seq < $1 AND ($2::int IS NULL OR partition = $2)"
        " ORDER BY partition, seq DESC",
        from_seq,
        partition,
    )
    starts: dict[int, _Start] = {}
    for row in rows:
        checkpoint = CheckpointRow(row[1], bytes(row[2]), row[3], bytes(row[4]))
        problem = None
        if len(checkpoint.link) != LINK_BYTES:
            problem = Problem(ProblemKind.BAD_SIGNATURE, checkpoint.seq, "malformed checkpoint")
        else:
            problem = check_signature(row[0], checkpoint, keys)
        starts[row[0]] = _Start(checkpoint.seq + 1, checkpoint.link, problem)
    return starts


async def _verify_snapshot(
    connection: asyncpg.Connection[Any],
    partition: int | None,
    from_seq: int | None,
    keys: TrustedKeys,
) -> VerifyReport:
    starts = {} if from_seq is None else await _starts(connection, partition, from_seq, keys)
    where, arguments = _where(partition, starts, "seq")
    batches_where, _ = _where(partition, starts, "last_seq")
    heads = {
        row["partition"]: HeadRow(row["seq"], bytes(row["link"]))
        for row in await connection.fetch(
            "SELECT partition, seq, link FROM audit_heads WHERE $1::int IS NULL OR partition = $1",
            partition,
        )
    }
    tables = [
        _events(connection, batches_where, arguments, starts),
        _rows(connection, "audit_chain", "link", where, arguments),
        _checkpoint_rows(connection, where, arguments),
    ]
    reports: list[PartitionReport] = []
    verifier: PartitionVerifier | None = None
    current: list[tuple[int, int, Any] | None] = [await anext(table, None) for table in tables]
    while any(row is not None for row in current):
        key = min(row[:2] for row in current if row is not None)
        if verifier is None or verifier.partition != key[0]:
            if verifier is not None:
                reports.append(verifier.finish(heads.pop(verifier.partition, None)))
            verifier = _verifier(key[0], starts, keys)
        at_key = [row[2] if row is not None and row[:2] == key else None for row in current]
        body = at_key[0]
        if isinstance(body, MalformedBatchError):
            verifier.fail_with(_malformed(key[1], body))
            body = None
        if body is not None or at_key[1] is not None or at_key[2] is not None:
            verifier.observe(key[1], body, at_key[1], at_key[2])
        for index, value in enumerate(at_key):
            if value is not None:
                current[index] = await anext(tables[index], None)
    if verifier is not None:
        reports.append(verifier.finish(heads.pop(verifier.partition, None)))
    # Heads of partitions without any row: fine at seq 0, a deleted chain otherwise.
    for head_partition, head in heads.items():
        if head.seq > 0 and head_partition not in starts:
            reports.append(PartitionVerifier(head_partition, keys).finish(head))
    return VerifyReport(tuple(sorted(reports, key=lambda report: report.partition)))


def _verifier(partition: int, starts: Mapping[int, _Start], keys: TrustedKeys) -> PartitionVerifier:
    start = starts.get(partition)
    if start is None:
        return PartitionVerifier(partition, keys)
    verifier = PartitionVerifier(partition, keys, start_seq=start.seq, previous=start.previous)
    if start.problem is not None:
        verifier.fail_with(start.problem)
    return verifier


def _where(
    partition: int | None, starts: Mapping[int, _Start], seq_column: str
) -> tuple[str, tuple[Any, ...]]:
    """What follows ``FROM <table> AS t`` to select the rows to verify, and its arguments:
    the rows whose ``seq_column`` is at or after their partition's start."""
    if starts:
        ordered = sorted(starts)
        clause = (
            " LEFT JOIN unnest($1::int[], $2::bigint[]) AS s(partition, seq)"
            f" ON t.partition = s.partition WHERE t.{seq_column} >= coalesce(s.seq, 1)"
        )
        arguments: tuple[Any, ...] = (ordered, [starts[p].seq for p in ordered])
        if partition is None:
            return clause, arguments
        return clause + " AND t.partition = $3", (*arguments, partition)
    if partition is None:
        return "", ()
    return " WHERE t.partition = $1", (partition,)


async def _events(
    connection: asyncpg.Connection[Any],
    where: str,
    arguments: tuple[Any, ...],
    starts: Mapping[int, _Start],
) -> AsyncIterator[tuple[int, int, bytes | MalformedBatchError]]:
    """``(partition, seq, body)`` of every event from its start on, in key order, read
    from the ``event_batches`` rows in key order and split (no sort of the events).

    A row that does not split into its seqs, or that overlaps the row before it (the
    log was edited), comes as one :class:`MalformedBatchError` instead of its events, at
    the lowest seq not yet given, so that seqs keep increasing.
    """
    query = (
        "SELECT t.partition, t.first_seq, t.last_seq, t.types, t.bodies"  # noqa: S608 (constants)
        f" FROM event_batches AS t{where} ORDER BY t.partition, t.first_seq"
    )
    partition, next_seq, last_seq = None, 1, 0
    async for row in connection.cursor(query, *arguments, prefetch=VERIFY_PAGE_BATCHES):
        if row[0] != partition:
            partition, last_seq = row[0], 0
            next_seq = starts[partition].seq if partition in starts else 1
        try:
            if row[1] <= last_seq:
                raise MalformedBatchError(
                    row[0], row[1], f"overlaps the batch before it, which ends at seq {last_seq}"
                )
            events = split_batch(row[0], row[1], row[2], row[3], bytes(row[4]))
        except MalformedBatchError as error:
            yield row[0], next_seq, error
            next_seq = max(next_seq + 1, row[2] + 1)
        else:
            for seq, _, body in events:
                if seq >= next_seq:
                    yield row[0], seq, body
            next_seq = max(next_seq, row[2] + 1)
        last_seq = max(last_seq, row[2])


def _malformed(seq: int, error: MalformedBatchError) -> Problem:
    return Problem(
        ProblemKind.EVENT_BATCH_MALFORMED,
        seq,
        f"the events log's batch row at seq {error.first_seq} {error.reason}:"
        " the events log was edited",
    )


async def _rows(
    connection: asyncpg.Connection[Any],
    table: str,
    column: str,
    where: str,
    arguments: tuple[Any, ...],
) -> AsyncIterator[tuple[int, int, bytes]]:
    """``(partition, seq, bytes)`` rows of ``table``, a page at a time, in key order."""
    query = (
        f"SELECT t.partition, t.seq, t.{column} FROM {table} AS t{where}"  # noqa: S608 (constants)
        " ORDER BY t.partition, t.seq"
    )
    async for row in connection.cursor(query, *arguments, prefetch=VERIFY_PAGE_ROWS):
        yield row[0], row[1], bytes(row[2])


async def _checkpoint_rows(
    connection: asyncpg.Connection[Any], where: str, arguments: tuple[Any, ...]
) -> AsyncIterator[tuple[int, int, CheckpointRow]]:
    query = (
        "SELECT t.partition, t.seq, t.link, t.key_id, t.signature"  # noqa: S608 (constants)
        f" FROM audit_checkpoints AS t{where} ORDER BY t.partition, t.seq"
    )
    async for row in connection.cursor(query, *arguments, prefetch=VERIFY_PAGE_ROWS):
        link = bytes(row[2])
        yield row[0], row[1], CheckpointRow(row[1], link, row[3], bytes(row[4]))


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
            continue
        line = f"partition {partition.partition}: OK, {partition.verified} events verified"
        if partition.signed_seq:
            line += f", signed to seq {partition.signed_seq}"
        else:
            line += ", not signed yet"
        if partition.not_yet_audited:
            line += f", {partition.not_yet_audited} not yet audited"
        lines.append(line)
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


class TrustedKeysError(ValueError):
    """A file of trusted public keys that cannot be read."""


def load_trusted_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """Public keys to trust, from a file: the JSON of ``GET /v1/audit/keys`` (its
    ``keys[].public_key``), or PEM blocks / base64 raw keys, one per line."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TrustedKeysError(f"cannot read {path}: {error}") from None
    try:
        if text.lstrip().startswith("{"):
            document = msgspec.json.decode(text.encode("utf-8"), type=_KeysDocument)
            raws = [parse_public_key(key.public_key) for key in document.keys]
        else:
            raws = [parse_public_key(block) for block in _key_blocks(text)]
    except (msgspec.DecodeError, SigningKeyError) as error:
        raise TrustedKeysError(f"{path}: {error}") from None
    if not raws:
        raise TrustedKeysError(f"{path} holds no public key")
    return trusted_keys_of(raws)


class _PublicKeyEntry(msgspec.Struct):
    public_key: str


class _KeysDocument(msgspec.Struct):
    keys: list[_PublicKeyEntry]


def _key_blocks(text: str) -> list[str]:
    blocks: list[str] = []
    pem: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if pem is not None:
            pem.append(stripped)
            if stripped.startswith("-----END"):
                blocks.append("\n".join(pem))
                pem = None
        elif stripped.startswith("-----BEGIN"):
            pem = [stripped]
        elif stripped and not stripped.startswith("#"):
            blocks.append(stripped)
    return blocks


def verify_main(
    database_url: str,
    *,
    partition: int | None = None,
    from_seq: int | None = None,
    public_keys: Path | None = None,
) -> int:
    """Run :func:`verify`, print its report to stdout; return the process exit status.

    0: every chain verified (events not yet audited are listed, not failures); 1: a chain
    is broken; 2 (``EXIT_CODE_UNVERIFIED``): verification could not run, with the reason
    on stderr. ``public_keys``: a file of the only public keys to trust (see
    :func:`load_trusted_keys`). Must be called outside a running event loop.
    """
    try:
        keys = load_trusted_keys(public_keys) if public_keys is not None else None
        report = asyncio.run(
            verify(database_url, partition=partition, from_seq=from_seq, trusted_keys=keys)
        )
    except TrustedKeysError as error:
        print(f"ERROR: cannot verify: {error}", file=sys.stderr)
        return EXIT_CODE_UNVERIFIED
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
    if keys is not None:
        print(f"signatures checked against {len(keys)} pinned public keys", file=sys.stderr)
    return 0 if report.ok else 1
