"""Read back what the ledger's relay published to ``SPENDGATE_EVENTS`` (test support).

Every message is checked against the version 2 contract on the way
(:mod:`spendgate_common.event_messages_v2`): subject, message id and headers, and a body
holding exactly the seqs the headers name. What comes back is one :class:`PublishedEvent`
per event, in stream order.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from spendgate_common.event_messages_v2 import decode_events, message_headers
from spendgate_common.subjects import EVENTS_STREAM, EVENTS_SUBJECT_WILDCARD, events_subject

# Bound of the read: long enough for a slow CI machine.
READ_DEADLINE_S = 60.0
FETCH_MESSAGES = 1_000


@dataclass(frozen=True, slots=True)
class PublishedEvent:
    partition: int
    seq: int
    body: bytes
    # The Nats-Msg-Id of the message that carried it.
    msg_id: str
    traceparent: str | None


async def read_stream_events(nats_url: str) -> list[PublishedEvent]:
    """Every event in the stream's version 2 messages, as stored now, checked message by
    message against the contract."""
    connection = await nats.connect(nats_url)
    try:
        jetstream = connection.jetstream()
        stored = (await jetstream.stream_info(EVENTS_STREAM)).state.messages
        config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
        subscription = await jetstream.pull_subscribe(
            EVENTS_SUBJECT_WILDCARD, stream=EVENTS_STREAM, config=config
        )
        events: list[PublishedEvent] = []
        read = 0
        started = time.monotonic()
        while read < stored:
            assert time.monotonic() - started < READ_DEADLINE_S, f"read {read} of {stored}"
            with contextlib.suppress(nats.errors.TimeoutError):
                for message in await subscription.fetch(FETCH_MESSAGES, timeout=1):
                    read += 1
                    events += _events_of(message.subject, message.headers or {}, message.data)
        await subscription.unsubscribe()
    finally:
        await connection.close()
    return events


def _events_of(subject: str, headers: dict[str, str], body: bytes) -> list[PublishedEvent]:
    partition = int(headers["Spendgate-Partition"])
    run = decode_events(body)
    first, last = run[0].seq, run[-1].seq
    assert subject == events_subject(partition)
    assert [event.seq for event in run] == list(range(first, last + 1))
    expected = message_headers(partition, first, last)
    assert {name: headers.get(name) for name in expected} == expected
    msg_id = expected["Nats-Msg-Id"]
    return [
        PublishedEvent(partition, event.seq, bytes(event.event), msg_id, event.traceparent)
        for event in run
    ]
