"""Fixed costs (``SPENDGATE_FIXED_COSTS``) and the gateway's estimate step, pure unit tests."""

from __future__ import annotations

import json

import pytest

from spendgate_common.errors import ConfigurationError
from spendgate_common.settings import Env
from spendgate_gateway._settings import VENDOR_DEFAULT_BASE_URLS, GatewaySettings
from spendgate_gateway.vendors import (
    VENDORS,
    Call,
    Estimate,
    Outcome,
    Settlement,
    UnpricedCallError,
)
from spendgate_gateway.vendors._fixed import (
    FREE_CALL_HOLD_MICROS,
    FixedCost,
    FreeCall,
    parse_fixed_costs,
    settle_fixed,
)
from spendgate_gateway.vendors._pricer import Pricer

SID = "AC" + "ab" * 16
REAL_SID = "AC" + "12" * 16
TABLE = {
    "stripe": {
        "GET /v1/customers/*": "0.0001",
        "GET /v1/customers/cus_special": "5",  # never reached: the line above matches first
        "POST /v1/customers": "0.002",
        "DELETE /v1/customers/**": "0",
        "POST /v1/charges": "99",  # never used: Stripe's estimator prices charges
    },
    "twilio": {"GET /2010-04-01/Accounts/*/Messages/SM*.json": "0.000001"},
}


def table(value: object = TABLE) -> str:
    return json.dumps(value)


def get(path: str, method: str = "GET") -> Call:
    return Call(method, path, "", {"content-type": "application/x-www-form-urlencoded"}, b"")


def test_patterns_match_by_segment_in_the_order_written() -> None:
    costs = parse_fixed_costs(table(), VENDOR_DEFAULT_BASE_URLS)
    one = costs.estimate("stripe", get("v1/customers/cus_special"))
    assert one is not None
    assert one.amount_micros == 100
    assert one.operation == "GET /v1/customers/*"
    assert isinstance(one.details, FixedCost)
    assert costs.estimate("stripe", get("v1/customers")) is None  # "*" needs a segment
    assert costs.estimate("stripe", get("v1/customers/a/b")) is None  # ... and only one
    created = costs.estimate("stripe", get("v1/customers", "POST"))
    assert created is not None
    assert created.amount_micros == 2_000
    assert costs.estimate("stripe", get("v1/customers", "PUT")) is None
    assert costs.estimate("openai", get("v1/customers/x")) is None
    sms = costs.estimate("twilio", get(f"2010-04-01/Accounts/{SID}/Messages/SM123.json"))
    assert sms is not None
    assert sms.amount_micros == 1
    assert costs.estimate("twilio", get(f"2010-04-01/Accounts/{SID}/Messages/MM1.json")) is None


def test_a_fixed_cost_of_zero_is_a_free_call() -> None:
    costs = parse_fixed_costs(table(), VENDOR_DEFAULT_BASE_URLS)
    for path in ("v1/customers/cus_1", "v1/customers/cus_1/sources/src_2"):
        free = costs.estimate("stripe", get(path, "DELETE"))
        assert free is not None
        assert free.amount_micros == FREE_CALL_HOLD_MICROS
        assert isinstance(free.details, FreeCall)
        assert free.operation == "DELETE /v1/customers/**"


