"""Create (or update) the JetStream stream ``SPENDGATE_EVENTS``, print it, exit: a Job.

``python /app/ops/ensure_stream.py`` makes exactly the call the ledger and the auditor make
on start (:func:`spendgate_common.nats_adapter.ensure_events_stream`), so the Job cannot
configure the stream differently from what the services would set back. It exists so
that a deployment orders "the stream is there" before the services and shows a failure
(NATS unreachable, JetStream off) as one failed Job instead of crash-looping services.

The auditor's durable consumer is not created here: its settings
(``SPENDGATE_AUDITOR_ACK_WAIT_SECONDS``, ``SPENDGATE_AUDITOR_ACK_PENDING_MAX``) belong to
the auditor, which creates or updates it on start.

Reads SPENDGATE_NATS_URL (and SPENDGATE_PARTITION_COUNT, checked like the services do).
Exit status 0: the stream exists; 1: NATS unreachable or refused; 2: configuration error.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta

from spendgate_common import nats_adapter
from spendgate_common.errors import ConfigurationError, LedgerUnavailableError
from spendgate_common.settings import CommonSettings, Env, StreamSettings
from spendgate_common.subjects import EVENTS_STREAM

# How long to wait for NATS to accept a connection (it may still be starting).
CONNECT_DEADLINE = timedelta(seconds=60)
DRAIN_TIMEOUT = timedelta(seconds=5)


async def ensure_stream(nats_url: str, stream: StreamSettings) -> str:
    """Ensure the stream exists with our configuration; return a one-line description.

    Raises :class:`LedgerUnavailableError` when NATS is unreachable or refuses.
    """
    client = await nats_adapter.connect(
        nats_url, name="spendgate-stream-setup", connect_deadline=CONNECT_DEADLINE
    )
    try:
        jetstream = client.jetstream()
        async with nats_adapter.translate_errors(f"ensure stream {EVENTS_STREAM}"):
            await nats_adapter.ensure_events_stream(jetstream, stream)
            info = await jetstream.stream_info(EVENTS_STREAM)
    finally:
        async with nats_adapter.translate_errors("drain"):
            await asyncio.wait_for(client.drain(), DRAIN_TIMEOUT.total_seconds())
    config = info.config
    return (
        f"stream {config.name}: subjects {', '.join(config.subjects or [])},"
        f" {config.num_replicas or 1} replica(s), {info.state.messages} messages"
    )


def main() -> int:
    try:
        settings = CommonSettings.from_env(Env())
    except ConfigurationError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    try:
        print(asyncio.run(ensure_stream(settings.nats_url, settings.events_stream)))
    except LedgerUnavailableError as error:
        print(f"cannot ensure stream {EVENTS_STREAM}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
