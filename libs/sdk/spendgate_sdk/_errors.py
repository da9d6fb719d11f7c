"""The SDK's exceptions: one per answer a caller handles differently.

``SpendgateError`` (``code``, ``message``, ``status``) is the base of all of them and is
raised as such for every other refusal (an invalid request, an unknown reservation, an
unreachable gateway: ``code="gateway_unreachable"``). The answers are translated into
these in exactly one place, ``_client.translate_error``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spendgate_sdk._types import Reservation


class SpendgateError(Exception):
    """A refusal or failure from the gateway: ``code`` is its stable error code."""

    def __init__(self, code: str, message: str, *, status: int = 0) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        # The HTTP status (0 when the gateway could not be reached).
        self.status = status


class BudgetExceeded(SpendgateError):  # noqa: N818 (named for what happened, as callers catch it)
    """429 ``cap_exhausted``: the amount does not fit a cap; nothing is held."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int,
        scope: str,
        scope_id: str,
        remaining_micros: int,
        cap_micros: int,
        requested_micros: int,
        decision_id: str,
    ) -> None:
        super().__init__(code, message, status=status)
        # Which cap refused: key, fleet, vendor or tenant, and its id.
        self.scope = scope
        self.scope_id = scope_id
        self.remaining_micros = remaining_micros
        self.cap_micros = cap_micros
        self.requested_micros = requested_micros
        self.decision_id = decision_id


class ContractStopped(SpendgateError):  # noqa: N818 (named for what happened, as callers catch it)
    """403 ``contract_stop``: a contract rule refuses this call."""


class ApprovalRejected(SpendgateError):  # noqa: N818 (named for what happened, as callers catch it)
    """403 ``approval_rejected`` or ``approval_expired``: the approval this call waited on
    was rejected by an operator, or expired undecided."""


class ApprovalRequired(SpendgateError):  # noqa: N818 (named for what happened, as callers catch it)
    """409 ``approval_required``: a contract holds the reservation until an operator
    approves ``approval_id`` (``POST /v1/approvals/{id}/approve``). Nothing is held yet.

    ``resume()`` (``await resume_async()`` from the async client) sends the same reserve
    with the same idempotency key: granted once approved, ``ApprovalRequired`` again while
    pending, ``ApprovalRejected`` when rejected or expired.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int,
        approval_id: str,
        expires_at: str,
        contract: str,
        idempotency_key: str,
    ) -> None:
        super().__init__(code, message, status=status)
        self.approval_id = approval_id
        # ISO 8601 UTC: after this the approval expires undecided.
        self.expires_at = expires_at
        self.contract = contract
        self.idempotency_key = idempotency_key
        self._resume: Callable[[], Reservation] | None = None
        self._resume_async: Callable[[], Awaitable[Reservation]] | None = None

    def resume(self) -> Reservation:
        """Reserve again with the same request and idempotency key (sync client)."""
        if self._resume is None:
            raise TypeError("raised by AsyncSpendgateClient: use 'await error.resume_async()'")
        return self._resume()

    async def resume_async(self) -> Reservation:
        """Reserve again with the same request and idempotency key (async client)."""
        if self._resume_async is None:
            raise TypeError("raised by SpendgateClient: use 'error.resume()'")
        return await self._resume_async()


class DegradeRequired(SpendgateError):  # noqa: N818 (named for what happened, as callers catch it)
    """409 ``degrade_required``: a contract's ``degrade`` rule asks for a cheaper call.
    Nothing is held. Switch to ``model`` (when not ``None``), keep the estimate within
    ``remaining_micros`` (clamping the output when ``clamp_max_tokens``), then reserve
    again with ``model=`` the new model and ``degraded_by=contract``."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int,
        contract: str,
        model: str | None,
        clamp_max_tokens: bool,
        remaining_micros: int,
    ) -> None:
        super().__init__(code, message, status=status)
        self.contract = contract
        self.model = model
        self.clamp_max_tokens = clamp_max_tokens
        self.remaining_micros = remaining_micros
