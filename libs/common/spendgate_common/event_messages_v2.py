"""Event stream messages, version 2: one JetStream message carries a run of events.

Version 1 published every event as its own message (``spendgate.v1.events.<partition>``,
``Nats-Msg-Id: <partition>:<seq>``). One message and one acknowledgement per event was a
third of the ledger's CPU and most of the NATS server's on a hot partition, so version 2
publishes the events of one appended batch together (docs/decisions.md, "Event stream
messages carry a run of events"):

* subject ``spendgate.v2.events.<partition>`` (:func:`~spendgate_common.subjects.events_subject`);
* headers ``Nats-Msg-Id: <partition>:<first seq>-<last seq>``, ``Spendgate-Partition``,
  ``Spendgate-First-Seq`` and ``Spendgate-Last-Seq``;
* body: a JSON array of :class:`StreamedEvent`, one per seq from first to last, in order,
  each carrying the event's canonical bytes (:mod:`spendgate_common.events_v1`) verbatim,
  so the audit chain hashes exactly what the log holds.

A message holds the events of one appended batch (one Postgres transaction), split into
runs of at most :data:`~spendgate_common.limits.EVENT_MESSAGE_EVENTS_MAX` events and about
:data:`~spendgate_common.limits.EVENT_MESSAGE_BYTES_MAX` bytes by :func:`split_runs`. The
split depends only on the batch, so a relay that republishes after a crash (reading the
log, where a batch is the rows of one transaction) sends the same messages under the same
message ids, and JetStream drops the copies. When it cannot (a log restored elsewhere),
runs overlap, and consumers drop events by ``seq``, which they must do anyway for
redeliveries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar

import msgspec

from spendgate_common.limits import EVENT_MESSAGE_BYTES_MAX, EVENT_MESSAGE_EVENTS_MAX
from spendgate_common.subjects import (
    HEADER_FIRST_SEQ,
    HEADER_LAST_SEQ,
    HEADER_MSG_ID,
    HEADER_PARTITION,
    events_msg_id,
)

# Bytes a message's body adds to each event: ``{"seq":<19 digits>,"event":…}`` and a
# comma, plus a traceparent (55 characters) with its key when the event was traced.
_EVENT_FRAMING_BYTES = 32
_TRACEPARENT_FRAMING_BYTES = 72


class StreamedEvent(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """One event in a message: its seq, its canonical bytes, and (when the command that
    produced it was traced) the W3C ``traceparent`` of the ledger span of that command."""

    seq: int
    event: msgspec.Raw
    traceparent: str | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(list[StreamedEvent])


def encode_events(events: Sequence[StreamedEvent]) -> bytes:
    """A message body: the JSON array of ``events`` (each event's bytes verbatim)."""
    return _encoder.encode(events)


def decode_events(body: bytes) -> list[StreamedEvent]:
    """The events of a message body; raises ``msgspec.DecodeError`` (or its subclass
    ``ValidationError``) when the body is not an array of :class:`StreamedEvent`."""
    return _decoder.decode(body)


def message_headers(partition: int, first_seq: int, last_seq: int) -> dict[str, str]:
    """The headers of the message carrying ``partition``'s seqs ``first_seq..last_seq``."""
    return {
        HEADER_MSG_ID: events_msg_id(partition, first_seq, last_seq),
        HEADER_PARTITION: str(partition),
        HEADER_FIRST_SEQ: str(first_seq),
        HEADER_LAST_SEQ: str(last_seq),
    }


class _HasBody(Protocol):
    @property
    def body(self) -> bytes: ...


RowT = TypeVar("RowT", bound=_HasBody)


def split_runs(
    rows: Sequence[RowT],
    *,
    bytes_max: int = EVENT_MESSAGE_BYTES_MAX,
    events_max: int = EVENT_MESSAGE_EVENTS_MAX,
) -> Iterator[Sequence[RowT]]:
    """Cut one batch's rows (in seq order) into the runs that become messages.

    Greedy from the first row: a run ends before the row that would take it past
    ``events_max`` rows or past ``bytes_max`` bytes of event bodies and framing, so the cut
    depends only on the rows. A row larger than ``bytes_max`` travels alone.
    """
    start = 0
    size = 0
    for index, row in enumerate(rows):
        row_bytes = len(row.body) + _EVENT_FRAMING_BYTES + _TRACEPARENT_FRAMING_BYTES
        if index > start and (index - start >= events_max or size + row_bytes > bytes_max):
            yield rows[start:index]
            start, size = index, 0
        size += row_bytes
    if start < len(rows):
        yield rows[start:]
