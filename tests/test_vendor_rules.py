"""Pure unit tests of the Stripe, Twilio and Resend estimators and settle rules (no I/O).

Expected amounts are written out from the price files' numbers (e.g. EUR at $1.25), not
computed with the vendors' own code.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate_common.errors import ConfigurationError, InvalidRequestError
from spendgate_common.settings import Env
from spendgate_gateway.vendors import Call, Estimate, Outcome, UnpricedCallError
from spendgate_gateway.vendors import stripe as stripe_vendor
from spendgate_gateway.vendors._fixed import FREE_CALL_HOLD_MICROS, FreeCall
from spendgate_gateway.vendors.resend import BatchDetails, Resend
from spendgate_gateway.vendors.stripe import Stripe, usd_micros
from spendgate_gateway.vendors.twilio import Twilio, TwilioSettings

FORM = {"content-type": "application/x-www-form-urlencoded"}
JSON = {"content-type": "application/json"}
SID = "AC" + "ab" * 16
REAL_SID = "AC" + "12" * 16


def call(path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Call:
    method, _, rest = path.partition(" ")
    return Call(method, rest.lstrip("/"), "", headers if headers is not None else FORM, body)


def json_call(path: str, body: object) -> Call:
    return call(path, json.dumps(body).encode(), JSON)


@contextlib.contextmanager
def refused(code: str) -> Iterator[None]:
    with pytest.raises(InvalidRequestError) as raised:
        yield
    assert raised.value.code == code, raised.value.message


# -------------------------------------------------------------------------------- Stripe

stripe = Stripe()


@pytest.mark.parametrize(
    ("body", "micros"),
    [
        (b"amount=18&currency=usd", 180_000),
        (b"amount=1000&currency=eur", 12_500_000),  # EUR 10.00 at $1.25
        (b"amount=1000&currency=EUR", 12_500_000),  # codes are case-insensitive
        (b"amount=500&currency=jpy", 3_750_000),  # zero-decimal: JPY 500 at $0.0075
        (b"amount=10000&currency=krw", 8_000_000),  # zero-decimal: KRW 10,000 at $0.0008
        (b"amount=1000&currency=kwd", 3_450_000),  # three-decimal: KWD 1.000 at $3.45
        (b"amount=2500&currency=bhd", 7_000_000),  # three-decimal: BHD 2.500 at $2.80
        (b"amount=100000&currency=isk", 9_000_000),  # ISK is two-decimal in the API
    ],
)
def test_stripe_charges_in_any_priced_currency(body: bytes, micros: int) -> None:
    estimate = stripe.estimate(call("POST /v1/charges", body))
    assert estimate.amount_micros == micros
    assert estimate.operation == "POST /v1/charges"
    assert estimate.pricing_version == stripe_vendor.PRICING.version


def test_stripe_json_and_form_bodies_price_the_same() -> None:
    form = stripe.estimate(call("POST /v1/payment_intents", b"amount=250&currency=gbp"))
    body = {"amount": 250, "currency": "gbp", "metadata": {"run": "42"}}
    as_json = stripe.estimate(json_call("POST /v1/payment_intents", body))
    assert form.amount_micros == as_json.amount_micros == 3_625_000  # GBP 2.50 at $1.45


@pytest.mark.parametrize("path", ["v1/charges", "v1/payment_intents", "v1/transfers", "v1/payouts"])
def test_stripe_money_movements_are_priced(path: str) -> None:
    estimate = stripe.estimate(call(f"POST /{path}", b"amount=100&currency=usd&destination=acct"))
    assert estimate.amount_micros == 1_000_000
    assert estimate.operation == f"POST /{path}"
    assert stripe.settle(200, b"{}", estimate).actual_micros == 1_000_000


@pytest.mark.parametrize(
    "path",
    [
        "v1/payment_intents/pi_123/confirm",
        "v1/payment_intents/pi_123/capture",
        "v1/payment_intents/pi_123/cancel",
        "v1/charges/ch_123/capture",
        "v1/refunds",
        "v1/charges/ch_123/refunds",
    ],
)
def test_stripe_free_calls_hold_one_micro_and_always_release(path: str) -> None:
    estimate = stripe.estimate(call(f"POST /{path}", b"amount_to_capture=5000&amount=70"))
    assert estimate.amount_micros == FREE_CALL_HOLD_MICROS
    assert isinstance(estimate.details, FreeCall)
    assert "{id}" in estimate.operation or estimate.operation == "POST /v1/refunds"
    for status in (200, 402, 500, 503):
        assert stripe.settle(status, b"", estimate).outcome is Outcome.FREE


def test_stripe_payment_intent_update_is_priced_only_when_it_sets_an_amount() -> None:
    metadata_only = stripe.estimate(call("POST /v1/payment_intents/pi_1", b"metadata[a]=b"))
    assert isinstance(metadata_only.details, FreeCall)
    new_amount = stripe.estimate(call("POST /v1/payment_intents/pi_1", b"amount=300&currency=usd"))
    assert new_amount.amount_micros == 3_000_000
    assert new_amount.operation == "POST /v1/payment_intents/{id}"
    with refused("missing_amount"):
        stripe.estimate(call("POST /v1/payment_intents/pi_1", b"currency=eur"))
    with refused("missing_currency"):
        stripe.estimate(call("POST /v1/payment_intents/pi_1", b"amount=300"))


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("POST /v1/charges", b"amount=18&currency=xyz", "unsupported_currency"),
        ("POST /v1/charges", b"amount=18", "missing_currency"),
        ("POST /v1/transfers", b"currency=usd", "missing_amount"),
        ("POST /v1/payouts", b"amount=0&currency=usd", "invalid_amount"),
        ("POST /v1/charges", b"amount=1.5&currency=usd", "invalid_amount"),
        ("POST /v1/charges", b"amount=999999999999999999&currency=usd", "invalid_amount"),
        ("POST /v1/charges", b"amount=1&amount=2&currency=usd", "malformed_form"),
    ],
)
def test_stripe_refusals(path: str, body: bytes, code: str) -> None:
    with refused(code):
        stripe.estimate(call(path, body))


def test_stripe_unpriced_calls_and_media_types() -> None:
    for path in ("GET /v1/charges/ch_1", "POST /v1/customers", "POST /v1/payment_intents/a/b/c"):
        with pytest.raises(UnpricedCallError):
            stripe.estimate(call(path, b"email=a@b.c"))
    with refused("unsupported_media_type"):
        stripe.estimate(call("POST /v1/charges", b"<x/>", {"content-type": "text/xml"}))


def test_stripe_settle_rule() -> None:
    estimate = Estimate(180_000, "POST /v1/charges")
    assert stripe.settle(200, b"{}", estimate).outcome is Outcome.SPENT
    assert stripe.settle(200, b"{}", estimate).actual_micros == 180_000
    assert stripe.settle(402, b"{}", estimate).outcome is Outcome.FREE  # declined
    assert stripe.settle(429, b"{}", estimate).outcome is Outcome.FREE  # Stripe's rate limit
    assert stripe.settle(500, b"{}", estimate).outcome is Outcome.UNKNOWN
    assert stripe.settle(504, b"", estimate).outcome is Outcome.UNKNOWN


currencies = st.sampled_from(sorted(stripe_vendor.PRICING.currencies))


@given(st.integers(min_value=1, max_value=10**15), currencies)
def test_stripe_conversion_rounds_up_to_the_next_micro(amount: int, currency: str) -> None:
    entry = stripe_vendor.PRICING.currencies[currency]
    exact = Fraction(amount) * Fraction(Decimal(entry.usd_per_unit)) * 10**6 / 10**entry.decimals
    micros = usd_micros(amount, currency)
    assert exact <= micros < exact + 1


def test_stripe_price_table_is_conservative_and_complete() -> None:
    table = stripe_vendor.PRICING.currencies
    zero_decimal = {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf"}
    zero_decimal |= {"ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
    assert {code for code, entry in table.items() if entry.decimals == 0} == zero_decimal
    assert {code for code, entry in table.items() if entry.decimals == 3} == {
        "bhd",
        "jod",
        "kwd",
        "omr",
        "tnd",
    }
    # A few rates checked against the market (late 2026 ballpark): never below it.
    assert Decimal(table["eur"].usd_per_unit) >= Decimal("1.15")
    assert Decimal(table["jpy"].usd_per_unit) >= Decimal("0.0066")
    assert Decimal(table["kwd"].usd_per_unit) >= Decimal("3.25")
    assert table["usd"].usd_per_unit == "1"


# -------------------------------------------------------------------------------- Twilio

twilio = Twilio(TwilioSettings(account_sid=REAL_SID, call_seconds_max=600))
MESSAGES = f"POST /2010-04-01/Accounts/{SID}/Messages.json"
CALLS = f"POST /2010-04-01/Accounts/{SID}/Calls.json"


def sms(to: str, body: str = "hi", **more: str) -> Estimate:
    fields = [("To", to), ("From", "+15005550006"), ("Body", body), *more.items()]
    return twilio.estimate(call(MESSAGES, urlencode(fields).encode()))


@pytest.mark.parametrize(
    ("to", "body", "micros"),
    [
        ("+14155550100", "hello", 15_000),  # US: 1 segment at $0.0150
        ("+447700900123", "a" * 161, 120_000),  # UK: 2 segments at $0.0600
        ("+447700900123", "ж" * 71, 120_000),  # UCS-2: 2 segments
        ("+18765550100", "hi", 150_000),  # Jamaica: +1876 beats +1
        ("+4915112345678", "hi", 110_000),  # Germany
        ("+99912345678", "hi", 350_000),  # unknown prefix: the default row
        ("whatsapp:+14155550100", "hi", 350_000),  # channel address: the default row
        ("+8816123456", "hi", 1_000_000),  # satellite
    ],
)
def test_twilio_sms_per_segment_by_destination(to: str, body: str, micros: int) -> None:
    estimate = sms(to, body)
    assert estimate.amount_micros == micros
    assert estimate.operation == "POST /2010-04-01/Accounts/{sid}/Messages.json"
    assert estimate.upstream_path == f"2010-04-01/Accounts/{REAL_SID}/Messages.json"


def test_twilio_mms() -> None:
    # US has MMS: one price per message, whatever the body's length.
    assert sms("+14155550100", "x" * 500, MediaUrl="https://e.com/a.png").amount_micros == 40_000
    assert sms("+14155550100", "hi", SendAsMms="true").amount_micros == 40_000
    # UK converts MMS to an SMS with a link: "hi\n" + 60 characters is one segment,
    # 130 characters of body plus the link are two.
    assert sms("+447700900123", "hi", MediaUrl="https://e.com/a.png").amount_micros == 60_000
    assert sms("+447700900123", "a" * 130, MediaUrl="https://e.com/a").amount_micros == 120_000


def test_twilio_message_refusals() -> None:
    with pytest.raises(UnpricedCallError):  # a template's text is not in the request
        twilio.estimate(call(MESSAGES, b"To=%2B14155550100&ContentSid=HX123"))
    with refused("missing_to"):
        twilio.estimate(call(MESSAGES, b"Body=hi"))
    with refused("malformed_form"):
        twilio.estimate(call(MESSAGES, b"To=%2B1415&To=%2B1416&Body=hi"))
    with refused("unsupported_media_type"):
        twilio.estimate(call(MESSAGES, b'{"To": "+1"}', JSON))
    for path in (f"GET /2010-04-01/Accounts/{SID}/Messages.json", "POST /2010-04-01/Other.json"):
        with pytest.raises(UnpricedCallError):
            twilio.estimate(call(path, b"To=%2B14155550100&Body=hi"))


def voice(body: bytes) -> Estimate:
    return twilio.estimate(call(CALLS, b"To=%2B14155550100&From=%2B15005550006&" + body))


def test_twilio_calls_per_minute_of_the_time_limit() -> None:
    assert voice(b"TimeLimit=120").amount_micros == 2 * 20_000
    assert voice(b"TimeLimit=61").amount_micros == 2 * 20_000  # minutes round up
    assert voice(b"TimeLimit=120").upstream_body is None
    with_extras = voice(b"TimeLimit=60&Record=true&MachineDetection=Enable")
    assert with_extras.amount_micros == 20_000 + 2_500 + 7_500
    assert with_extras.upstream_path == f"2010-04-01/Accounts/{REAL_SID}/Calls.json"


def test_twilio_call_without_time_limit_gets_the_configured_maximum() -> None:
    estimate = voice(b"Url=https%3A%2F%2Fe.com%2Ft")
    assert estimate.amount_micros == 10 * 20_000  # 600 s
    assert estimate.upstream_body is not None
    assert estimate.upstream_body.endswith(b"&TimeLimit=600")
    assert b"Url=https%3A%2F%2Fe.com%2Ft" in estimate.upstream_body
    with refused("time_limit_too_long"):
        voice(b"TimeLimit=601")
    for bad in (b"TimeLimit=abc", b"TimeLimit=0", b"TimeLimit=14401"):
        with refused("invalid_time_limit"):
            voice(bad)


def test_twilio_settle_rule() -> None:
    message = sms("+447700900123", "a" * 161)  # 2 segments, $0.12
    priced = b'{"price": "-0.0550", "price_unit": "USD", "num_segments": "2"}'
    assert twilio.settle(201, priced, message).actual_micros == 55_000
    segments = b'{"price": null, "price_unit": "USD", "num_segments": "3"}'
    assert twilio.settle(201, segments, message).actual_micros == 180_000
    assert twilio.settle(201, b"not json", message).actual_micros == 120_000
    other_unit = b'{"price": "-0.05", "price_unit": "EUR", "num_segments": null}'
    assert twilio.settle(201, other_unit, message).actual_micros == 120_000
    absurd = b'{"price": "-1e999999", "price_unit": "USD"}'
    assert twilio.settle(201, absurd, message).actual_micros == 120_000
    mms = sms("+14155550100", "hi", MediaUrl="https://e.com/a.png")
    assert twilio.settle(201, b'{"price": null, "num_segments": "1"}', mms).actual_micros == 40_000
    call_estimate = voice(b"TimeLimit=120")
    assert twilio.settle(201, b'{"price": null}', call_estimate).actual_micros == 40_000
    assert twilio.settle(400, b"{}", message).outcome is Outcome.FREE
    assert twilio.settle(429, b"{}", message).outcome is Outcome.FREE
    assert twilio.settle(500, b"{}", message).outcome is Outcome.UNKNOWN


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_twilio_credentials() -> None:
    assert twilio.presented_key(basic(SID, "sgk_t_k_s")) == "sgk_t_k_s"
    assert twilio.presented_key(basic("sgk_t_k_s", "")) == "sgk_t_k_s"
    assert twilio.presented_key({"authorization": "Bearer sgk_t_k_s"}) is None
    assert twilio.presented_key({"authorization": "Basic !!!"}) is None
    headers = twilio.upstream_auth_headers(f"{REAL_SID}:token")
    assert headers == basic(REAL_SID, "token")
    # Without a configured SID the path is forwarded unchanged.
    assert Twilio().upstream_path(f"2010-04-01/Accounts/{SID}/Messages.json") is None
    error = twilio.error_object("cap_exhausted", "no", 429)
    assert set(error) == {"code", "message", "more_info", "status"}


def env(**values: str) -> Env:
    return Env({f"SPENDGATE_{name}": value for name, value in values.items()})


def test_twilio_settings() -> None:
    assert TwilioSettings.from_env(env(), None) == TwilioSettings()
    settings = TwilioSettings.from_env(
        env(TWILIO_ACCOUNT_SID=REAL_SID, TWILIO_CALL_SECONDS_MAX="3600"), "token"
    )
    assert settings == TwilioSettings(account_sid=REAL_SID, call_seconds_max=3_600)
    with pytest.raises(ConfigurationError, match="SPENDGATE_TWILIO_ACCOUNT_SID"):
        TwilioSettings.from_env(env(), "token")
    with pytest.raises(ConfigurationError, match="SPENDGATE_TWILIO_ACCOUNT_SID"):
        TwilioSettings.from_env(env(TWILIO_ACCOUNT_SID="SK123"), "token")
    with pytest.raises(ConfigurationError, match="SPENDGATE_TWILIO_CALL_SECONDS_MAX"):
        TwilioSettings.from_env(env(TWILIO_CALL_SECONDS_MAX="20000"), None)


# -------------------------------------------------------------------------------- Resend

resend = Resend()


@pytest.mark.parametrize(
    ("email", "recipients"),
    [
        ({"to": "a@x.com"}, 1),
        ({"to": ["a@x.com", "b@x.com", "c@x.com"], "cc": "d@x.com", "bcc": ["e@x", "f@x"]}, 6),
        ({"to": "a@x.com, b@y.com"}, 2),
        ({"to": "Doe, John <j@x.com>"}, 2),  # over-counted, never under
        ({"to": ["a@x.com"], "cc": [], "bcc": None}, 1),
    ],
)
def test_resend_email_per_recipient(email: dict[str, object], recipients: int) -> None:
    estimate = resend.estimate(json_call("POST /emails", {"from": "me@x.com", **email}))
    assert estimate.amount_micros == recipients * 900  # $0.0009 per recipient
    assert estimate.operation == "POST /emails"


def test_resend_batch_and_permissive_settle() -> None:
    batch = [{"to": "a@x.com"}, {"to": ["b@x.com", "c@x.com"]}, {"to": "d@x.com", "cc": "e@x"}]
    estimate = resend.estimate(json_call("POST /emails/batch", batch))
    assert estimate.amount_micros == 5 * 900
    assert estimate.details == BatchDetails((1, 2, 2))
    assert resend.settle(200, b'{"data": []}', estimate).actual_micros == 5 * 900
    refused_second = b'{"data": [{"id": "1"}, {"id": "3"}], "errors": [{"index": 1}]}'
    assert resend.settle(200, refused_second, estimate).actual_micros == 3 * 900
    nonsense = b'{"data": [], "errors": [{"index": 7}, {"index": "0"}, 3]}'
    assert resend.settle(200, nonsense, estimate).actual_micros == 5 * 900


def test_resend_refusals_and_settle_rule() -> None:
    with refused("missing_recipients"):
        resend.estimate(json_call("POST /emails", {"from": "me@x.com", "cc": []}))
    with refused("invalid_recipients"):
        resend.estimate(json_call("POST /emails", {"to": 42}))
    with refused("malformed_json"):
        resend.estimate(json_call("POST /emails/batch", []))
    with refused("malformed_json"):
        resend.estimate(json_call("POST /emails/batch", [{"to": "a@x"}, "b@x"]))
    with refused("malformed_json"):
        resend.estimate(call("POST /emails", b"{", JSON))
    with pytest.raises(UnpricedCallError):
        resend.estimate(call("GET /emails/abc"))
    estimate = resend.estimate(json_call("POST /emails", {"to": "a@x.com"}))
    assert resend.settle(200, b'{"id": "x"}', estimate).actual_micros == 900
    assert resend.settle(422, b"{}", estimate).outcome is Outcome.FREE
    assert resend.settle(500, b"{}", estimate).outcome is Outcome.UNKNOWN
    assert resend.presented_key({"authorization": "Bearer sgk_a_b_c"}) == "sgk_a_b_c"
    assert resend.error_object("cap_exhausted", "m", 429)["statusCode"] == 429
