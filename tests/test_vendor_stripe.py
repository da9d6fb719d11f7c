"""Stripe through the gateway, end to end, with the official ``stripe`` package.

Real gateway, ledger and auditor processes, real NATS and Postgres, and the fake Stripe
(``spendgate fake-vendor stripe``, a real HTTP server). Expected costs are written out
from ``pricing/stripe.json``'s rates (EUR $1.25, JPY $0.0075, KWD $3.45), not computed
with the gateway's code.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
import stripe

from tests import harness
from tests.harness import ServiceFactory, Stack
from tests.test_e2e_stripe import fake_requests, issue_key, key_state, wait_settled

pytestmark = pytest.mark.e2e


def client(stack: Stack, key: dict[str, Any]) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key=key["key"],
        base_addresses={"api": f"{stack.gateway_url}/stripe"},
        max_network_retries=0,
    )


def test_foreign_and_zero_decimal_currencies_settle_at_their_usd_cost(
    spendgate_stack: Stack,
) -> None:
    stack = spendgate_stack
    key = issue_key(stack, cap_usd="50")
    sdk = client(stack, key)
    sdk.v1.charges.create(params={"amount": 1000, "currency": "eur", "source": "tok_visa"})
    sdk.v1.payment_intents.create(params={"amount": 500, "currency": "jpy"})
    sdk.v1.charges.create(params={"amount": 1000, "currency": "kwd", "source": "tok_visa"})
    # A JSON body prices the same as the SDK's form body.
    answer = httpx.post(
        f"{stack.gateway_url}/stripe/v1/charges",
        headers={"Authorization": f"Bearer {key['key']}"},
        json={"amount": 10000, "currency": "krw", "source": "tok_visa"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    state = wait_settled(stack, key["key_id"])
    # EUR 10.00 = $12.50, JPY 500 = $3.75, KWD 1.000 = $3.45, KRW 10,000 = $8.00.
    assert state["committed_micros"] == 12_500_000 + 3_750_000 + 3_450_000 + 8_000_000
    assert [r["fields"]["currency"] for r in fake_requests(stack)] == ["eur", "jpy", "kwd", "krw"]


def test_an_unknown_currency_is_refused_before_stripe(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    key = issue_key(stack)
    with pytest.raises(stripe.InvalidRequestError) as raised:
        client(stack, key).v1.charges.create(
            params={"amount": 100, "currency": "xau", "source": "tok_visa"}
        )
    assert raised.value.http_status == 400
    assert raised.value.code == "unsupported_currency"
    assert fake_requests(stack) == []
    assert key_state(stack, key["key_id"])["reserved_micros"] == 0


def test_a_payment_intent_is_counted_once_at_creation(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    key = issue_key(stack, cap_usd="25")
    sdk = client(stack, key)
    intent = sdk.v1.payment_intents.create(
        params={"amount": 2000, "currency": "usd", "capture_method": "manual"}
    )
    assert intent.status == "requires_payment_method"
    assert wait_settled(stack, key["key_id"])["committed_micros"] == 20_000_000
    confirmed = sdk.v1.payment_intents.confirm(intent.id, params={"payment_method": "pm_visa"})
    assert confirmed.status == "requires_capture"
    captured = sdk.v1.payment_intents.capture(intent.id, params={"amount_to_capture": 1500})
    assert captured.status == "succeeded"
    # Confirm and capture were free calls: a one-micro hold each, released.
    state = wait_settled(stack, key["key_id"])
    assert state["committed_micros"] == 20_000_000
    assert state["reserved_micros"] == 0
    paths = [r["path"] for r in fake_requests(stack)]
    assert paths == [
        "/v1/payment_intents",
        f"/v1/payment_intents/{intent.id}/confirm",
        f"/v1/payment_intents/{intent.id}/capture",
    ]


def test_refunds_are_free_but_need_a_valid_key(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    key = issue_key(stack, cap_usd="10")
    sdk = client(stack, key)
    charge = sdk.v1.charges.create(params={"amount": 500, "currency": "usd", "source": "tok"})
    refund = sdk.v1.refunds.create(params={"charge": charge.id, "amount": 200})
    assert (refund.amount, refund.status) == (200, "succeeded")
    # A refund Stripe refuses (more than is left) is free too.
    with pytest.raises(stripe.InvalidRequestError):
        sdk.v1.refunds.create(params={"charge": charge.id, "amount": 400})
    state = wait_settled(stack, key["key_id"])
    assert (state["committed_micros"], state["reserved_micros"]) == (5_000_000, 0)
    # A revoked key refunds nothing: the ledger refuses it and Stripe never sees it.
    revoked = httpx.post(
        f"{stack.gateway_url}/v1/keys/{key['key_id']}/revoke",
        headers={"Authorization": f"Bearer {stack.admin_token}"},
        json={},
        timeout=10,
    )
    assert revoked.status_code == 200, revoked.text
    with pytest.raises(stripe.AuthenticationError):
        sdk.v1.refunds.create(params={"charge": charge.id})
    assert len(fake_requests(stack)) == 3


def test_a_key_with_nothing_left_cannot_refund(spendgate_stack: Stack) -> None:
    """The documented price of checking free calls with the ledger (docs/vendors.md)."""
    stack = spendgate_stack
    key = issue_key(stack, cap_usd="1")
    sdk = client(stack, key)
    charge = sdk.v1.charges.create(params={"amount": 100, "currency": "usd", "source": "tok"})
    wait_settled(stack, key["key_id"])
    with pytest.raises(stripe.RateLimitError) as raised:
        sdk.v1.refunds.create(params={"charge": charge.id})
    assert "requested $0.000001" in str(raised.value.user_message)
    assert len(fake_requests(stack)) == 1


def test_transfers_and_payouts_are_priced_and_denials_never_reach_stripe(
    spendgate_stack: Stack,
) -> None:
    stack = spendgate_stack
    key = issue_key(stack, cap_usd="20")
    sdk = client(stack, key)
    sdk.v1.transfers.create(params={"amount": 1000, "currency": "eur", "destination": "acct_1"})
    sdk.v1.payouts.create(params={"amount": 300, "currency": "usd"})
    assert wait_settled(stack, key["key_id"])["committed_micros"] == 12_500_000 + 3_000_000
    # $4.50 left: a GBP 5.00 payout ($7.25) is refused at the gateway.
    with pytest.raises(stripe.RateLimitError) as raised:
        sdk.v1.payouts.create(params={"amount": 500, "currency": "gbp"})
    body = raised.value.json_body
    assert isinstance(body, dict)
    assert body["requested_usd"] == "7.25"
    assert [r["path"] for r in fake_requests(stack)] == ["/v1/transfers", "/v1/payouts"]


def test_a_failing_stripe_keeps_the_hold(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    key = issue_key(stack, cap_usd="10")
    httpx.post(f"{stack.fake_stripe_url}/_fake/fail-next", json={"status": 500}, timeout=10)
    with pytest.raises(stripe.APIError):
        client(stack, key).v1.charges.create(
            params={"amount": 250, "currency": "usd", "source": "tok_visa"}
        )
    time.sleep(0.5)
    # The charge may have happened: $2.50 stays held until it expires (then counts).
    state = key_state(stack, key["key_id"])
    assert (state["committed_micros"], state["reserved_micros"]) == (0, 2_500_000)


def test_unpriced_calls_are_refused_without_a_fixed_cost(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    key = issue_key(stack)
    sdk = client(stack, key)
    with pytest.raises(stripe.PermissionError) as raised:
        sdk.v1.charges.retrieve("ch_anything")
    assert "no cost estimate for GET /v1/charges/ch_anything" in str(raised.value.user_message)
    with pytest.raises(stripe.PermissionError):
        sdk.v1.payment_intents.increment_authorization("pi_1", params={"amount": 5000})
    assert fake_requests(stack) == []


def test_a_fixed_cost_prices_an_otherwise_unpriced_call(
    service_factory: ServiceFactory, nats_url: str, database_url: str
) -> None:
    fixed_costs = {"stripe": {"GET /v1/charges/*": "0.0015", "GET /v1/refunds/*": "0"}}
    stack = harness.build_stack(
        service_factory,
        nats_url=nats_url,
        database_url=database_url,
        extra_env={"SPENDGATE_FIXED_COSTS": json.dumps(fixed_costs)},
    )
    key = issue_key(stack, cap_usd="5")
    sdk = client(stack, key)
    charge = sdk.v1.charges.create(params={"amount": 100, "currency": "usd", "source": "tok"})
    assert sdk.v1.charges.retrieve(charge.id).amount == 100
    refund = sdk.v1.refunds.create(params={"charge": charge.id})
    assert sdk.v1.refunds.retrieve(refund.id).status == "succeeded"  # fixed cost "0": free
    with pytest.raises(stripe.InvalidRequestError):  # priced, Stripe's 404: released
        sdk.v1.charges.retrieve("ch_missing")
    state = wait_settled(stack, key["key_id"])
    assert state["committed_micros"] == 1_000_000 + 1_500
    assert len(fake_requests(stack)) == 5
    with pytest.raises(stripe.PermissionError):  # still no price: still refused
        sdk.v1.payment_intents.retrieve("pi_1")
    assert len(fake_requests(stack)) == 5
