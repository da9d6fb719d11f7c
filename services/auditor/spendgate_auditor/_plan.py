"""What one fetched batch of event messages does to the chain heads. Pure: no I/O.

The shell fetches messages from JetStream, turns each into the :class:`Delivery` of every
event it carries (:func:`parse_deliveries`: a version 2 message carries a run of events,
a version 1 message one), locks the heads of the partitions involved, and asks
:func:`plan_batch` what to do. Per partition, in sequence order, a delivery is

* a duplicate (``seq <= head.seq``): a redelivery of an event already chained; acked
  without effect, so each event takes effect exactly once;
* the next event (``seq == head.seq + 1``): chained, the head advances;
* beyond a gap (``seq > head.seq + 1``): held, together with every later delivery of its
  partition in this batch, and redelivered later. An event is never skipped: the relay
  publishes in order, so a gap heals when the missing event arrives; a gap that persists
  is an alarm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from spendgate_auditor._chain import GENESIS_LINK, SEQ_MAX, ChainHead, link
from spendgate_common.event_messages_v2 import decode_events
from spendgate_common.limits import EVENT_MESSAGE_EVENTS_MAX, PARTITION_COUNT_MAX
from spendgate_common.subjects import (
    EVENTS_SUBJECT_PREFIX,
    EVENTS_V1_SUBJECT_PREFIX,
    HEADER_FIRST_SEQ,
    HEADER_LAST_SEQ,
    HEADER_PARTITION,
    HEADER_SEQ,
    HEADER_TRACEPARENT,
    events_subject,
    events_v1_subject,
)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event of a message: ``token`` is the message's index in the fetched batch (to
    ack it later; the events of one message share it). ``traceparent``: the ledger span
    of the command that produced the event, when it was traced."""

    partition: int
    seq: int
    body: bytes
    token: int
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class Gap:
    """The first held delivery of a partition: ``received_seq`` came before ``expected_seq``."""

    partition: int
    expected_seq: int
    received_seq: int


@dataclass(slots=True)
class BatchPlan:
    """The effect of one batch; every delivery is in exactly one of the three lists."""

    chained: list[Delivery] = field(default_factory=list)
    duplicates: list[Delivery] = field(default_factory=list)
    held: list[Delivery] = field(default_factory=list)
    # One row per new link, in chaining order (``links[i]`` chains ``chained[i]``).
    links: list[ChainHead] = field(default_factory=list)
    # Head of each partition that advanced, after the batch.
    heads: dict[int, ChainHead] = field(default_factory=dict)
    gaps: list[Gap] = field(default_factory=list)

    def held_tokens(self) -> list[int]:
        """Messages to hand back for redelivery: those with an event held behind a gap."""
        return sorted({delivery.token for delivery in self.held})

    def settled_tokens(self) -> list[int]:
        """Messages to ack once the batch has committed: every event of theirs chained or
        a duplicate (a message is acked whole, or redelivered whole)."""
        settled = {delivery.token for delivery in self.chained + self.duplicates}
        return sorted(settled.difference(self.held_tokens()))


def parse_deliveries(
    subject: str, headers: Mapping[str, str] | None, body: bytes, token: int
) -> list[Delivery] | None:
    """The events a message carries, or ``None`` when it is not a well-formed event message.

    Version 2 (``spendgate.v2.events.<partition>``): ``Spendgate-Partition``,
    ``Spendgate-First-Seq`` and ``Spendgate-Last-Seq`` headers, and a body holding exactly
    the events ``first..last`` in order, at most ``EVENT_MESSAGE_EVENTS_MAX`` of them.
    Version 1 (``spendgate.v1.events.<partition>``, no longer written): ``Spendgate-Seq``,
    and the event's bytes as the body. Each event's bytes are kept as published, not
    decoded: the chain covers them, whatever their version.
    """
    if headers is None:
        return None
    partition = _header_number(headers, HEADER_PARTITION)
    if partition is None or partition >= PARTITION_COUNT_MAX:
        return None
    if subject == events_subject(partition):
        return _parse_run(partition, headers, body, token)
    if subject == events_v1_subject(partition):
        seq = _header_number(headers, HEADER_SEQ)
        if seq is None or not 1 <= seq <= SEQ_MAX:
            return None
        return [Delivery(partition, seq, body, token, headers.get(HEADER_TRACEPARENT))]
    return None


