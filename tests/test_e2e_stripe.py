"""End to end: real gateway, ledger and auditor processes, real NATS and Postgres, fake Stripe.

The walking skeleton's promise: with a $1.00 cap, 100 concurrent $0.18 charges let exactly
5 reach Stripe, commit $0.90, answer the other 95 with 429 ``cap_exhausted``, and the
audit chain verifies. The official ``stripe`` package sees a Stripe error, not a crash.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
import stripe

pytestmark = pytest.mark.e2e

CHARGE_CENTS = 18
CONCURRENT_CHARGES = 100
UPSTREAM_KEY = "sk_test_fake_upstream_key"


def issue_key(stack: Any, cap_usd: str = "1.00", label: str = "run-42") -> dict[str, Any]:
    response = httpx.post(
        f"{stack.gateway_url}/v1/keys",
        headers={"Authorization": f"Bearer {stack.admin_token}"},
        content=f'{{"label": "{label}", "cap_usd": {cap_usd}}}',
        timeout=10,
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert body["key"].startswith("sgk_default_")
    return body


def key_state(stack: Any, key_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{stack.gateway_url}/v1/keys/{key_id}",
        headers={"Authorization": f"Bearer {stack.admin_token}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()
    return state


def wait_settled(stack: Any, key_id: str, timeout_s: float = 20) -> dict[str, Any]:
    """Settles run in the background after the response: wait until no hold is open."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = key_state(stack, key_id)
        if state["reserved_micros"] == 0 or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def fake_requests(stack: Any) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.fake_stripe_url}/_fake/requests", timeout=10)
    requests: list[dict[str, Any]] = response.json()["requests"]
    return requests


def audit_verify(stack: Any, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``spendgate audit verify`` until the auditor has caught up (or time runs out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = subprocess.run(
            [sys.executable, "-m", "spendgate_cli", "audit", "verify"],
            env={"SPENDGATE_DATABASE_URL": stack.database_url, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        caught_up = "not yet audited" not in result.stdout
        if (result.returncode == 0 and caught_up) or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


async def test_hundred_concurrent_charges_exactly_five_reach_stripe(spendgate_stack: Any) -> None:
    stack = spendgate_stack
    key = issue_key(stack)
    headers = {"Authorization": f"Bearer {key['key']}"}
    limits = httpx.Limits(max_connections=CONCURRENT_CHARGES)
    async with httpx.AsyncClient(base_url=stack.gateway_url, limits=limits, timeout=30) as client:

        async def charge() -> httpx.Response:
            return await client.post(
                "/stripe/v1/charges",
                headers=headers,
                data={"amount": str(CHARGE_CENTS), "currency": "usd", "source": "tok_visa"},
            )

        responses = await asyncio.gather(*(charge() for _ in range(CONCURRENT_CHARGES)))

    granted = [r for r in responses if r.status_code == 200]
    denied = [r for r in responses if r.status_code == 429]
    assert len(granted) == 5, [r.status_code for r in responses]
    assert len(denied) == CONCURRENT_CHARGES - 5
    for response in granted:
        assert response.json()["object"] == "charge"
        assert response.json()["amount"] == CHARGE_CENTS
    for response in denied:
        body = response.json()
        assert body["code"] == "cap_exhausted"
        assert body["cap_usd"] == "1.00"
        assert body["requested_usd"] == "0.18"
        assert body["scope"] == "key"
        assert body["decision_id"].startswith("dcn_")
        assert body["message"]
        assert "spent_usd" in body
        assert body["error"]["code"] == "cap_exhausted"
        assert body["error"]["message"] == body["message"]
        assert response.headers["stripe-should-retry"] == "false"

    received = fake_requests(stack)
    assert len(received) == 5
    # The vendor sees the real upstream key, never the vault key.
    assert all(r["authorization"] == f"Bearer {UPSTREAM_KEY}" for r in received)

    state = wait_settled(stack, key["key_id"])
    assert state["committed_micros"] == 900_000
    assert state["committed_usd"] == "0.90"
    assert state["reserved_micros"] == 0

    verified = audit_verify(stack)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK" in verified.stdout


def test_official_stripe_sdk_sees_a_stripe_error_on_the_sixth_charge(spendgate_stack: Any) -> None:
    stack = spendgate_stack
    key = issue_key(stack)
    client = stripe.StripeClient(
        api_key=key["key"],
        base_addresses={"api": f"{stack.gateway_url}/stripe"},
        max_network_retries=2,
    )
    for _ in range(5):
        charge = client.v1.charges.create(
            params={"amount": CHARGE_CENTS, "currency": "usd", "source": "tok_visa"}
        )
        assert charge.amount == CHARGE_CENTS
    with pytest.raises(stripe.StripeError) as raised:
        client.v1.charges.create(
            params={"amount": CHARGE_CENTS, "currency": "usd", "source": "tok_visa"}
        )
    error = raised.value
    # Stripe's SDK maps a 429 to its RateLimitError and shows our message.
    assert isinstance(error, stripe.RateLimitError)
    assert error.http_status == 429
    assert "cap exhausted" in str(error.user_message)
    assert error.json_body is not None
    assert error.json_body["error"]["code"] == "cap_exhausted"
    assert error.json_body["code"] == "cap_exhausted"
    # Stripe-Should-Retry: false kept the SDK from retrying the refusal.
    assert len(fake_requests(stack)) == 5
    assert wait_settled(stack, key["key_id"])["committed_micros"] == 900_000


def test_declined_card_releases_the_hold(spendgate_stack: Any) -> None:
    stack = spendgate_stack
    key = issue_key(stack)
    client = stripe.StripeClient(
        api_key=key["key"], base_addresses={"api": f"{stack.gateway_url}/stripe"}
    )
    with pytest.raises(stripe.CardError):
        client.v1.payment_intents.create(
            params={
                "amount": 50,
                "currency": "usd",
                "payment_method": "pm_card_chargeDeclined",
                "confirm": True,
            }
        )
    state = wait_settled(stack, key["key_id"])
    assert state["reserved_micros"] == 0
    assert state["committed_micros"] == 0
    # The full cap is available again: a $1.00 payment intent goes through.
    intent = client.v1.payment_intents.create(params={"amount": 100, "currency": "usd"})
    assert intent.amount == 100
