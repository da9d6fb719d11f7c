"""``/v1/audit/...`` (admin token): the auditor's public keys, verification, checkpoints.

The gateway has no database connection: each route asks the auditor over NATS
request-reply (``spendgate.v1.audit.<op>``, :mod:`spendgate_common.audit_v1`) and answers
503 ``auditor_unavailable`` when no auditor replies in time. A verification that finds a
broken chain is still a 200: ``ok`` is false and each broken partition names its problem
(docs/audit.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import msgspec
from fastapi import APIRouter
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from starlette.requests import Request
from starlette.responses import Response

from spendgate_common import audit_v1
from spendgate_common.errors import InvalidRequestError
from spendgate_common.limits import PARTITION_COUNT_MAX
from spendgate_common.subjects import (
    AUDIT_CHECKPOINT_SUBJECT,
    AUDIT_KEYS_SUBJECT,
    AUDIT_STATUS_SUBJECT,
    AUDIT_VERIFY_SUBJECT,
)
from spendgate_gateway._auth import check_admin_token
from spendgate_gateway._responses import error_response, json_response
from spendgate_gateway._settings import GatewaySettings

# How long a route waits for the auditor. A verification may read the whole event log;
# the auditor bounds it (SPENDGATE_AUDITOR_VERIFY_DEADLINE_SECONDS, default 50 s) below this.
AUDIT_REQUEST_TIMEOUT = timedelta(seconds=5)
AUDIT_VERIFY_TIMEOUT = timedelta(seconds=60)
# Largest seq a query parameter may name (Postgres bigint).
SEQ_MAX = 2**63 - 1

# HTTP status of each AuditFailed code.
FAILED_STATUS = {
    "invalid_request": 400,
    "busy": 429,
    "timeout": 504,
    "store_unavailable": 503,
}


def audit_router(settings: GatewaySettings, holder: Mapping[str, object]) -> APIRouter:
    """The routes; ``holder["nats"]`` is the gateway's NATS client once it has started."""
    router = APIRouter(prefix="/v1/audit", tags=["audit"])

    def check_admin(request: Request) -> None:
        check_admin_token(request.headers, settings.admin_token)

    async def ask(subject: str, request: msgspec.Struct, wait: timedelta) -> Response:
        nats = holder.get("nats")
        if not isinstance(nats, NatsClient):
            return _unavailable("the gateway is not connected to NATS")
        try:
            message = await nats.request(
                subject, audit_v1.encode(request), timeout=wait.total_seconds()
            )
            reply = audit_v1.decode_reply(message.data)
        except (NatsError, OSError, TimeoutError) as error:
            return _unavailable(f"no answer from the auditor ({type(error).__name__})")
        except msgspec.DecodeError:
            return _unavailable("the auditor's answer is malformed")
        if isinstance(reply, audit_v1.AuditFailed):
            return error_response(FAILED_STATUS.get(reply.code, 502), reply.code, reply.message)
        body = msgspec.to_builtins(reply)
        body.pop("type", None)
        return json_response(200, body)

    @router.get("/keys")
    async def keys(request: Request) -> Response:
        """Every public key checkpoints were signed with (old ones stay, for old signatures)."""
        check_admin(request)
        return await ask(AUDIT_KEYS_SUBJECT, audit_v1.KeysRequest(), AUDIT_REQUEST_TIMEOUT)

    @router.get("/verify")
    async def verify(
        request: Request, partition: int | None = None, from_seq: int | None = None
    ) -> Response:
        """Recompute the chains from the event log; check every link and signature.

        ``partition``: only that one; ``from`` (or ``from_seq``): start at the newest signed
        checkpoint before that seq."""
        check_admin(request)
        from_text = request.query_params.get("from")
        if from_text is not None:
            if not from_text.isdecimal() or len(from_text) > 19:
                raise InvalidRequestError("invalid_from", "from must be a positive seq")
            from_seq = int(from_text)
        if partition is not None and not 0 <= partition < PARTITION_COUNT_MAX:
            raise InvalidRequestError(
                "invalid_partition", f"partition must be 0 to {PARTITION_COUNT_MAX - 1}"
            )
        if from_seq is not None and not 1 <= from_seq <= SEQ_MAX:
            raise InvalidRequestError("invalid_from", "from must be a positive seq")
        return await ask(
            AUDIT_VERIFY_SUBJECT,
            audit_v1.VerifyRequest(partition=partition, from_seq=from_seq),
            AUDIT_VERIFY_TIMEOUT,
        )

    @router.post("/checkpoints")
    async def checkpoint(request: Request) -> Response:
        """Sign every partition's head now; the checkpoint of every head."""
        check_admin(request)
        return await ask(
            AUDIT_CHECKPOINT_SUBJECT, audit_v1.CheckpointRequest(), AUDIT_REQUEST_TIMEOUT
        )

    @router.get("/status")
    async def status(request: Request) -> Response:
        """The answering auditor's lag and counters."""
        check_admin(request)
        return await ask(AUDIT_STATUS_SUBJECT, audit_v1.StatusRequest(), AUDIT_REQUEST_TIMEOUT)

    return router


def _unavailable(message: str) -> Response:
    return error_response(503, "auditor_unavailable", f"Spendgate's auditor: {message}")
