"""Publishing finance events from the outbox to the ``SPENDGATE_FINANCE`` stream.

A batch's finance events are committed to ``audit_finance_outbox`` in the batch's
transaction; after the commit they are published with ``Nats-Msg-Id`` = the CloudEvent id
(``<partition>:<seq>``), and deleted from the outbox once JetStream acknowledged them. A
crash or a NATS failure in between leaves them in the outbox; they are published again
later (at start, and before each batch while any are left), and JetStream drops the
copies it already stored within its duplicate window. So each finance event is stored in
the stream once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import timedelta

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError

from spendgate_auditor._rollup import FinanceRow
from spendgate_auditor._store import AuditStore
from spendgate_common import finance_v1
from spendgate_common.errors import StoreUnavailableError
from spendgate_common.subjects import (
    FINANCE_STREAM,
    FINANCE_SUBJECT_WILDCARD,
    HEADER_MSG_ID,
    finance_subject,
)

_log = logging.getLogger(__name__)

# JetStream drops a finance event whose Nats-Msg-Id it saw within this window; a
# republish from the outbox happens within seconds, far inside it.
FINANCE_DUPLICATE_WINDOW = timedelta(minutes=10)
# Most outbox rows read (and published) at once when catching up.
OUTBOX_PAGE_ROWS = 2_000
# Most publishes awaiting JetStream's acknowledgement at once.
PUBLISH_INFLIGHT_MAX = 1_024

_ERRORS = (NatsError, OSError, TimeoutError, StoreUnavailableError)


async def ensure_finance_stream(jetstream: JetStreamContext, *, replicas: int = 1) -> None:
    """Create (or update to our configuration) the ``SPENDGATE_FINANCE`` stream: as many
    replicas as the events stream (SPENDGATE_EVENTS_STREAM_REPLICAS), no age limit (what
    finance keeps is finance's choice; the stream is their record of settlements)."""
    config = StreamConfig(
        name=FINANCE_STREAM,
        subjects=[FINANCE_SUBJECT_WILDCARD],
        duplicate_window=FINANCE_DUPLICATE_WINDOW.total_seconds(),
        num_replicas=replicas,
    )
    try:
        await jetstream.add_stream(config)
    except BadRequestError:
        await jetstream.update_stream(config)


class FinancePublisher:
    """Publishes committed finance events; remembers whether the outbox may hold more."""

    def __init__(self, jetstream: JetStreamContext, store: AuditStore, timeout: timedelta) -> None:
        self._jetstream = jetstream
        self._store = store
        self._timeout_s = timeout.total_seconds()
        # True while the outbox may hold rows that were not published (start, failures).
        self.backlog = True
        self.published = 0
        # Finance events in the outbox when last counted (a gauge; 0 once drained).
        self.pending = 0

    async def publish(self, rows: Sequence[FinanceRow]) -> bool:
        """Publish ``rows`` and delete them from the outbox; ``False`` when that failed
        (they stay in the outbox, and :attr:`backlog` is set)."""
        if not rows:
            return True
        try:
            for start in range(0, len(rows), PUBLISH_INFLIGHT_MAX):
                await self._publish_window(rows[start : start + PUBLISH_INFLIGHT_MAX])
            await self._store.delete_finance(rows)
        except _ERRORS as error:
            _log.warning(
                "publishing %d finance events failed (they stay in the outbox): %s: %s",
                len(rows),
                type(error).__name__,
                error,
            )
            self.backlog = True
            self.pending = max(self.pending, len(rows))
            return False
        self.published += len(rows)
        return True

    async def _publish_window(self, rows: Sequence[FinanceRow]) -> None:
        futures = []
        for row in rows:
            headers = {HEADER_MSG_ID: finance_v1.event_id(row.partition, row.seq)}
            futures.append(
                await self._jetstream.publish_async(
                    finance_subject(row.tenant), row.body, headers=headers
                )
            )
        acks = asyncio.gather(*futures)
        try:
            await asyncio.wait_for(acks, self._timeout_s)
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    async def drain_backlog(self) -> bool:
        """Publish whatever the outbox holds; ``True`` when it is empty afterwards."""
        if not self.backlog:
            return True
        try:
            self.pending = await self._store.count_finance()
        except StoreUnavailableError as error:
            _log.warning("reading the finance outbox failed: %s", error)
            return False
        while True:
            try:
                rows = await self._store.pending_finance(OUTBOX_PAGE_ROWS)
            except StoreUnavailableError as error:
                _log.warning("reading the finance outbox failed: %s", error)
                return False
            if rows and not await self.publish(rows):
                return False
            self.pending = max(0, self.pending - len(rows))
            if len(rows) < OUTBOX_PAGE_ROWS:
                self.backlog = False
                self.pending = 0
                return True
