"""The settled reservation ids of one partition, about 17 bytes each, no object per id.

A partition remembers every reservation it settled for an hour (``settled_retention_ms``)
to answer a second settle with ``already_settled``. A hot partition settles thousands a
second, so that is millions of ids. Kept as Python objects (the id string, a dict slot, a
tuple and an int in the retention queue) each cost about 170 bytes of heap, and every
snapshot had to fork them, touch them and encode them one by one: with 565,000 settled
ids the snapshot child took 1.2 s of CPU and slowed the partition loop while it lived.

The ledger names a reservation ``rsv_<partition>_<seq>``, after the sequence number at
which it was granted (``PartitionState._next_id``). So a settled id is a number: its
outcome is one byte at ``seq`` in a chunk of 4,096 bytes (a chunk is freed when its last
id is forgotten), and the retention queue is blocks of 64-bit integer pairs (settle
time, seq), oldest first. Ids of any other shape (this ledger writes none; a test may)
are kept in a dict and a queue beside them, so every id gets the exact answer.

Memory: 16 bytes of queue per id plus one byte per sequence number its chunk spans (one
chunk stays while any of its ids is remembered: a hold settled days after its grant keeps
4 KiB alive for an hour).
"""

from __future__ import annotations

import itertools
import operator
import sys
from array import array
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

# An outcome is stored as its index in this tuple plus one (0: not settled).
OUTCOMES = ("committed", "released", "expired")
_CODES = {outcome: code for code, outcome in enumerate(OUTCOMES, start=1)}
CHUNK_BITS = 12
CHUNK_SIZE = 1 << CHUNK_BITS
_OFFSET_MASK = CHUNK_SIZE - 1
# Queue entries per block (two int64 each): a block is freed when all its ids are
# forgotten, so the queue never moves memory around.
BLOCK_ENTRIES = 8_192
_BLOCK_LEN = 2 * BLOCK_ENTRIES
# Decimal digits of the largest sequence number a compact id may have (int64 columns).
_SEQ_DIGITS_MAX = 18
_NEVER = sys.maxsize


