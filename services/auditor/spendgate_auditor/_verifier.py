"""Checking one partition's audit chain against its event log. Pure: no I/O.

The shell walks the ``events`` rows and the ``audit_chain`` rows of a partition together,
in sequence order, and feeds each seq present in either table to
:meth:`PartitionVerifier.observe`, then calls :meth:`PartitionVerifier.finish` with the
partition's head row. The verifier recomputes the chain from the events' bodies and
reports the first problem, or how far the chain is verified and how many events the
auditor has not chained yet (lag, which is not a failure).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from spendgate_auditor._chain import GENESIS_LINK, link


class ProblemKind(enum.StrEnum):
    """Stable names of what verification can find wrong (documented in docs/audit.md)."""

    # The events log has no row for a seq below its last one, and the chain has none either.
    EVENT_GAP = "event_gap"
    # The chain covers a seq the events log no longer has, with events after it.
    EVENT_DELETED = "event_deleted"
    # The recomputed link differs from the chained one: edited, reordered or inserted event.
    LINK_MISMATCH = "link_mismatch"
    # The chain goes beyond the end of the events log: events deleted at the end.
    TRUNCATED_TAIL = "truncated_tail"
    # The chain has no row for a seq but has rows after it: audit rows deleted.
    CHAIN_GAP = "chain_gap"
    # The head row disagrees with the chain's last row: audit rows deleted or edited.
    HEAD_MISMATCH = "head_mismatch"
    # A chain row with a seq no event can have (below 1): audit rows edited.
    INVALID_CHAIN_ROW = "invalid_chain_row"


@dataclass(frozen=True, slots=True)
class Problem:
    kind: ProblemKind
    seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class PartitionReport:
    """One partition's result.

    ``events``: rows in its events log. ``verified``: events whose chained link matched
    the recomputed one (1..``verified``). ``not_yet_audited``: events after the chain's
    end (lag). ``problem``: the first problem found, ``None`` when there is none.
    """

    partition: int
    events: int
    verified: int
    not_yet_audited: int
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True, slots=True)
class HeadRow:
    """A partition's ``audit_heads`` row."""

    seq: int
    link: bytes


class PartitionVerifier:
    """Recomputes one partition's chain from its events and compares it with the stored one."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self._next_seq = 1
        self._previous = GENESIS_LINK  # recomputed link of ``_next_seq - 1``
        self._events = 0
        self._verified = 0
        self._last_event_seq = 0
        self._last_chain_seq = 0
        self._last_chain_link = GENESIS_LINK
        # First event the chain does not cover (the start of the lag, if nothing follows).
        self._unchained_from: int | None = None
        # First chain row without an event (a deletion, or a truncated tail at the end).
        self._eventless_from: int | None = None
        self._problem: Problem | None = None

    def observe(self, seq: int, body: bytes | None, chained: bytes | None) -> None:
        """The event (``body``) and the chain row (``chained`` link) at ``seq``.

        Called once per seq present in either table, in increasing seq order; at least
        one of the two is present.
        """
        assert body is not None or chained is not None
        if seq < 1:
            # Only a chain row can be here (events has CHECK (seq > 0)); it comes first in
            # seq order, before anything was checked.
            assert body is None
            assert self._next_seq == 1
            if self._problem is None:
                self._fail(
                    ProblemKind.INVALID_CHAIN_ROW,
                    seq,
                    f"the audit chain has a row for seq {seq}, which no event can have:"
                    " audit rows were edited",
                )
            return
        assert seq >= self._next_seq, (seq, self._next_seq)
        if body is not None:
            self._events += 1
            self._last_event_seq = seq
        if chained is not None:
            self._last_chain_seq = seq
            self._last_chain_link = chained
        if self._problem is None:
            self._check(seq, body, chained)
        self._next_seq = seq + 1

    def _check(self, seq: int, body: bytes | None, chained: bytes | None) -> None:
        if self._eventless_from is not None:
            if body is not None:
                self._fail(
                    ProblemKind.EVENT_DELETED,
                    self._eventless_from,
                    "the event is missing from the events log although the auditor chained"
                    " it, and later events exist: it was deleted",
                )
            return
        if seq > self._next_seq:
            holder = "the events log" if body is not None else "the audit chain"
            self._fail(
                ProblemKind.EVENT_GAP,
                self._next_seq,
                f"the events log has no seq {self._next_seq}..{seq - 1} although {holder}"
                f" has seq {seq}: events were deleted (the ledger writes every seq)",
            )
            return
        if chained is not None and self._unchained_from is not None:
            self._fail(
                ProblemKind.CHAIN_GAP,
                self._unchained_from,
                f"the audit chain has no row for this seq but has one for seq {seq}:"
                " audit rows were deleted",
            )
            return
        if body is None:
            self._eventless_from = seq
            return
        if chained is None:
            self._unchained_from = seq
            return
        expected = link(self._previous, self.partition, seq, body)
        if expected != chained:
            self._fail(
                ProblemKind.LINK_MISMATCH,
                seq,
                "the event's bytes do not match the audit chain: the event was edited,"
                " or events were reordered or inserted, after the auditor chained it",
            )
            return
        self._previous = expected
        self._verified += 1

    def finish(self, head: HeadRow | None) -> PartitionReport:
        """The report, given the partition's head row (``None`` when it has none)."""
        if self._problem is None and self._eventless_from is not None:
            self._fail(
                ProblemKind.TRUNCATED_TAIL,
                self._eventless_from,
                f"the events log ends at seq {self._last_event_seq} but the audit chain"
                f" continues to seq {self._last_chain_seq}: events at the end were deleted",
            )
        if self._problem is None:
            self._check_head(head)
        not_yet_audited = self._events - self._verified if self._problem is None else 0
        return PartitionReport(
            self.partition, self._events, self._verified, not_yet_audited, self._problem
        )

    def _check_head(self, head: HeadRow | None) -> None:
        if head is None:
            if self._last_chain_seq > 0:
                self._fail(
                    ProblemKind.HEAD_MISMATCH,
                    self._last_chain_seq,
                    "the audit chain has rows but the partition has no head row",
                )
            return
        if head.seq > self._last_chain_seq:
            self._fail(
                ProblemKind.HEAD_MISMATCH,
                self._last_chain_seq + 1,
                f"the auditor's head is at seq {head.seq} but the audit chain ends at seq"
                f" {self._last_chain_seq}: audit rows at the end were deleted",
            )
        elif (head.seq, head.link) != (self._last_chain_seq, self._last_chain_link):
            self._fail(
                ProblemKind.HEAD_MISMATCH,
                head.seq,
                f"the auditor's head (seq {head.seq}) disagrees with the audit chain's"
                f" last row (seq {self._last_chain_seq})",
            )

    def _fail(self, kind: ProblemKind, seq: int, reason: str) -> None:
        assert self._problem is None
        self._problem = Problem(kind, seq, reason)