def test_the_version_names_the_table() -> None:
    costs = parse_fixed_costs(table(), VENDOR_DEFAULT_BASE_URLS)
    assert costs.version.startswith("fixed-")
    assert len(costs.version) == len("fixed-") + 16
    assert parse_fixed_costs(table(), VENDOR_DEFAULT_BASE_URLS).version == costs.version
    changed = {"stripe": {"GET /v1/customers/*": "0.0002"}}
    assert parse_fixed_costs(table(changed), VENDOR_DEFAULT_BASE_URLS).version != costs.version
    assert parse_fixed_costs(None, VENDOR_DEFAULT_BASE_URLS).version == ""
    assert parse_fixed_costs(table({}), VENDOR_DEFAULT_BASE_URLS).by_vendor == {}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        (table({"paypal": {"GET /x": "1"}}), "unknown vendor 'paypal'"),
        (table({"stripe": ["GET /x"]}), "must map"),
        (table({"stripe": {"FETCH /x": "1"}}), "must start with one of"),
        (table({"stripe": {"GET x": "1"}}), "must start with '/'"),
        (table({"stripe": {"GET /v1/../x": "1"}}), "not a plain path segment"),
        (table({"stripe": {"GET /v1//x": "1"}}), "not a plain path segment"),
        (table({"stripe": {"GET /v1/**/x": "1"}}), "may only be the last segment"),
        (table({"stripe": {"GET /v1/a**": "1"}}), "must be a whole segment"),
        (table({"stripe": {"GET /x": "0.0000001"}}), "more than six decimal places"),
        (table({"stripe": {"GET /x": "-1"}}), "must not be negative"),
        (table({"stripe": {"GET /x": True}}), "must be a number"),
        (table({"stripe": {f"GET /x{i}": "1" for i in range(257)}}), "at most 256"),
    ],
)
def test_malformed_tables_stop_the_start(text: str, problem: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        parse_fixed_costs(text, VENDOR_DEFAULT_BASE_URLS)
    assert raised.value.variable == "SPENDGATE_FIXED_COSTS"
    assert problem in raised.value.problem


def test_amounts_are_exact_decimals() -> None:
    costs = parse_fixed_costs('{"stripe": {"GET /a": 0.1, "GET /b": "1.000001"}}', ["stripe"])
    a, b = costs.estimate("stripe", get("a")), costs.estimate("stripe", get("b"))
    assert a is not None
    assert b is not None
    assert (a.amount_micros, b.amount_micros) == (100_000, 1_000_001)


def settled(status: int, estimate: Estimate) -> Settlement:
    settlement = settle_fixed(status, estimate)
    assert settlement is not None
    return settlement


def test_settle_fixed() -> None:
    costs = parse_fixed_costs(table(), VENDOR_DEFAULT_BASE_URLS)
    fixed = costs.estimate("stripe", get("v1/customers", "POST"))
    free = costs.estimate("stripe", get("v1/customers/c", "DELETE"))
    assert fixed is not None
    assert free is not None
    assert settled(201, fixed) == Settlement(Outcome.SPENT, 2_000)
    assert settled(404, fixed) == Settlement(Outcome.FREE)
    assert settled(502, fixed) == Settlement(Outcome.UNKNOWN)
    for status in (200, 404, 500):
        assert settled(status, free) == Settlement(Outcome.FREE)
    assert settle_fixed(200, Estimate(5, "POST /v1/charges")) is None
    # Every vendor of this issue defers to it.
    for name in ("stripe", "twilio", "resend"):
        assert VENDORS[name].settle(200, b"{}", fixed) == Settlement(Outcome.SPENT, 2_000)
        assert VENDORS[name].settle(200, b"{}", free).outcome is Outcome.FREE


def settings(**values: str) -> GatewaySettings:
    base = {"ADMIN_TOKEN": "a" * 16}
    return GatewaySettings.from_env(Env({f"SPENDGATE_{k}": v for k, v in (base | values).items()}))


def test_pricer_prefers_the_estimator_then_fixed_costs() -> None:
    pricer = Pricer(
        settings(
            FIXED_COSTS=table(),
            TWILIO_API_KEY="token",
            TWILIO_ACCOUNT_SID=REAL_SID,
            TWILIO_CALL_SECONDS_MAX="120",
        )
    )
    stripe, twilio = VENDORS["stripe"], VENDORS["twilio"]
    charge = Call("POST", "v1/charges", "", {}, b"amount=18&currency=usd")
    assert pricer.estimate(stripe, charge).amount_micros == 180_000
    assert pricer.estimate(stripe, get("v1/customers/c")).amount_micros == 100
    with pytest.raises(UnpricedCallError):
        pricer.estimate(stripe, get("v1/balance"))
    # Twilio's estimator and its fixed costs both get the configured account SID.
    fetched = pricer.estimate(twilio, get(f"2010-04-01/Accounts/{SID}/Messages/SM1.json"))
    assert fetched.upstream_path == f"2010-04-01/Accounts/{REAL_SID}/Messages/SM1.json"
    voice = Call("POST", f"2010-04-01/Accounts/{SID}/Calls.json", "", {}, b"To=%2B14155550100")
    placed = pricer.estimate(twilio, voice)
    assert placed.upstream_path == f"2010-04-01/Accounts/{REAL_SID}/Calls.json"
    assert placed.upstream_body == b"To=%2B14155550100&TimeLimit=120"


def test_gateway_settings_compose_twilio_and_parse_fixed_costs() -> None:
    configured = settings(TWILIO_API_KEY="token", TWILIO_ACCOUNT_SID=REAL_SID)
    assert configured.vendors["twilio"].api_key == f"{REAL_SID}:token"
    assert configured.vendors["twilio"].base_url == "https://api.twilio.com"
    assert configured.vendors["resend"].base_url == "https://api.resend.com"
    assert configured.fixed_costs.by_vendor == {}
    assert settings().vendors["twilio"].api_key is None
    with pytest.raises(ConfigurationError, match="SPENDGATE_TWILIO_ACCOUNT_SID"):
        settings(TWILIO_API_KEY="token")
    with pytest.raises(ConfigurationError, match="SPENDGATE_FIXED_COSTS"):
        settings(FIXED_COSTS="nope")
