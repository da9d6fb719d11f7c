"""Snapshots of a partition's state, so that recovery replays only the log's tail.

A snapshot is taken right after a batch committed, so it describes exactly the log up to
its ``seq``; recovery loads the newest snapshot at or below the lease's ``last_seq`` and
applies the events after it. Everything in a snapshot is logical state; caches (window
ends, the expiry heap, the fleet-budget cache) are rebuilt. The encoding is msgpack of
:class:`SnapshotV1`, compressed with zlib behind a 4-byte mark (snapshots written before
the compression are plain msgpack and still load); a snapshot that does not decode is
skipped (full replay instead).

Compressing costs the snapshot child (which runs only on otherwise idle CPU) about 20 ns a
byte, and saves the database its own compression of the value (pglz, in the backend that
stores it, at normal priority, next to the backends that append) and most of the value's
write-ahead log: a hot partition's snapshot was tens of MB of msgpack (19 MB for 565,000
settled ids stored as 1.6 MB; storing took 0.5 s, then 60 ms), and every commit queued
behind its WAL waits for it to be flushed. Since version 2 the settled ids are columns of
differences (spendgate_ledger._settled): 500,000 of them take 0.06 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any

import msgspec

from spendgate_common.events_v1 import ApprovalRequested, BudgetScope, ContractsSet, Window
from spendgate_common.ledger_v1 import Denied, Granted
from spendgate_ledger._settled import SettledColumns
from spendgate_ledger._state import (
    BudgetRecord,
    Hold,
    IdempotencyEntry,
    KeyRecord,
    Meter,
    PartitionState,
)

# 2: settled ids as columns (spendgate_ledger._settled). Version 1 snapshots still load;
# a ledger that knows only version 1 refuses a version 2 snapshot (and replays the log
# instead) rather than load it without its settled ids.
SNAPSHOT_VERSION = 2
SNAPSHOT_VERSIONS_READ = (1, 2)


class MeterV1(msgspec.Struct, frozen=True, array_like=True):
    cap_micros: int
    window: Window
    timezone: str
    window_start_at_ms: int
    committed_micros: int
    reserved_micros: int
    overrun_micros: int


class KeyV1(msgspec.Struct, frozen=True, array_like=True):
    key_id: str
    tenant: str
    label: str
    secret_sha256: str
    expires_at_ms: int
    meter: MeterV1
    allowed_vendors: list[str] | None
    fleet_labels: list[str]
    revoked: bool


class BudgetV1(msgspec.Struct, frozen=True, array_like=True):
    budget_id: str
    tenant: str
    scope: BudgetScope
    match: str
    meter: MeterV1
    closed: bool


class HoldV1(msgspec.Struct, frozen=True, array_like=True):
    reservation_id: str
    key_id: str
    amount_micros: int
    expires_at_ms: int
    budget_ids: list[str]
    # Absent in snapshots written before ReservationOutcomeUnknown existed.
    in_flight: bool = True


class SettledV1(msgspec.Struct, frozen=True, array_like=True):
    at_ms: int
    reservation_id: str
    outcome: str


class SettledChunkV2(msgspec.Struct, frozen=True, array_like=True):
    index: int
    outcomes: bytes


class RememberedV1(msgspec.Struct, frozen=True, array_like=True):
    at_ms: int
    key_id: str
    idempotency_key: str
    request_sha256: str
    result: Granted | Denied


class ApprovalV1(msgspec.Struct, frozen=True, array_like=True):
    request: ApprovalRequested
    status: str
    decided_by: str
    note: str


class SnapshotV1(msgspec.Struct, frozen=True):
    version: int
    partition: int
    last_seq: int
    last_at_ms: int
    keys: list[KeyV1]
    budgets: list[BudgetV1]  # in creation order: it is the order budgets are checked in
    holds: list[HoldV1]
    # Version 1: every settled id, oldest first. Version 2: the ids not of the compact
    # shape, oldest first; the others are in the two columns below.
    settled: list[SettledV1]
    remembered: list[RememberedV1]  # oldest first
    # Absent in snapshots written before contracts existed.
    contract_sets: list[ContractsSet] = msgspec.field(default_factory=list)
    approvals: list[ApprovalV1] = msgspec.field(default_factory=list)  # oldest first
    # Version 2 (spendgate_ledger._settled.SettledIds.compact_columns): settle times and
    # seqs as little-endian int64 differences, oldest first, and the outcome chunks.
    settled_times: bytes = b""
    settled_seqs: bytes = b""
    settled_chunks: list[SettledChunkV2] = msgspec.field(default_factory=list)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SnapshotV1)
# What a compressed snapshot starts with. A plain msgpack snapshot starts with a map
# header (0x80-0x8f, 0xde, 0xdf), never with this.
_COMPRESSED_MARK = b"SGZ\x01"
# zlib's fastest level: most of the size gain (a hot partition's msgpack, mostly settled
# ids, shrank 11x) for a fraction of the time of the default level.
_COMPRESSION_LEVEL = 1


def _meter_v1(meter: Meter) -> MeterV1:
    return MeterV1(
        meter.cap_micros,
        meter.window,
        meter.timezone,
        meter.window_start_at_ms,
        meter.committed_micros,
        meter.reserved_micros,
        meter.overrun_micros,
    )


def _meter(wire: MeterV1) -> Meter:
    return Meter(
        cap_micros=wire.cap_micros,
        window=wire.window,
        timezone=wire.timezone,
        window_start_at_ms=wire.window_start_at_ms,
        committed_micros=wire.committed_micros,
        reserved_micros=wire.reserved_micros,
        overrun_micros=wire.overrun_micros,
    )


def encode_snapshot(state: PartitionState) -> bytes:
    """The state as snapshot bytes (call only when the state equals the committed log)."""
    settled = state.settled.compact_columns()
    snapshot = SnapshotV1(
        version=SNAPSHOT_VERSION,
        partition=state.partition,
        last_seq=state.last_seq,
        last_at_ms=state.last_at_ms,
        keys=[
            KeyV1(
                key.key_id,
                key.tenant,
                key.label,
                key.secret_sha256,
                key.expires_at_ms,
                _meter_v1(key.meter),
                sorted(key.allowed_vendors) if key.allowed_vendors is not None else None,
                list(key.fleet_labels),
                key.revoked,
            )
            for key in state.keys.values()
        ],
        budgets=[
            BudgetV1(b.budget_id, b.tenant, b.scope, b.match, _meter_v1(b.meter), b.closed)
            for b in state.budgets.values()
        ],
        holds=[
            HoldV1(
                h.reservation_id,
                h.key_id,
                h.amount_micros,
                h.expires_at_ms,
                list(h.budget_ids),
                h.in_flight,
            )
            for h in state.holds.values()
        ],
        settled=[
            SettledV1(at_ms, reservation_id, outcome)
            for at_ms, reservation_id, outcome in state.settled.other_entries()
        ],
        remembered=[
            RememberedV1(
                at_ms,
                key_id,
                idempotency_key,
                state.idempotency[(key_id, idempotency_key)].request_sha256,
                state.idempotency[(key_id, idempotency_key)].result,
            )
            for at_ms, (key_id, idempotency_key) in state.idempotency_order
        ],
        contract_sets=[
            ContractsSet(
                at_ms=contracts.set_at_ms,
                tenant=tenant,
                version=contracts.version,
                rules=[compiled.rule for compiled in contracts.rules],
                source_sha256=contracts.source_sha256,
            )
            for tenant, contracts in state.contracts.items()
        ],
        approvals=[
            ApprovalV1(record.request, record.status, record.decided_by, record.note)
            for record in state.approvals.values()
        ],
        settled_times=settled.times,
        settled_seqs=settled.seqs,
        settled_chunks=[SettledChunkV2(index, outcomes) for index, outcomes in settled.chunks],
    )
    return _COMPRESSED_MARK + zlib.compress(_encoder.encode(snapshot), _COMPRESSION_LEVEL)


def decode_snapshot(body: bytes, fresh: PartitionState) -> PartitionState:
    """Restore a snapshot into ``fresh`` (an empty state with the right configuration).

    Raises ``msgspec.DecodeError`` / ``ValidationError`` for bytes that are not a snapshot,
    and ``ValueError`` for a snapshot of another partition or version, or compressed
    bytes that do not decompress.
    """
    if body.startswith(_COMPRESSED_MARK):
        try:
            body = zlib.decompress(body[len(_COMPRESSED_MARK) :])
        except zlib.error as error:
            raise ValueError(f"snapshot does not decompress: {error}") from error
    snapshot = _decoder.decode(body)
    if snapshot.version not in SNAPSHOT_VERSIONS_READ or snapshot.partition != fresh.partition:
        raise ValueError(f"snapshot v{snapshot.version} of partition {snapshot.partition}")
    assert fresh.last_seq == 0, "restore into an empty state"
    state = fresh
    state.last_seq = snapshot.last_seq
    state.last_at_ms = snapshot.last_at_ms
    for key in snapshot.keys:
        state.keys[key.key_id] = KeyRecord(
            key_id=key.key_id,
            tenant=key.tenant,
            label=key.label,
            secret_sha256=key.secret_sha256,
            expires_at_ms=key.expires_at_ms,
            meter=_meter(key.meter),
            allowed_vendors=frozenset(key.allowed_vendors)
            if key.allowed_vendors is not None
            else None,
            fleet_labels=tuple(key.fleet_labels),
            revoked=key.revoked,
        )
    for budget in snapshot.budgets:
        record = BudgetRecord(
            budget.budget_id,
            budget.tenant,
            budget.scope,
            budget.match,
            _meter(budget.meter),
            closed=budget.closed,
        )
        state.restore_budget(record)
    for hold in snapshot.holds:
        state.holds[hold.reservation_id] = Hold(
            hold.reservation_id,
            hold.key_id,
            hold.amount_micros,
            hold.expires_at_ms,
            tuple(hold.budget_ids),
            hold.in_flight,
        )
        state.track_hold(state.holds[hold.reservation_id])
    state.settled.restore_compact(
        SettledColumns(
            snapshot.settled_times,
            snapshot.settled_seqs,
            [(chunk.index, chunk.outcomes) for chunk in snapshot.settled_chunks],
        )
    )
    for settled in snapshot.settled:
        state.settled.add(settled.reservation_id, settled.outcome, settled.at_ms)
    for remembered in snapshot.remembered:
        entry_key = (remembered.key_id, remembered.idempotency_key)
        state.idempotency[entry_key] = IdempotencyEntry(
            remembered.request_sha256, remembered.result, remembered.at_ms
        )
        state.idempotency_order.append((remembered.at_ms, entry_key))
    for contract_set in snapshot.contract_sets:
        state.apply_contracts_set(contract_set)
    for approval in snapshot.approvals:
        state.apply_approval_requested(approval.request)
        approval_record = state.approvals[approval.request.approval_id]
        approval_record.status, approval_record.decided_by, approval_record.note = (
            approval.status,
            approval.decided_by,
            approval.note,
        )
        if approval_record.status == "used":
            request = approval_record.request
            del state.approval_index[(request.key_id, request.request_identity)]
    return state


class SnapshotChildError(Exception):
    """The child process that encoded and stored a snapshot failed."""


# The snapshot child runs only on CPU time nobody else wants (Linux's SCHED_IDLE; where
# that policy does not exist, at the lowest niceness): encoding a hot partition's state
# takes about a second of CPU, and at niceness 10 (its earlier setting) the child still
# took a share of a busy core next to the partition loops, whose latency showed it
# (open loop at 9,000 pairs/s: p50 3 -> 11-18 ms while a child ran).
SNAPSHOT_CHILD_NICENESS = 19
# A snapshot child still running after this long is killed (and reported).
SNAPSHOT_CHILD_DEADLINE = timedelta(minutes=5)
# How often the parent looks whether the child has exited (no thread, no signal handler).
SNAPSHOT_CHILD_POLL = timedelta(milliseconds=50)


def fork_save_snapshot(
    state: PartitionState, save: Callable[[bytes], Coroutine[Any, Any, None]]
) -> Awaitable[None]:
    """Encode a snapshot of ``state`` as it is *now* and store it, without pausing the
    caller's loop.

    Encoding a large state takes from tens of milliseconds to seconds of pure CPU, and
    storing it means copying every byte through the loop's socket: either would stall the
    partition loop (every request waits; with three million remembered ids the store
    alone stalled it 150 ms). So, as Redis does for its snapshots, we fork: the child sees
    a copy-on-write image of the state at this instant, encodes it, stores it with
    ``save`` on its own event loop and its own database connection, and exits. The
    parent only waits for the exit status. The child touches nothing of the parent's but
    the state: its loop, sockets and signal handlers stay the parent's.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which exits without returning
        code = 0
        try:
            _become_snapshot_child()
            body = encode_snapshot(state)
            asyncio.run(save(body))
        except BaseException as error:
            code = 1
            with contextlib.suppress(BaseException):
                os.write(2, f"snapshot child {os.getpid()}: {error!r}\n".encode())
        os._exit(code)
    return _wait_for_child(pid)


def _become_snapshot_child() -> None:  # pragma: no cover - runs in the child
    # Signals are the child's own (default: die), and never wake the parent's loop
    # through the wakeup fd both processes share after the fork.
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, signal.SIG_DFL)
    # The fork happened inside the parent's running loop; the child runs its own.
    asyncio.events._set_running_loop(None)
    _lower_priority()


def _lower_priority() -> None:  # pragma: no cover - runs in the child
    os.nice(SNAPSHOT_CHILD_NICENESS - os.nice(0))
    if hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):  # refused in some sandboxes: niceness stays
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


async def _wait_for_child(pid: int) -> None:
    give_up_at = time.monotonic() + SNAPSHOT_CHILD_DEADLINE.total_seconds()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: never blocks)
        if done:
            break
        if time.monotonic() > give_up_at:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # noqa: ASYNC222 (a SIGKILLed child exits at once)
            deadline_s = SNAPSHOT_CHILD_DEADLINE.total_seconds()
            raise SnapshotChildError(f"snapshot child {pid} killed after {deadline_s:g} s")
        await asyncio.sleep(SNAPSHOT_CHILD_POLL.total_seconds())
    if status != 0:
        raise SnapshotChildError(f"snapshot child {pid} exited with status {status}")
