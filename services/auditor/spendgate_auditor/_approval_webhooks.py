"""Approval notifications: every ``ApprovalRequested`` event is POSTed to the operator's
webhook (``SPENDGATE_APPROVAL_WEBHOOK_URL``), signed with HMAC-SHA256.

A durable JetStream consumer of its own (``APPROVAL_WEBHOOKS_DURABLE``) reads the events
stream, so a slow or dead webhook never holds up the audit chain. Each notification is
tried up to ``DELIVERY_ATTEMPTS_MAX`` times with exponential backoff; then it is logged
as an error and acknowledged (the approval still shows in ``GET /v1/approvals``).
Approvals that lapsed before they could be sent are skipped.

Signature (docs/contracts.md, "Verifying webhooks"): header
``Spendgate-Signature: t=<unix seconds>,v1=<hex>`` where ``<hex>`` is
HMAC-SHA256(secret, ``f"{t}."`` + raw body). Receivers recompute it, compare in constant
time, and refuse a ``t`` too far from their clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from datetime import timedelta

import httpx
import msgspec
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from spendgate_auditor._plan import parse_deliveries
from spendgate_common.events_v1 import ApprovalRequested, decode_event
from spendgate_common.money import format_usd
from spendgate_common.subjects import EVENTS_STREAM

_log = logging.getLogger(__name__)

APPROVAL_WEBHOOKS_DURABLE = "spendgate-approval-webhooks"
SIGNATURE_HEADER = "spendgate-signature"
FETCH_MESSAGES_MAX = 64
FETCH_WAIT = timedelta(seconds=1)
DELIVERY_ATTEMPTS_MAX = 6
RETRY_PAUSE_MIN = timedelta(milliseconds=500)
RETRY_PAUSE_MAX = timedelta(seconds=30)
REQUEST_TIMEOUT = timedelta(seconds=10)
CONNECTIONS_MAX = 4
# Longer than one message's whole retry schedule, which also reports progress.
ACK_WAIT = timedelta(seconds=120)
ERROR_PAUSE = timedelta(seconds=1)
_MARKER = b'"ApprovalRequested"'


class ApprovalNotification(msgspec.Struct, frozen=True):
    """The webhook's JSON body."""

    type: str
    approval_id: str
    tenant: str
    key_id: str
    label: str
    amount_micros: int
    amount_usd: str
    vendor: str
    operation: str
    model: str
    contract: str
    message: str
    requested_at_ms: int
    expires_at_ms: int


def sign(secret: str, body: bytes, timestamp_s: int) -> str:
    """The ``Spendgate-Signature`` header value for ``body`` sent at ``timestamp_s``."""
    signed = f"{timestamp_s}.".encode() + body
    digest = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp_s},v1={digest}"


def notification_body(event: ApprovalRequested) -> bytes:
    return msgspec.json.encode(
        ApprovalNotification(
            type="approval.requested",
            approval_id=event.approval_id,
            tenant=event.tenant,
            key_id=event.key_id,
            label=event.label,
            amount_micros=event.amount_micros,
            amount_usd=format_usd(event.amount_micros),
            vendor=event.vendor,
            operation=event.operation,
            model=event.model,
            contract=event.contract,
            message=event.message,
            requested_at_ms=event.at_ms,
            expires_at_ms=event.expires_at_ms,
        )
    )


class ApprovalWebhooks:
    """The consumer loop; :meth:`start` after NATS is connected, :meth:`stop` before drain."""

    def __init__(self, jetstream: JetStreamContext, url: str, secret: str) -> None:
        self._jetstream = jetstream
        self._url = url
        self._secret = secret
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(REQUEST_TIMEOUT.total_seconds()),
            limits=httpx.Limits(
                max_connections=CONNECTIONS_MAX, max_keepalive_connections=CONNECTIONS_MAX
            ),
            follow_redirects=False,
            trust_env=False,
        )
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.given_up = 0

    async def start(self) -> None:
        config = ConsumerConfig(
            name=APPROVAL_WEBHOOKS_DURABLE,
            durable_name=APPROVAL_WEBHOOKS_DURABLE,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT.total_seconds(),
            max_ack_pending=FETCH_MESSAGES_MAX,
            max_deliver=-1,
        )
        await self._jetstream.add_consumer(EVENTS_STREAM, config)
        subscription = await self._jetstream.pull_subscribe_bind(
            durable=APPROVAL_WEBHOOKS_DURABLE, stream=EVENTS_STREAM
        )
        self._task = asyncio.create_task(self._consume(subscription), name="approval-webhooks")

    async def stop(self, deadline: timedelta) -> None:
        self._stopping.set()
        if self._task is not None:
            done, _ = await asyncio.wait([self._task], timeout=deadline.total_seconds())
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self._client.aclose()

    async def _consume(self, subscription: JetStreamContext.PullSubscription) -> None:
        while not self._stopping.is_set():
            try:
                messages = await subscription.fetch(
                    FETCH_MESSAGES_MAX, timeout=FETCH_WAIT.total_seconds()
                )
            except NatsTimeoutError:
                continue
            except NatsError as error:
                _log.warning("approval webhooks: fetch failed: %s", error)
                await asyncio.sleep(ERROR_PAUSE.total_seconds())
                continue
            for message in messages:
                for event in _approvals_requested(message):
                    if not await self._notify(event, message):
                        return  # Stopping: unacknowledged, it is sent after a restart.
                with contextlib.suppress(NatsError):
                    await message.ack()

    async def _notify(self, event: ApprovalRequested, message: Msg) -> bool:
        """Deliver one notification; False when stopping interrupted it."""
        if event.expires_at_ms <= time.time_ns() // 1_000_000:
            _log.info("approval %s lapsed before it was notified", event.approval_id)
            return True
        body = notification_body(event)
        pause_s = RETRY_PAUSE_MIN.total_seconds()
        for attempt in range(1, DELIVERY_ATTEMPTS_MAX + 1):
            headers = {
                "content-type": "application/json",
                SIGNATURE_HEADER: sign(self._secret, body, int(time.time())),
            }
            try:
                answer = await self._client.post(self._url, content=body, headers=headers)
                if 200 <= answer.status_code < 300:
                    self.delivered += 1
                    return True
                problem = f"status {answer.status_code}"
            except httpx.HTTPError as error:
                problem = type(error).__name__
            _log.warning(
                "approval webhook for %s failed (attempt %d of %d): %s",
                event.approval_id,
                attempt,
                DELIVERY_ATTEMPTS_MAX,
                problem,
            )
            if self._stopping.is_set():
                return False
            if attempt == DELIVERY_ATTEMPTS_MAX:
                break
            with contextlib.suppress(NatsError):
                await message.in_progress()
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, RETRY_PAUSE_MAX.total_seconds())
        self.given_up += 1
        _log.error("approval webhook for %s given up; see GET /v1/approvals", event.approval_id)
        return True


def _approvals_requested(message: Msg) -> list[ApprovalRequested]:
    """The approval requests among a message's events (a cheap byte search first: most
    messages hold none). A malformed message holds none: the chain's consumer reports it."""
    if _MARKER not in message.data:
        return []
    deliveries = parse_deliveries(message.subject, message.headers, message.data, 0) or []
    requested: list[ApprovalRequested] = []
    for delivery in deliveries:
        if _MARKER in delivery.body:
            try:
                event = decode_event(delivery.body)
            except msgspec.DecodeError:
                continue  # Not rolled up either; the auditor logs it (undecodable).
            if isinstance(event, ApprovalRequested):
                requested.append(event)
    return requested