class SettledIds:
    """Settled reservation ids with their outcome, forgotten by settle time."""

    __slots__ = (
        "_blocks",
        "_chunks",
        "_count",
        "_head",
        "_live",
        "_oldest_ms",
        "_other",
        "_other_order",
        "_prefix",
    )

    def __init__(self, partition: int) -> None:
        self._prefix = f"rsv_{partition}_"
        # Outcome codes by seq >> CHUNK_BITS, and how many ids each chunk holds.
        self._chunks: dict[int, bytearray] = {}
        self._live: dict[int, int] = {}
        # Retention queue: (settle time ms, seq) pairs, oldest first; the first block's
        # entries before ``_head`` (an index into the block) are forgotten.
        self._blocks: deque[array[int]] = deque()
        self._head = 0
        self._count = 0
        # Ids not of the compact shape, with their own queue.
        self._other: dict[str, str] = {}
        self._other_order: deque[tuple[int, str]] = deque()
        # Settle time of the oldest id remembered (_NEVER when none): forgetting is
        # checked after every event, and this makes the common case one comparison.
        self._oldest_ms = _NEVER

    def _seq_of(self, reservation_id: str) -> int | None:
        """The seq of a compact id, or None for any other string (the one spelling
        ``rsv_<partition>_<seq>`` with a canonical decimal seq matches, nothing else)."""
        prefix = self._prefix
        if not reservation_id.startswith(prefix):
            return None
        digits = reservation_id[len(prefix) :]
        if (
            not 0 < len(digits) <= _SEQ_DIGITS_MAX
            or not digits.isascii()
            or not digits.isdigit()
            or digits[0] == "0"
        ):
            return None
        return int(digits)

    def add(self, reservation_id: str, outcome: str, at_ms: int) -> None:
        """Remember ``reservation_id`` as settled with ``outcome`` at ``at_ms`` (not
        earlier than any id added before: the ledger clock never goes back)."""
        if at_ms < self._oldest_ms:
            self._oldest_ms = at_ms
        seq = self._seq_of(reservation_id)
        if seq is None:
            assert reservation_id not in self._other, f"{reservation_id} settled twice"
            self._other[reservation_id] = outcome
            self._other_order.append((at_ms, reservation_id))
            return
        index = seq >> CHUNK_BITS
        chunk = self._chunks.get(index)
        if chunk is None:
            chunk = self._chunks[index] = bytearray(CHUNK_SIZE)
            self._live[index] = 0
        assert not chunk[seq & _OFFSET_MASK], f"{reservation_id} settled twice"
        chunk[seq & _OFFSET_MASK] = _CODES[outcome]
        self._live[index] += 1
        self._count += 1
        blocks = self._blocks
        if not blocks or len(blocks[-1]) == _BLOCK_LEN:
            blocks.append(array("q"))
        block = blocks[-1]
        block.append(at_ms)
        block.append(seq)

    def get(self, reservation_id: str) -> str | None:
        """The outcome ``reservation_id`` was settled with, if it is remembered."""
        seq = self._seq_of(reservation_id)
        if seq is None:
            return self._other.get(reservation_id)
        chunk = self._chunks.get(seq >> CHUNK_BITS)
        code = chunk[seq & _OFFSET_MASK] if chunk is not None else 0
        return OUTCOMES[code - 1] if code else None

    def __contains__(self, reservation_id: object) -> bool:
        return isinstance(reservation_id, str) and self.get(reservation_id) is not None

    def __len__(self) -> int:
        return self._count + len(self._other)

    def forget_before(self, cutoff_ms: int) -> None:
        """Forget every id settled before ``cutoff_ms``."""
        if self._oldest_ms >= cutoff_ms:
            return
        blocks = self._blocks
        while blocks:
            block = blocks[0]
            head, end = self._head, len(block)
            while head < end and block[head] < cutoff_ms:
                self._drop(block[head + 1])
                head += 2
            if head == end:  # all forgotten (if it was the last block, add starts anew)
                blocks.popleft()
                self._head = 0
                continue
            self._head = head
            break
        order = self._other_order
        while order and order[0][0] < cutoff_ms:
            del self._other[order.popleft()[1]]
        self._oldest_ms = min(self._oldest_compact_ms(), order[0][0] if order else _NEVER)

    def _drop(self, seq: int) -> None:
        index = seq >> CHUNK_BITS
        self._chunks[index][seq & _OFFSET_MASK] = 0
        left = self._live[index] - 1
        if left:
            self._live[index] = left
        else:
            del self._chunks[index], self._live[index]
        self._count -= 1

    def _oldest_compact_ms(self) -> int:
        # A block is dropped once all its ids are forgotten: the first one has some left.
        return self._blocks[0][self._head] if self._blocks else _NEVER

    def footprint_bytes(self) -> int:
        """Bytes the compact ids occupy (queue blocks and chunks; the few other ids and
        the containers themselves not counted)."""
        queue = sum(block.buffer_info()[1] * block.itemsize for block in self._blocks)
        return queue + CHUNK_SIZE * len(self._chunks)

    def entries(self) -> Iterator[tuple[int, str, str]]:
        """``(settled at ms, reservation id, outcome)`` of every id, compact ids oldest
        first, then the others oldest first."""
        prefix = self._prefix
        head = self._head
        for block in self._blocks:
            for index in range(head, len(block), 2):
                seq = block[index + 1]
                code = self._chunks[seq >> CHUNK_BITS][seq & _OFFSET_MASK]
                yield block[index], f"{prefix}{seq}", OUTCOMES[code - 1]
            head = 0
        yield from self.other_entries()

    def other_entries(self) -> Iterator[tuple[int, str, str]]:
        """``(settled at ms, reservation id, outcome)`` of the ids not of the compact
        shape, oldest first (a snapshot stores them as they are)."""
        for at_ms, reservation_id in self._other_order:
            yield at_ms, reservation_id, self._other[reservation_id]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SettledIds):
            return NotImplemented
        return self._prefix == other._prefix and list(self.entries()) == list(other.entries())

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"SettledIds({self._prefix!r}, {len(self)} ids)"

    # ------------------------------------------------------------------ snapshots

    def compact_columns(self) -> SettledColumns:
        """The compact ids as snapshot columns: settle times and seqs, oldest first, each
        as little-endian int64 differences from the one before (the first from 0), and
        the chunks as ``(index, outcome bytes)``.

        Differences because a snapshot is stored in the WAL that every append flushes:
        settle times repeat and seqs climb by about two, so their differences compress
        to almost nothing (500,000 ids: 0.9 MB stored as plain pairs, far less as
        differences), and an open loop at 7,000 pairs/s showed its p99 rise from 7 to
        10-12 ms while a 1 MB snapshot was stored. C-level passes over arrays, no Python
        loop per id: this is what a snapshot child encodes."""
        times, seqs = array("q"), array("q")
        head = self._head
        for block in self._blocks:
            times.extend(block[head::2])
            seqs.extend(block[head + 1 :: 2])
            head = 0
        chunks = [(index, bytes(chunk)) for index, chunk in self._chunks.items()]
        return SettledColumns(_differences(times), _differences(seqs), chunks)

    def restore_compact(self, columns: SettledColumns) -> None:
        """Load columns written by :meth:`compact_columns` into an empty store.

        Raises ``ValueError`` when they do not describe the same ids."""
        assert not self._count, "restore into an empty store"
        times, seqs = _sums(columns.times, "times"), _sums(columns.seqs, "seqs")
        if len(times) != len(seqs):
            raise ValueError("settled-id columns differ in length")
        for index, outcomes in columns.chunks:
            if len(outcomes) != CHUNK_SIZE:
                raise ValueError(f"settled-id chunk {index} has {len(outcomes)} bytes")
            live = CHUNK_SIZE - outcomes.count(0)
            if live:
                self._chunks[index] = bytearray(outcomes)
                self._live[index] = live
        self._count = len(seqs)
        if self._count != sum(self._live.values()):
            raise ValueError("settled-id queue and chunks disagree")
        queue = array("q", bytes(16 * len(seqs)))
        queue[0::2], queue[1::2] = times, seqs
        for start in range(0, len(queue), _BLOCK_LEN):
            self._blocks.append(queue[start : start + _BLOCK_LEN])
        if queue:
            self._oldest_ms = min(self._oldest_ms, queue[0])


class SettledColumns(NamedTuple):
    """A :class:`SettledIds` store's compact ids as a snapshot holds them."""

    times: bytes  # settle times (ms), int64 differences, little-endian
    seqs: bytes  # seqs, int64 differences, little-endian
    chunks: list[tuple[int, bytes]]  # (chunk index, CHUNK_SIZE outcome bytes)


def _differences(values: array[int]) -> bytes:
    differences = array("q", map(operator.sub, values, itertools.chain((0,), values)))
    if sys.byteorder != "little":  # pragma: no cover - no big-endian host in CI
        differences.byteswap()
    return differences.tobytes()


def _sums(column: bytes, name: str) -> array[int]:
    if len(column) % 8:
        raise ValueError(f"settled-id {name} column is not whole int64 values")
    differences = array("q", column)
    if sys.byteorder != "little":  # pragma: no cover - no big-endian host in CI
        differences.byteswap()
    return array("q", itertools.accumulate(differences))
