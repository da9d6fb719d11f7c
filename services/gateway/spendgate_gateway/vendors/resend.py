"""Resend: emails priced per recipient.

Priced operations (JSON, as Resend's SDKs send them):

* ``POST /emails``: one email; every address in ``to``, ``cc`` and ``bcc`` (each a string
  or a list of strings; a string with commas counts each part) is one email on Resend's
  bill, at ``recipient_usd`` of ``pricing/resend.json``;
* ``POST /emails/batch``: a list of such emails, the sum of their recipients.

Settling: 2xx is spent at the estimate, except that a batch sent with
``x-batch-validation: permissive`` answers which emails it refused (``errors[].index``),
and those are not counted; 4xx is free; anything else unknown. Resend deduplicates
retries that carry the same ``Idempotency-Key``. Other endpoints are ``unpriced_call``
unless a fixed cost is configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from spendgate_common.errors import InvalidRequestError
from spendgate_common.money import parse_usd
from spendgate_gateway._auth import bearer_token
from spendgate_gateway.pricing import load_pricing
from spendgate_gateway.vendors._base import (
    Call,
    Estimate,
    Outcome,
    Settlement,
    StreamMeter,
    UnpricedCallError,
)
from spendgate_gateway.vendors._bodies import json_value, media_type, unsupported_media_type
from spendgate_gateway.vendors._fixed import settle_fixed

_RECIPIENT_FIELDS = ("to", "cc", "bcc")


class _ResendPricing(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: str
    basis: str
    recipient_usd: str


PRICING = load_pricing("resend", _ResendPricing)
RECIPIENT_MICROS = parse_usd(PRICING.recipient_usd, field="pricing/resend.json recipient_usd")


@dataclass(frozen=True, slots=True)
class BatchDetails:
    """Recipients of each email of a batch, in order (to uncount the ones Resend refused)."""

    recipients: tuple[int, ...]


class Resend:
    name = "resend"
    idempotency_headers: tuple[str, ...] = ("idempotency-key",)
    # Resend answers a retry with the same Idempotency-Key without sending again.
    upstream_deduplicates = True

    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        return bearer_token(headers)

    def estimate(self, call: Call) -> Estimate:
        if call.method != "POST" or call.path not in ("emails", "emails/batch"):
            raise UnpricedCallError(self.name, call.method, call.path)
        if media_type(call.content_type) not in ("application/json", ""):
            raise unsupported_media_type(call.content_type)
        parsed = json_value(call.body)
        if call.path == "emails":
            if not isinstance(parsed, dict):
                raise InvalidRequestError("malformed_json", "the email must be a JSON object")
            return Estimate(
                recipient_count(parsed) * RECIPIENT_MICROS,
                "POST /emails",
                pricing_version=PRICING.version,
            )
        if not isinstance(parsed, list) or not parsed:
            raise InvalidRequestError("malformed_json", "a batch must be a non-empty JSON list")
        counts = tuple(
            recipient_count(email) if isinstance(email, dict) else _not_an_email(index)
            for index, email in enumerate(parsed)
        )
        return Estimate(
            sum(counts) * RECIPIENT_MICROS,
            "POST /emails/batch",
            pricing_version=PRICING.version,
            details=BatchDetails(counts),
        )

    def settle(self, status_code: int, body: bytes, estimate: Estimate) -> Settlement:
        fixed = settle_fixed(status_code, estimate)
        if fixed is not None:
            return fixed
        if 200 <= status_code < 300:
            actual = estimate.amount_micros
            if isinstance(estimate.details, BatchDetails):
                refused = refused_recipients(body, estimate.details)
                actual -= refused * RECIPIENT_MICROS
            return Settlement(Outcome.SPENT, actual)
        if 400 <= status_code < 500:
            # Resend validates before sending: a 4xx sent nothing.
            return Settlement(Outcome.FREE)
        return Settlement(Outcome.UNKNOWN)

    def stream_meter(self, status_code: int, estimate: Estimate) -> StreamMeter | None:
        return None

    def upstream_auth_headers(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    def error_object(self, code: str, message: str, status: int) -> dict[str, object]:
        return {"statusCode": status, "name": code, "message": message}

    def refusal_headers(self) -> dict[str, str]:
        return {}


def recipient_count(email: Mapping[str, object]) -> int:
    """Addresses in ``to``, ``cc`` and ``bcc``; refuses an email without any."""
    count = sum(_addresses(email.get(field), field) for field in _RECIPIENT_FIELDS)
    if count == 0:
        raise InvalidRequestError("missing_recipients", "an email has no recipient in to")
    return count


def refused_recipients(body: bytes, details: BatchDetails) -> int:
    """Recipients of the emails a permissive batch answer lists under ``errors``."""
    try:
        answer = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return 0
    errors = answer.get("errors") if isinstance(answer, dict) else None
    if not isinstance(errors, list):
        return 0
    indexes = {
        error["index"]
        for error in errors
        if isinstance(error, dict) and type(error.get("index")) is int
    }
    return sum(details.recipients[i] for i in indexes if 0 <= i < len(details.recipients))


def _addresses(value: object, field: str) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        # "a@x.com, b@y.com" is two addresses; counting a comma in a display name too
        # only over-reserves.
        return sum(1 for part in value.split(",") if part.strip())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return sum(_addresses(item, field) for item in value)
    raise InvalidRequestError(
        "invalid_recipients", f"{field} must be an address or a list of addresses"
    )


def _not_an_email(index: int) -> int:
    raise InvalidRequestError("malformed_json", f"batch item {index} is not a JSON object")
