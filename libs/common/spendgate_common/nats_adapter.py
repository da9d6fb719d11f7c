"""The nats-py adapter: connecting with bounded retries, the events stream, error translation.

This is the one place where nats-py's exceptions become ours for the request path
(:class:`~spendgate_common.errors.LedgerUnavailableError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

import nats
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError

from spendgate_common.errors import LedgerUnavailableError
from spendgate_common.settings import StreamSettings
from spendgate_common.subjects import EVENTS_STREAM, EVENTS_SUBJECTS

_log = logging.getLogger(__name__)

# JetStream drops a message whose Nats-Msg-Id it saw within this window.
EVENTS_DUPLICATE_WINDOW = timedelta(minutes=10)
# Bounds of a client's buffered outgoing data while reconnecting.
RECONNECT_BUFFER_BYTES = 8 * 1024 * 1024


async def connect(
    url: str,
    *,
    name: str,
    connect_deadline: timedelta,
    reconnect_wait: timedelta = timedelta(milliseconds=250),
) -> NatsClient:
    """Connect, retrying until ``connect_deadline``; later reconnects are unbounded in count."""

    async def on_error(error: Exception) -> None:
        _log.warning("nats: %s", error)

    async def on_disconnected() -> None:
        _log.warning("nats: disconnected")

    async def on_reconnected() -> None:
        _log.info("nats: reconnected")

    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + connect_deadline.total_seconds()
    delay_s = 0.1
    while True:
        try:
            return await nats.connect(
                url,
                name=name,
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=reconnect_wait.total_seconds(),
                pending_size=RECONNECT_BUFFER_BYTES,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            )
        except (NatsError, OSError, TimeoutError) as error:
            if loop.time() + delay_s > give_up_at:
                raise LedgerUnavailableError(f"cannot connect to NATS at {url}: {error}") from error
            _log.warning("nats not reachable yet (%s), retrying in %.1f s", error, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)


# A single server, messages kept forever: only for tests and tools without settings.
SINGLE_NODE_STREAM = StreamSettings()


async def ensure_events_stream(
    jetstream: JetStreamContext, stream: StreamSettings = SINGLE_NODE_STREAM
) -> None:
    """Create (or update to our configuration) the ``SPENDGATE_EVENTS`` stream."""
    config = StreamConfig(
        name=EVENTS_STREAM,
        subjects=list(EVENTS_SUBJECTS),
        duplicate_window=EVENTS_DUPLICATE_WINDOW.total_seconds(),
        num_replicas=stream.replicas,
        max_age=stream.max_age.total_seconds(),
    )
    try:
        await jetstream.add_stream(config)
    except BadRequestError:
        await jetstream.update_stream(config)


@contextlib.asynccontextmanager
async def translate_errors(action: str) -> AsyncIterator[None]:
    """Turn NATS failures on the request path into LedgerUnavailableError."""
    try:
        yield
    except (NatsError, OSError, TimeoutError) as error:
        raise LedgerUnavailableError(f"{action}: {type(error).__name__}: {error}") from error