def is_event_subject(subject: str) -> bool:
    """Whether ``subject`` is a partition's event subject of either version."""
    return subject.startswith((f"{EVENTS_SUBJECT_PREFIX}.", f"{EVENTS_V1_SUBJECT_PREFIX}."))


def _parse_run(
    partition: int, headers: Mapping[str, str], body: bytes, token: int
) -> list[Delivery] | None:
    first_seq = _header_number(headers, HEADER_FIRST_SEQ)
    last_seq = _header_number(headers, HEADER_LAST_SEQ)
    if first_seq is None or last_seq is None or not 1 <= first_seq <= last_seq <= SEQ_MAX:
        return None
    if last_seq - first_seq >= EVENT_MESSAGE_EVENTS_MAX:
        return None
    try:
        events = decode_events(body)
    except msgspec.DecodeError:
        return None
    if [event.seq for event in events] != list(range(first_seq, last_seq + 1)):
        return None
    return [
        Delivery(partition, event.seq, bytes(event.event), token, event.traceparent)
        for event in events
    ]


def _header_number(headers: Mapping[str, str], name: str) -> int | None:
    """A header's non-negative decimal value; None when absent or not a short decimal
    (bounded before ``int()``, so a hostile header cannot cost a huge conversion)."""
    text = headers.get(name, "")
    if not text.isdecimal() or len(text) > 19:
        return None
    return int(text)


def plan_batch(heads: Mapping[int, ChainHead], deliveries: Sequence[Delivery]) -> BatchPlan:
    """Decide the effect of ``deliveries`` given the locked ``heads``.

    ``heads`` must hold every partition that occurs in ``deliveries``. Deliveries of one
    partition are taken in sequence order (a republish can reach the stream out of order
    within one batch), partitions are independent of each other.
    """
    plan = BatchPlan()
    by_partition: dict[int, list[Delivery]] = {}
    for delivery in deliveries:
        by_partition.setdefault(delivery.partition, []).append(delivery)
    for partition in sorted(by_partition):
        head = heads[partition]
        assert head.partition == partition
        pending = sorted(by_partition[partition], key=lambda delivery: delivery.seq)
        for index, delivery in enumerate(pending):
            if delivery.seq <= head.seq:
                plan.duplicates.append(delivery)
            elif delivery.seq == head.seq + 1:
                head = head.extend(delivery.seq, delivery.body)
                plan.chained.append(delivery)
                plan.links.append(head)
            else:
                plan.gaps.append(Gap(partition, head.seq + 1, delivery.seq))
                plan.held.extend(pending[index:])
                break
        if head.seq != heads[partition].seq:
            plan.heads[partition] = head
    return plan


def links_needed(plan: BatchPlan) -> list[tuple[int, int]]:
    """``(partition, seq)`` of stored links needed to check the plan's duplicates.

    Checking a duplicate needs the links at ``seq - 1`` and ``seq``; the ones the plan
    itself creates and the genesis link are not needed from the store.
    """
    created = {(row.partition, row.seq) for row in plan.links}
    needed: set[tuple[int, int]] = set()
    for delivery in plan.duplicates:
        for seq in (delivery.seq - 1, delivery.seq):
            if seq > 0 and (delivery.partition, seq) not in created:
                needed.add((delivery.partition, seq))
    return sorted(needed)


def conflicting_duplicates(
    plan: BatchPlan, stored: Mapping[tuple[int, int], bytes]
) -> list[Delivery]:
    """Duplicates whose bytes differ from the event that was chained at their seq.

    A redelivery carries the same bytes; a different body under a chained seq means the
    event was republished after being changed at its source (an alarm, not a new link).
    ``stored`` maps ``(partition, seq)`` to stored links (see :func:`links_needed`); a
    duplicate whose links are missing there counts as conflicting, since the chain then
    does not cover a seq its head claims.
    """
    known = dict(stored)
    known.update({(row.partition, row.seq): row.link for row in plan.links})
    conflicts: list[Delivery] = []
    for delivery in plan.duplicates:
        partition, seq = delivery.partition, delivery.seq
        previous = GENESIS_LINK if seq == 1 else known.get((partition, seq - 1))
        chained = known.get((partition, seq))
        if previous is None or chained is None:
            conflicts.append(delivery)
            continue
        if link(previous, partition, seq, delivery.body) != chained:
            conflicts.append(delivery)
    return conflicts
