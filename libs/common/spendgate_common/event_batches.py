"""How an append's events are stored: one ``event_batches`` row per append.

A row holds the events ``first_seq..last_seq`` of one partition: their type tags joined
by newlines (``types``) and their canonical bytes joined by newlines (``bodies``).
Canonical event bytes are compact JSON, which never holds a raw newline (one inside a
string is escaped as ``\\n``), so splitting gives back the exact bytes the audit chain
hashes. The view ``events`` unnests the rows into one row per event, for operators'
queries; the ledger, the relay and the verifier read the rows themselves and split them
here, in key order, without a sort.

Why one row per append (docs/decisions.md): the per-row work of Postgres (heap tuple,
index entry, WAL record) was most of an append's database time, and the rows were what
autovacuum had to visit.
"""

from __future__ import annotations

from collections.abc import Sequence

# What separates the events of a row, in both ``types`` and ``bodies``.
SEPARATOR = b"\n"


class MalformedBatchError(ValueError):
    """A stored batch row does not split into ``last_seq - first_seq + 1`` events (the
    log was edited outside the ledger). ``first_seq``: the row's key."""

    def __init__(self, partition: int, first_seq: int, reason: str) -> None:
        super().__init__(f"partition {partition}: the event batch at seq {first_seq} {reason}")
        self.partition = partition
        self.first_seq = first_seq
        self.reason = reason


def join_bodies(bodies: Sequence[bytes]) -> bytes:
    """The ``bodies`` value of a batch; asserts no body holds the separator (else the
    row would split into other events than these)."""
    assert bodies
    joined = SEPARATOR.join(bodies)
    assert joined.count(SEPARATOR) == len(bodies) - 1, "an event body holds a newline"
    return joined


def join_types(types: Sequence[str]) -> str:
    """The ``types`` value of a batch (type tags are identifiers: no newline)."""
    return "\n".join(types)


def split_batch(
    partition: int, first_seq: int, last_seq: int, types: str, bodies: bytes
) -> list[tuple[int, str, bytes]]:
    """The ``(seq, type, body)`` events of a stored row, in seq order.

    Raises :class:`MalformedBatchError` when the row's texts do not hold exactly one
    event per seq of its range.
    """
    body_list = bodies.split(SEPARATOR)
    type_list = types.split("\n")
    count = last_seq - first_seq + 1
    if count < 1 or len(body_list) != count or len(type_list) != count:
        raise MalformedBatchError(
            partition,
            first_seq,
            f"covers seq {first_seq}..{last_seq} but holds {len(body_list)} bodies and"
            f" {len(type_list)} types",
        )
    return list(zip(range(first_seq, last_seq + 1), type_list, body_list, strict=True))


# The columns of ``event_batches`` that a writer gives (recorded_at defaults to now()).
COLUMNS = ("partition", "first_seq", "last_seq", "epoch", "types", "bodies")


def batch_row(
    partition: int, epoch: int, first_seq: int, types: Sequence[str], bodies: Sequence[bytes]
) -> tuple[int, int, int, int, str, bytes]:
    """The ``COLUMNS`` values of the batch holding ``bodies`` (of ``types``) from seq
    ``first_seq`` on: a record for COPY, for tools and tests that fill a log."""
    assert len(types) == len(bodies)
    last_seq = first_seq + len(bodies) - 1
    return (partition, first_seq, last_seq, epoch, join_types(types), join_bodies(bodies))
