"""The one place where ledger refusals and our exceptions become HTTP statuses."""

from __future__ import annotations

from spendgate_common.errors import DependencyUnavailableError, InvalidRequestError, SpendgateError
from spendgate_common.ledger_v1 import Failed

# HTTP status of each ledger refusal code (docs/api.md lists them all).
FAILED_STATUS = {
    "invalid_key": 401,
    "key_expired": 401,
    "key_revoked": 401,
    "vendor_not_allowed": 403,
    "already_revoked": 409,
    "budget_not_found": 404,
    "budget_exists": 409,
    "budget_closed": 409,
    "too_many_budgets": 409,
    "invalid_budget_id": 400,
    "invalid_scope": 400,
    "invalid_match": 400,
    "invalid_fleet_labels": 400,
    "invalid_allowed_vendors": 400,
    "key_not_found": 404,
    "key_exists": 409,
    "idempotency_conflict": 409,
    "reply_too_large": 400,
    "request_in_progress": 409,
    "reservation_not_found": 404,
    "already_settled": 409,
    "invalid_amount": 400,
    "invalid_label": 400,
    "invalid_window": 400,
    "invalid_timezone": 400,
    "invalid_ttl": 400,
    "invalid_vendor": 400,
    "invalid_operation": 400,
    "invalid_pricing_version": 400,
    "invalid_idempotency_key": 400,
    "invalid_hold": 400,
    "invalid_key_id": 400,
    "invalid_secret_hash": 400,
    "wrong_partition": 400,
    "invalid_limit": 400,
    "invalid_cursor": 400,
    "run_not_found": 404,
    "run_too_large": 422,
    "store_unavailable": 503,
    "not_owner": 503,
    "overloaded": 503,
    "invalid_contract": 400,
    "approval_not_found": 404,
    "approval_not_pending": 409,
    "invalid_approver": 400,
    "malformed_request": 500,
}


def failed_status(failure: Failed) -> int:
    return FAILED_STATUS.get(failure.code, 400)


def exception_status_code_message(error: SpendgateError) -> tuple[int, str, str]:
    """(status, code, message) for an exception raised while serving a request."""
    if isinstance(error, InvalidRequestError):
        return error.status, error.code, error.message
    if isinstance(error, DependencyUnavailableError):
        return 503, error.code, "Spendgate cannot reach its ledger; the call was not forwarded"
    return 500, "internal_error", "internal error"
