"""Stripe: amounts in the smallest currency unit from form-encoded or JSON bodies.

Priced calls (walking skeleton): ``POST /v1/payment_intents`` and ``POST /v1/charges``
in USD. Other currencies (FX table) and other endpoints arrive with the vendors issue;
until then they are refused (``unsupported_currency`` / ``unpriced_call``), never
forwarded unpriced.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from collections.abc import Mapping
from decimal import Decimal

import msgspec

from spendgate_common.errors import InvalidRequestError
from spendgate_common.limits import AMOUNT_MICROS_MAX
from spendgate_common.money import MICROS_PER_CENT
from spendgate_gateway.vendors._base import (
    Call,
    Estimate,
    Outcome,
    Settlement,
    StreamMeter,
    UnpricedCallError,
)

# Most fields we parse from a form body (Stripe's own bodies are far smaller).
FORM_FIELDS_MAX = 1_000
_PRICED_OPERATIONS = frozenset({("POST", "v1/payment_intents"), ("POST", "v1/charges")})
_SUPPORTED_CURRENCIES = frozenset({"usd"})
_DIGITS = re.compile(r"^[0-9]{1,18}$")
_json_decoder = msgspec.json.Decoder(float_hook=Decimal)


class Stripe:
    name = "stripe"
    idempotency_headers: tuple[str, ...] = ("idempotency-key",)
    # Stripe replays the first answer to a retry with the same Idempotency-Key.
    upstream_deduplicates = True

    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        authorization = headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return value.strip() or None
        if scheme.lower() == "basic":
            # `curl -u sk_...:` sends the key as the Basic user name.
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("ascii")
            except (binascii.Error, UnicodeDecodeError):
                return None
            return decoded.partition(":")[0] or None
        return None

    def estimate(self, call: Call) -> Estimate:
        method, path = call.method, call.path
        if (method, path) not in _PRICED_OPERATIONS:
            raise UnpricedCallError(self.name, method, path)
        fields = _parse_body(call.content_type, call.body)
        amount = fields.get("amount")
        currency = fields.get("currency")
        if amount is None:
            raise InvalidRequestError("missing_amount", "the request has no amount")
        if not isinstance(currency, str) or not currency:
            raise InvalidRequestError("missing_currency", "the request has no currency")
        if currency.lower() not in _SUPPORTED_CURRENCIES:
            raise InvalidRequestError(
                "unsupported_currency", f"currency {currency!r} is not priced (supported: usd)"
            )
        cents = _whole_amount(amount)
        micros = cents * MICROS_PER_CENT
        if micros > AMOUNT_MICROS_MAX:
            raise InvalidRequestError("invalid_amount", "amount is above the maximum")
        return Estimate(micros, f"{method} /{path}")

    def settle(self, status_code: int, body: bytes, estimate: Estimate) -> Settlement:
        if 200 <= status_code < 300:
            return Settlement(Outcome.SPENT, estimate.amount_micros)
        if 400 <= status_code < 500:
            # Stripe refuses 4xx requests without charging (card declined, bad params).
            return Settlement(Outcome.FREE)
        return Settlement(Outcome.UNKNOWN)

    def stream_meter(self, status_code: int, estimate: Estimate) -> StreamMeter | None:
        return None

    def upstream_auth_headers(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    def error_object(self, code: str, message: str, status: int) -> dict[str, object]:
        error_type = "api_error" if status >= 500 else "invalid_request_error"
        return {"type": error_type, "code": code, "message": message}

    def refusal_headers(self) -> dict[str, str]:
        return {"stripe-should-retry": "false"}


def _parse_body(content_type: str, body: bytes) -> Mapping[str, object]:
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json":
        try:
            parsed = _json_decoder.decode(body)
        except msgspec.DecodeError as error:
            raise InvalidRequestError(
                "malformed_json", f"the JSON body is malformed: {error}"
            ) from None
        if not isinstance(parsed, dict):
            raise InvalidRequestError("malformed_json", "the JSON body must be an object")
        return parsed
    if media_type in ("application/x-www-form-urlencoded", ""):
        try:
            text = body.decode("utf-8")
            pairs = urllib.parse.parse_qsl(
                text,
                keep_blank_values=True,
                strict_parsing=bool(text),
                max_num_fields=FORM_FIELDS_MAX,
            )
        except (UnicodeDecodeError, ValueError) as error:
            raise InvalidRequestError(
                "malformed_form", f"the form body is malformed: {error}"
            ) from None
        fields: dict[str, object] = {}
        for name, value in pairs:
            if name in fields and name in ("amount", "currency"):
                raise InvalidRequestError("malformed_form", f"{name} is given more than once")
            fields[name] = value
        return fields
    raise InvalidRequestError(
        "unsupported_media_type", f"content type {media_type!r} is not supported", status=415
    )


def _whole_amount(amount: object) -> int:
    """Stripe amounts are whole numbers of the currency's smallest unit (cents for USD)."""
    if isinstance(amount, bool):
        raise InvalidRequestError("invalid_amount", "amount must be a whole number of cents")
    if isinstance(amount, int):
        cents = amount
    elif isinstance(amount, str) and _DIGITS.match(amount):
        cents = int(amount)
    else:
        raise InvalidRequestError(
            "invalid_amount", "amount must be a positive whole number of cents"
        )
    if cents <= 0:
        raise InvalidRequestError("invalid_amount", "amount must be greater than zero")
    return cents
