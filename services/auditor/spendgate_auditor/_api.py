"""The auditor's NATS request-reply API (``spendgate.v1.audit.<op>``; spendgate_common.audit_v1).

The gateway has no database connection, so ``GET /v1/audit/keys`` and ``GET
/v1/audit/verify`` are answered here. Every replica subscribes in one queue group, so each
request is answered once. A verification runs at most one at a time per replica (another
asking meanwhile is told ``busy``) and within ``verify_deadline``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from spendgate_auditor._chain import SEQ_MAX
from spendgate_auditor._signing import ALGORITHM, public_key_pem
from spendgate_auditor._store import AuditStore, CheckpointRow
from spendgate_auditor.verify import verify
from spendgate_common import audit_v1
from spendgate_common.errors import StoreUnavailableError
from spendgate_common.limits import PARTITION_COUNT_MAX
from spendgate_common.subjects import (
    AUDIT_CHECKPOINT_SUBJECT,
    AUDIT_KEYS_SUBJECT,
    AUDIT_STATUS_SUBJECT,
    AUDIT_VERIFY_SUBJECT,
    AUDITOR_QUEUE_GROUP,
)

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Requests waiting per subject; beyond it NATS drops them and the caller times out.
REQUESTS_PENDING_MAX = 256
# A request body is a small JSON object.
REQUEST_BYTES_MAX = 4_096


class AuditorCore(Protocol):
    """What the API needs from the service."""

    @property
    def store(self) -> AuditStore: ...

    @property
    def signing_key_id(self) -> str: ...

    @property
    def database_url(self) -> str: ...

    @property
    def verify_deadline_s(self) -> float: ...

    async def sign_heads_now(self) -> list[CheckpointRow]: ...

    def status(self) -> audit_v1.AuditorStatus: ...


def checkpoint_reply(rows: list[CheckpointRow]) -> audit_v1.Checkpoints:
    return audit_v1.Checkpoints(
        checkpoints=[
            audit_v1.Checkpoint(
                partition=row.partition,
                seq=row.seq,
                link=row.link.hex(),
                key_id=row.key_id,
                signature=base64.b64encode(row.signature).decode("ascii"),
            )
            for row in rows
        ]
    )


class AuditApi:
    def __init__(self, nats: NatsClient, core: AuditorCore) -> None:
        self._nats = nats
        self._core = core
        self._subscriptions: list[Subscription] = []
        self._verifying = asyncio.Lock()

    async def start(self) -> None:
        handlers: dict[str, Callable[[bytes], Awaitable[audit_v1.AuditReply]]] = {
            AUDIT_KEYS_SUBJECT: self._keys,
            AUDIT_VERIFY_SUBJECT: self._verify,
            AUDIT_CHECKPOINT_SUBJECT: self._checkpoint,
            AUDIT_STATUS_SUBJECT: self._status,
        }
        for subject, handler in handlers.items():
            self._subscriptions.append(
                await self._nats.subscribe(
                    subject,
                    queue=AUDITOR_QUEUE_GROUP,
                    cb=self._responder(handler),
                    pending_msgs_limit=REQUESTS_PENDING_MAX,
                )
            )

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        self._subscriptions.clear()

    def _responder(
        self, handler: Callable[[bytes], Awaitable[audit_v1.AuditReply]]
    ) -> Callable[[Msg], Awaitable[None]]:
        async def respond(message: Msg) -> None:
            if not message.reply:
                return
            try:
                if len(message.data) > REQUEST_BYTES_MAX:
                    raise _RefusedError("invalid_request", "the request is too large")
                reply = await handler(message.data)
            except _RefusedError as refused:
                reply = audit_v1.AuditFailed(refused.code, refused.message)
            except StoreUnavailableError as error:
                reply = audit_v1.AuditFailed("store_unavailable", str(error))
            except Exception:
                _log.exception("answering %s failed", message.subject)
                reply = audit_v1.AuditFailed("internal_error", "the auditor failed to answer")
            with contextlib.suppress(Exception):
                await message.respond(audit_v1.encode(reply))

        return respond

    async def _keys(self, data: bytes) -> audit_v1.AuditReply:
        _decode(data, audit_v1.KeysRequest)
        rows = await self._core.store.signing_keys()
        current = self._core.signing_key_id
        return audit_v1.SigningKeys(
            keys=[
                audit_v1.SigningKey(
                    key_id=row.key_id,
                    algorithm=ALGORITHM,
                    public_key=base64.b64encode(row.public_key).decode("ascii"),
                    public_key_pem=public_key_pem(row.public_key),
                    first_used_at=row.first_used_at.isoformat().replace("+00:00", "Z"),
                    current=row.key_id == current,
                )
                for row in rows
                if row.algorithm == ALGORITHM
            ]
        )

    async def _verify(self, data: bytes) -> audit_v1.AuditReply:
        request = _decode(data, audit_v1.VerifyRequest)
        if request.partition is not None and not 0 <= request.partition < PARTITION_COUNT_MAX:
            raise _RefusedError("invalid_request", "partition out of range")
        if request.from_seq is not None and not 1 <= request.from_seq <= SEQ_MAX:
            raise _RefusedError("invalid_request", "from must be a seq, at least 1")
        if self._verifying.locked():
            raise _RefusedError("busy", "a verification is running; try again later")
        async with self._verifying:
            try:
                report = await asyncio.wait_for(
                    verify(
                        self._core.database_url,
                        partition=request.partition,
                        from_seq=request.from_seq,
                    ),
                    self._core.verify_deadline_s,
                )
            except TimeoutError:
                raise _RefusedError(
                    "timeout",
                    "verification did not finish in time; verify one partition, or use"
                    " 'spendgate audit verify' for the whole log",
                ) from None
        return audit_v1.Verification(
            ok=report.ok,
            events=report.events,
            verified=report.verified,
            not_yet_audited=report.not_yet_audited,
            partitions=[
                audit_v1.PartitionVerification(
                    partition=p.partition,
                    events=p.events,
                    verified=p.verified,
                    not_yet_audited=p.not_yet_audited,
                    signed_seq=p.signed_seq,
                    checkpoints_verified=p.checkpoints_verified,
                    problem=None if p.problem is None else str(p.problem.kind),
                    problem_seq=None if p.problem is None else p.problem.seq,
                    reason=None if p.problem is None else p.problem.reason,
                )
                for p in report.partitions
            ],
        )

    async def _checkpoint(self, data: bytes) -> audit_v1.AuditReply:
        _decode(data, audit_v1.CheckpointRequest)
        return checkpoint_reply(await self._core.sign_heads_now())

    async def _status(self, data: bytes) -> audit_v1.AuditReply:
        _decode(data, audit_v1.StatusRequest)
        return self._core.status()


class _RefusedError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _decode(data: bytes, kind: type[_T]) -> _T:
    try:
        return msgspec.json.decode(data or b"{}", type=kind)
    except msgspec.DecodeError as error:
        raise _RefusedError("invalid_request", f"malformed request: {error}") from None
