"""What the proxy does with a contract's decisions (docs/contracts.md).

* ``ApprovalPending``: 409 ``approval_required`` with the approval id; nothing forwarded.
  The agent retries the same call with the same idempotency key once an operator
  approved it (``POST /v1/approvals/{id}/approve``).
* ``Denied`` with a contract code (``contract_stop``, ``approval_rejected``,
  ``approval_expired``): 403, in the same body as ``cap_exhausted``.
* ``Degrade``: the call is rewritten (vendors/_degrade.py), estimated again and reserved
  again with ``degraded_by`` naming the rule; the answer carries ``Spendgate-Degraded``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import msgspec
from starlette.responses import Response

from spendgate_common.ledger_v1 import AnyResult, ApprovalPending, Degrade, Reserve
from spendgate_common.limits import IDEMPOTENCY_KEY_CHARS_MAX
from spendgate_gateway._ledger_client import LedgerClient
from spendgate_gateway._responses import error_response
from spendgate_gateway.vendors import Call, Estimate, Vendor
from spendgate_gateway.vendors._degrade import degrade
from spendgate_gateway.vendors._pricer import Pricer

CONTRACT_DENIAL_CODES = frozenset({"contract_stop", "approval_rejected", "approval_expired"})
DEGRADED_HEADER = "spendgate-degraded"


def denial_status(code: str) -> int:
    """403 for a contract's refusal, 429 for a cap's."""
    return 403 if code in CONTRACT_DENIAL_CODES else 429


def approval_response(vendor: Vendor, pending: ApprovalPending) -> Response:
    message = (
        f"Spendgate: {pending.message} (approval {pending.approval_id} is pending; "
        "retry with the same idempotency key once it is approved)"
    )
    return error_response(
        409,
        "approval_required",
        message,
        vendor_error=vendor.error_object("approval_required", message, 409),
        extra={
            "approval_id": pending.approval_id,
            "expires_at_ms": pending.expires_at_ms,
            "contract": pending.contract,
        },
        headers=vendor.refusal_headers(),
    )


@dataclass(frozen=True, slots=True)
class DegradedReserve:
    estimate: Estimate
    body: bytes
    result: AnyResult
    # The Spendgate-Degraded header's value.
    header: str


def degraded_idempotency_key(idempotency_key: str | None, contract: str) -> str | None:
    """The degraded reserve's own idempotency key: a retry of the original call is
    degraded again the same way and replays this one (the original key never holds a
    decision, as ``Degrade`` records nothing)."""
    if idempotency_key is None:
        return None
    derived = f"{idempotency_key}:degraded:{contract}"
    if len(derived) > IDEMPOTENCY_KEY_CHARS_MAX:
        derived = "degraded:" + hashlib.sha256(derived.encode("utf-8")).hexdigest()
    return derived


async def reserve_degraded(
    ledger: LedgerClient,
    pricer: Pricer,
    vendor: Vendor,
    call: Call,
    first: Reserve,
    decision: Degrade,
) -> DegradedReserve:
    """Rewrite the call as ``decision`` says (when the vendor can), and reserve it again
    with ``degraded_by`` set. Raises as the estimator does."""
    degraded = degrade(
        vendor.name,
        call.path,
        call.body,
        model=decision.model,
        clamp_max_tokens=decision.clamp_max_tokens,
        remaining_micros=decision.remaining_micros,
        estimate=lambda body: pricer.estimate(vendor, replace(call, body=body)),
    )
    if degraded is None:
        estimate, body = pricer.estimate(vendor, call), call.body
        header = f"{decision.contract}; not-applicable"
        model = first.model
    else:
        estimate, body, model = degraded.estimate, degraded.body, degraded.model
        header = f"{decision.contract}; model={model}"
        if degraded.max_tokens is not None:
            header += f"; max_tokens={degraded.max_tokens}"
    command = msgspec.structs.replace(
        first,
        amount_micros=estimate.amount_micros,
        operation=estimate.operation,
        pricing_version=estimate.pricing_version,
        idempotency_key=degraded_idempotency_key(first.idempotency_key, decision.contract),
        model=model,
        degraded_by=decision.contract,
    )
    return DegradedReserve(estimate, body, await ledger.execute(command), header)
