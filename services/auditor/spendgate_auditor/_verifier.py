"""Checking one partition's audit chain against its event log. Pure: no I/O.

The shell walks the events (split out of ``event_batches``), ``audit_chain`` and
``audit_checkpoints`` rows of a partition together, in sequence order, and feeds each seq
present in any of them to :meth:`PartitionVerifier.observe`, then calls
:meth:`PartitionVerifier.finish` with the partition's head row. The verifier recomputes
the chain from the events' bodies alone, compares it with the stored links and with every
signed checkpoint (whose signature it checks with the trusted public keys), and reports
the first problem, or how far the chain is verified and signed and how many events the
auditor has not chained yet (lag, which is not a failure).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from spendgate_auditor._chain import GENESIS_LINK, link
from spendgate_auditor._signing import verify_signature


class ProblemKind(enum.StrEnum):
    """Stable names of what verification can find wrong (documented in docs/audit.md)."""

    # A row of the events log's batches does not split into one event per seq of its
    # range, or overlaps the row before it: the log was edited outside the ledger.
    EVENT_BATCH_MALFORMED = "event_batch_malformed"
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
    # A signed checkpoint's link differs from the link recomputed from the events log:
    # events at or before its seq were changed and the chain rewritten to match.
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"
    # A checkpoint's signature does not verify with its key: forged or edited.
    BAD_SIGNATURE = "bad_signature"
    # A checkpoint names a key id that is not among the trusted public keys.
    UNKNOWN_SIGNING_KEY = "unknown_signing_key"


@dataclass(frozen=True, slots=True)
class Problem:
    kind: ProblemKind
    seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class PartitionReport:
    """One partition's result.

    ``events``: rows in its events log (from the start seq on). ``verified``: events whose
    chained link matched the recomputed one. ``not_yet_audited``: events after the
    chain's end (lag). ``signed_seq``: the highest seq covered by a checkpoint that
    verified; ``checkpoints_verified``: how many did. ``problem``: the first problem
    found, ``None`` when there is none.
    """

    partition: int
    events: int
    verified: int
    not_yet_audited: int
    problem: Problem | None
    signed_seq: int = 0
    checkpoints_verified: int = 0

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True, slots=True)
class HeadRow:
    """A partition's ``audit_heads`` row."""

    seq: int
    link: bytes


@dataclass(frozen=True, slots=True)
class CheckpointRow:
    """A row of ``audit_checkpoints`` (of the partition being verified)."""

    seq: int
    link: bytes
    key_id: str
    signature: bytes


def check_signature(
    partition: int, checkpoint: CheckpointRow, keys: Mapping[str, Ed25519PublicKey]
) -> Problem | None:
    """The problem with ``checkpoint``'s signature, ``None`` when it verifies."""
    key = keys.get(checkpoint.key_id)
    if key is None:
        return Problem(
            ProblemKind.UNKNOWN_SIGNING_KEY,
            checkpoint.seq,
            f"the checkpoint is signed by key {checkpoint.key_id!r}, which is not a trusted"
            " public key",
        )
    if not verify_signature(key, partition, checkpoint.seq, checkpoint.link, checkpoint.signature):
        return Problem(
            ProblemKind.BAD_SIGNATURE,
            checkpoint.seq,
            f"the checkpoint's signature does not verify with key {checkpoint.key_id!r}:"
            " it was forged or edited",
        )
    return None


