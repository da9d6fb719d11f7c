"""When to sign a checkpoint. Pure: no I/O, the caller passes the time (monotonic seconds).

Every partition's chain is signed at least every ``every_events`` events and at least
``interval_s`` after its oldest unsigned event was chained, whichever comes first:

* inside a batch, a link is signed as soon as it is ``every_events`` past the partition's
  last signed seq (so a large batch gets several checkpoints), and the partition's last
  link of the batch is signed when its oldest unsigned event is ``interval_s`` old;
* between batches (an idle stream), :meth:`CheckpointSchedule.due` lists the partitions
  whose unsigned tail has become ``interval_s`` old, and the shell signs their heads.

The schedule changes only through :meth:`committed` and :meth:`signed`, which the shell
calls after the transaction that wrote the links and checkpoints committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from spendgate_auditor._chain import ChainHead


class CheckpointSchedule:
    def __init__(self, every_events: int, interval_s: float) -> None:
        assert every_events >= 1
        assert interval_s > 0
        self.every_events = every_events
        self.interval_s = interval_s
        # Last signed seq per partition, as committed.
        self._signed: dict[int, int] = {}
        # Monotonic time at which each partition's oldest unsigned event was chained.
        self._unsigned_since: dict[int, float] = {}
        # Last chained seq per partition, as committed.
        self._heads: dict[int, int] = {}

    def load(self, heads: Mapping[int, int], signed: Mapping[int, int], now_s: float) -> None:
        """Start from the stored heads and last signed seqs: unsigned heads are due now."""
        self._signed = dict(signed)
        self._heads = dict(heads)
        self._unsigned_since = {
            partition: now_s - self.interval_s
            for partition, seq in heads.items()
            if seq > signed.get(partition, 0)
        }

    def plan(self, links: Sequence[ChainHead], now_s: float) -> list[ChainHead]:
        """The links of a batch (in chaining order) to sign in the same transaction."""
        to_sign: list[ChainHead] = []
        signed = dict(self._signed)
        last: dict[int, ChainHead] = {}
        for head in links:
            if head.seq - signed.get(head.partition, 0) >= self.every_events:
                to_sign.append(head)
                signed[head.partition] = head.seq
            last[head.partition] = head
        for partition, head in last.items():
            if head.seq <= signed.get(partition, 0):
                continue
            since = self._unsigned_since.get(partition, now_s)
            if now_s - since >= self.interval_s:
                to_sign.append(head)
        return to_sign

    def committed(
        self, heads: Iterable[ChainHead], signed: Iterable[ChainHead], now_s: float
    ) -> None:
        """A batch committed: ``heads`` are the partitions' new heads, ``signed`` the
        checkpoints it wrote."""
        for head in heads:
            self._heads[head.partition] = max(head.seq, self._heads.get(head.partition, 0))
        self.signed(signed)
        for head in heads:
            if head.seq > self._signed.get(head.partition, 0):
                self._unsigned_since.setdefault(head.partition, now_s)

    def signed(self, checkpoints: Iterable[ChainHead]) -> None:
        """Checkpoints that committed (from a batch or from signing heads on demand)."""
        for checkpoint in checkpoints:
            partition = checkpoint.partition
            if checkpoint.seq > self._signed.get(partition, 0):
                self._signed[partition] = checkpoint.seq
            if self._signed[partition] >= self._heads.get(partition, 0):
                self._unsigned_since.pop(partition, None)

    def due(self, now_s: float) -> list[int]:
        """Partitions whose unsigned tail is ``interval_s`` old: sign their heads now."""
        return sorted(
            partition
            for partition, since in self._unsigned_since.items()
            if now_s - since >= self.interval_s
        )

    def unsigned(self) -> list[int]:
        """Partitions with chained events after their last checkpoint."""
        return sorted(self._unsigned_since)

    def next_due_in_s(self, now_s: float) -> float | None:
        """Seconds until the next partition is due (0 when one is), ``None`` if none."""
        if not self._unsigned_since:
            return None
        oldest = min(self._unsigned_since.values())
        return max(0.0, oldest + self.interval_s - now_s)
