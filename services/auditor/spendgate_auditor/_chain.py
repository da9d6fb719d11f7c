"""The audit hash chain: one SHA-256 chain per partition over the events' canonical bytes.

    link(0)   = GENESIS_LINK                      (32 zero bytes)
    link(seq) = SHA-256(link(seq - 1)
                        || partition as 4-byte big-endian unsigned
                        || seq as 8-byte big-endian unsigned
                        || body)

``body`` is the event's canonical bytes (``events_v1.encode_event``) exactly as stored in
``events.body`` and published on JetStream. Binding the partition and the sequence number
into every link means a body moved to another position or partition changes the chain
even when the bytes are identical. The formula is documented byte for byte in
docs/audit.md so that finance can recompute it with their own code. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

LINK_BYTES = 32
GENESIS_LINK = bytes(LINK_BYTES)

# The widths the formula encodes; a value outside them cannot be hashed unambiguously.
PARTITION_MAX = 2**32 - 1
# Postgres ``bigint`` is the narrower bound of the two (the formula allows 2**64 - 1).
SEQ_MAX = 2**63 - 1


def link(previous: bytes, partition: int, seq: int, body: bytes) -> bytes:
    """The link of event ``seq`` of ``partition`` that follows the link ``previous``.

    ``previous`` is 32 bytes (``GENESIS_LINK`` before seq 1); ``0 <= partition <=
    PARTITION_MAX``; ``1 <= seq <= SEQ_MAX``. Returns 32 bytes.
    """
    assert len(previous) == LINK_BYTES, len(previous)
    assert 0 <= partition <= PARTITION_MAX, partition
    assert 1 <= seq <= SEQ_MAX, seq
    digest = hashlib.sha256(previous)
    digest.update(partition.to_bytes(4, "big"))
    digest.update(seq.to_bytes(8, "big"))
    digest.update(body)
    return digest.digest()


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last link of one partition's chain: ``link`` covers events 1..``seq``.

    ``seq == 0`` with ``GENESIS_LINK`` is the head of a chain that covers nothing yet.
    """

    partition: int
    seq: int
    link: bytes

    def __post_init__(self) -> None:
        assert 0 <= self.partition <= PARTITION_MAX, self.partition
        assert 0 <= self.seq <= SEQ_MAX, self.seq
        assert len(self.link) == LINK_BYTES, len(self.link)
        assert self.seq > 0 or self.link == GENESIS_LINK, "seq 0 must have the genesis link"

    @classmethod
    def genesis(cls, partition: int) -> ChainHead:
        """The head of a partition whose chain covers no event yet."""
        return cls(partition, 0, GENESIS_LINK)

    def extend(self, seq: int, body: bytes) -> ChainHead:
        """The head after chaining event ``seq``; ``seq`` must be exactly ``self.seq + 1``.

        Order is an invariant here, not an operating error: the caller decides what to do
        with duplicates and gaps before it extends, so a wrong ``seq`` is a bug (assert).
        """
        assert seq == self.seq + 1, f"partition {self.partition}: seq {seq} after {self.seq}"
        return ChainHead(self.partition, seq, link(self.link, self.partition, seq, body))
