"""Stripe: money movements priced from the body's amount, converted to USD by a versioned table.

Priced operations (form-encoded, as Stripe's SDKs send them, or JSON):

* ``POST /v1/charges``, ``/v1/payment_intents``, ``/v1/transfers``, ``/v1/payouts``:
  ``amount`` in the currency's smallest unit and ``currency``, converted with
  ``pricing/stripe.json`` (USD per unit, conservative, and the currency's decimals);
* ``POST /v1/payment_intents/{id}`` (update): a new ``amount`` is priced in full (the
  gateway keeps no state, so it cannot subtract the amount counted at creation); an
  update without ``amount`` and ``currency`` moves no money and is a free call;
* free calls (see ``_fixed.py``: one micro-USD held and always released): confirming,
  capturing and cancelling a payment intent, capturing a charge, and refunds
  (``/v1/refunds``, ``/v1/charges/{id}/refunds``).

A payment intent is counted when it is created, confirmed or not. Its confirmation often
happens in the browser with the publishable key, which never passes the gateway, and a
confirm or capture call carries no amount that a stateless gateway could read; so the
creation is the one moment both visible and priceable. An intent that is never confirmed
stays counted (conservative). Other endpoints are ``unpriced_call`` unless a fixed cost
is configured. An unknown currency is ``400 unsupported_currency``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import msgspec

from spendgate_common.errors import InvalidRequestError
from spendgate_common.limits import AMOUNT_MICROS_MAX
from spendgate_common.money import MICROS_PER_USD
from spendgate_gateway._auth import basic_credentials, bearer_token
from spendgate_gateway.pricing import load_pricing
from spendgate_gateway.vendors._base import (
    Call,
    Estimate,
    Outcome,
    Settlement,
    StreamMeter,
    UnpricedCallError,
)
from spendgate_gateway.vendors._bodies import (
    form_pairs,
    json_value,
    media_type,
    unsupported_media_type,
)
from spendgate_gateway.vendors._fixed import free_call_estimate, settle_fixed

_DIGITS = re.compile(r"^[0-9]{1,18}$")
_CURRENCY_CODE = re.compile(r"^[a-z]{3}$")
_CURRENCY_DECIMALS = frozenset({0, 2, 3})


class _Currency(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # USD per major unit (one euro, one yen), a decimal string, rounded up.
    usd_per_unit: str
    # Digits of the amount in Stripe's API: USD 2 (cents), JPY 0, KWD 3.
    decimals: int


class _StripePricing(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: str
    basis: str
    currencies: dict[str, _Currency]


def _micros_per_minor_unit(pricing: _StripePricing) -> dict[str, Fraction]:
    """USD micros per smallest unit of each currency, exact (checked once, at import)."""
    rates: dict[str, Fraction] = {}
    for code, currency in pricing.currencies.items():
        if not _CURRENCY_CODE.match(code) or currency.decimals not in _CURRENCY_DECIMALS:
            raise ValueError(f"pricing/stripe.json: bad currency entry {code!r}")
        try:
            usd_per_unit = Decimal(currency.usd_per_unit)
        except InvalidOperation:
            raise ValueError(f"pricing/stripe.json: {code}: rate is not a decimal") from None
        if not usd_per_unit.is_finite() or usd_per_unit <= 0:
            raise ValueError(f"pricing/stripe.json: {code}: rate must be positive")
        rates[code] = Fraction(usd_per_unit) * MICROS_PER_USD / 10**currency.decimals
    return rates


PRICING = load_pricing("stripe", _StripePricing)
_RATES = _micros_per_minor_unit(PRICING)


def usd_micros(amount: int, currency: str) -> int:
    """``amount`` smallest units of ``currency`` in micro-USD, rounded up.

    Raises ``400 unsupported_currency`` for a currency not in the table.
    """
    rate = _RATES.get(currency.lower())
    if rate is None:
        raise InvalidRequestError(
            "unsupported_currency",
            f"currency {currency!r} is not priced (pricing {PRICING.version} has "
            f"{len(_RATES)} currencies; see docs/vendors.md)",
        )
    exact = amount * rate
    return -(-exact.numerator // exact.denominator)


class _Kind(enum.Enum):
    AMOUNT = "amount"  # priced from amount + currency
    UPDATE = "update"  # priced when it sets an amount, free otherwise
    FREE = "free"  # moves no money the gateway has not counted already


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    # Path segments; "{id}" matches any one segment.
    segments: tuple[str, ...]
    kind: _Kind
    # Why a free route is free (recorded in its estimate's details).
    reason: str = ""

    @property
    def operation(self) -> str:
        return f"{self.method} /" + "/".join(self.segments)

    def matches(self, method: str, segments: list[str]) -> bool:
        return (
            method == self.method
            and len(segments) == len(self.segments)
            and all(
                want in ("{id}", got) for want, got in zip(self.segments, segments, strict=True)
            )
        )


def _route(path: str, kind: _Kind, reason: str = "") -> _Route:
    return _Route("POST", tuple(path.split("/")), kind, reason)


_COUNTED_AT_CREATION = "counted when the payment intent or charge was created"
ROUTES = (
    _route("v1/charges", _Kind.AMOUNT),
    _route("v1/payment_intents", _Kind.AMOUNT),
    _route("v1/transfers", _Kind.AMOUNT),
    _route("v1/payouts", _Kind.AMOUNT),
    _route("v1/payment_intents/{id}", _Kind.UPDATE),
    _route("v1/payment_intents/{id}/confirm", _Kind.FREE, _COUNTED_AT_CREATION),
    _route("v1/payment_intents/{id}/capture", _Kind.FREE, _COUNTED_AT_CREATION),
    _route("v1/payment_intents/{id}/cancel", _Kind.FREE, "a cancellation moves no money"),
    _route("v1/charges/{id}/capture", _Kind.FREE, _COUNTED_AT_CREATION),
    _route("v1/refunds", _Kind.FREE, "a refund returns money"),
    _route("v1/charges/{id}/refunds", _Kind.FREE, "a refund returns money"),
)


class Stripe:
    name = "stripe"
    idempotency_headers: tuple[str, ...] = ("idempotency-key",)
    # Stripe replays the first answer to a retry with the same Idempotency-Key.
    upstream_deduplicates = True

    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        token = bearer_token(headers)
        if token is not None:
            return token
        # `curl -u sk_...:` sends the key as the Basic user name.
        credentials = basic_credentials(headers)
        if credentials is None:
            return None
        return credentials[0] or None

    def estimate(self, call: Call) -> Estimate:
        segments = call.path.split("/")
        route = next((r for r in ROUTES if r.matches(call.method, segments)), None)
        if route is None:
            raise UnpricedCallError(self.name, call.method, call.path)
        if route.kind is _Kind.FREE:
            return free_call_estimate(route.operation, PRICING.version, route.reason)
        fields = _parse_body(call.content_type, call.body)
        if route.kind is _Kind.UPDATE and "amount" not in fields:
            if "currency" in fields:
                raise InvalidRequestError(
                    "missing_amount", "an update that changes the currency must give the amount"
                )
            return free_call_estimate(route.operation, PRICING.version, "no amount is changed")
        amount = fields.get("amount")
        currency = fields.get("currency")
        if amount is None:
            raise InvalidRequestError("missing_amount", "the request has no amount")
        if not isinstance(currency, str) or not currency:
            raise InvalidRequestError("missing_currency", "the request has no currency")
        micros = usd_micros(_whole_amount(amount), currency)
        if micros > AMOUNT_MICROS_MAX:
            raise InvalidRequestError("invalid_amount", "amount is above the maximum")
        return Estimate(micros, route.operation, pricing_version=PRICING.version)

    def settle(self, status_code: int, body: bytes, estimate: Estimate) -> Settlement:
        fixed = settle_fixed(status_code, estimate)
        if fixed is not None:
            return fixed
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
    kind = media_type(content_type)
    if kind == "application/json":
        parsed = json_value(body)
        if not isinstance(parsed, dict):
            raise InvalidRequestError("malformed_json", "the JSON body must be an object")
        return parsed
    if kind in ("application/x-www-form-urlencoded", ""):
        fields: dict[str, object] = {}
        for name, value in form_pairs(body):
            if name in fields and name in ("amount", "currency"):
                raise InvalidRequestError("malformed_form", f"{name} is given more than once")
            fields[name] = value
        return fields
    raise unsupported_media_type(content_type)


def _whole_amount(amount: object) -> int:
    """Stripe amounts are whole numbers of the currency's smallest unit (cents for USD)."""
    if isinstance(amount, bool):
        raise InvalidRequestError("invalid_amount", "amount must be a whole number of cents")
    if isinstance(amount, int):
        units = amount
    elif isinstance(amount, str) and _DIGITS.match(amount):
        units = int(amount)
    else:
        raise InvalidRequestError(
            "invalid_amount", "amount must be a positive whole number of the smallest unit"
        )
    if units <= 0:
        raise InvalidRequestError("invalid_amount", "amount must be greater than zero")
    return units