class PartitionVerifier:
    """Recomputes one partition's chain from its events and compares it with the stored
    links and the signed checkpoints.

    ``start_seq`` and ``previous``: verify from ``start_seq`` on, trusting ``previous`` as
    the link of ``start_seq - 1`` (the genesis link for 1; otherwise the link of a
    checkpoint whose signature the caller verified).
    """

    def __init__(
        self,
        partition: int,
        keys: Mapping[str, Ed25519PublicKey] | None = None,
        *,
        start_seq: int = 1,
        previous: bytes = GENESIS_LINK,
    ) -> None:
        assert start_seq >= 1
        assert start_seq > 1 or previous == GENESIS_LINK
        self.partition = partition
        self._keys = keys if keys is not None else {}
        self._start_seq = start_seq
        self._next_seq = start_seq
        self._previous = previous  # recomputed link of ``_next_seq - 1``
        # Whether _previous is the link recomputed for seq _next_seq - 1 (false after a
        # hole in the events log, when nothing later can be recomputed).
        self._recomputing = True
        self._signed_seq = start_seq - 1 if start_seq > 1 else 0
        self._checkpoints_verified = 0
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

    def observe(
        self,
        seq: int,
        body: bytes | None,
        chained: bytes | None,
        checkpoint: CheckpointRow | None = None,
    ) -> None:
        """The event (``body``), the chain row (``chained`` link) and the checkpoint at
        ``seq``.

        Called once per seq present in any of the tables, in increasing seq order; at
        least one of the three is present.
        """
        assert body is not None or chained is not None or checkpoint is not None
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
            recomputed = self._recompute(seq, body)
            self._check(seq, body, chained, checkpoint)
            if self._problem is None and checkpoint is not None:
                self._check_checkpoint(checkpoint, recomputed)
        self._next_seq = seq + 1

    def _recompute(self, seq: int, body: bytes | None) -> bytes | None:
        """The link of ``seq`` recomputed from the events alone, when it can be."""
        if body is None or seq != self._next_seq or not self._recomputing:
            self._recomputing = False
            return None
        self._previous = link(self._previous, self.partition, seq, body)
        return self._previous

    def _check_checkpoint(self, checkpoint: CheckpointRow, recomputed: bytes | None) -> None:
        problem = check_signature(self.partition, checkpoint, self._keys)
        if problem is not None:
            self._problem = problem
            return
        if recomputed is None:
            # The events log has no event at the checkpoint's seq (or a hole before it).
            if self._eventless_from is None:
                self._eventless_from = checkpoint.seq
            return
        if recomputed != checkpoint.link:
            self._fail(
                ProblemKind.CHECKPOINT_MISMATCH,
                checkpoint.seq,
                "the link recomputed from the events log differs from the signed"
                f" checkpoint at seq {checkpoint.seq}: events up to this seq (after the"
                " previous checkpoint) were changed, and the audit chain rewritten to match",
            )
            return
        self._signed_seq = checkpoint.seq
        self._checkpoints_verified += 1

    def _check(
        self,
        seq: int,
        body: bytes | None,
        chained: bytes | None,
        checkpoint: CheckpointRow | None,
    ) -> None:
        if body is None and chained is None:
            # Only a checkpoint: the events log (and the chain) end before a signed seq.
            if self._eventless_from is None:
                self._eventless_from = seq
            return
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
            if chained is not None:
                self._eventless_from = seq
            return
        if chained is None:
            if self._unchained_from is None:
                self._unchained_from = seq
            return
        if self._previous != chained:
            self._fail(
                ProblemKind.LINK_MISMATCH,
                seq,
                "the event's bytes do not match the audit chain: the event was edited,"
                " or events were reordered or inserted, after the auditor chained it",
            )
            return
        self._verified += 1

    def finish(self, head: HeadRow | None) -> PartitionReport:
        """The report, given the partition's head row (``None`` when it has none)."""
        if self._problem is None and self._eventless_from is not None:
            self._fail(
                ProblemKind.TRUNCATED_TAIL,
                self._eventless_from,
                f"the events log ends at seq {self._last_event_seq} but the audit chain or"
                f" a signed checkpoint covers seq {self._eventless_from} and later: events"
                " at the end were deleted",
            )
        if self._problem is None:
            self._check_head(head)
        not_yet_audited = self._events - self._verified if self._problem is None else 0
        return PartitionReport(
            self.partition,
            self._events,
            self._verified,
            not_yet_audited,
            self._problem,
            self._signed_seq,
            self._checkpoints_verified,
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

    def fail_with(self, problem: Problem) -> None:
        """Record a problem found outside the walk (the start checkpoint's signature, a
        malformed batch row of the events log)."""
        if self._problem is None:
            self._problem = problem

    def _fail(self, kind: ProblemKind, seq: int, reason: str) -> None:
        """Record the partition's first problem (later ones are not reported)."""
        assert self._problem is None
        self._problem = Problem(kind, seq, reason)
