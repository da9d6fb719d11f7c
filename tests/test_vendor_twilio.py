"""Twilio through the gateway, end to end, with the official ``twilio`` package.

Twilio's SDK has no base-URL option, but each of its API domains keeps its address in an
attribute: ``client.api.base_url = "http://<gateway>/twilio"`` points every call of
``client.messages`` / ``client.calls`` at the gateway. The agent's account SID can be
anything: the gateway puts the real one (``SPENDGATE_TWILIO_ACCOUNT_SID``) in the path
and in the Basic auth it sends; the vault key is the agent's auth token.

Expected costs are written out from ``pricing/twilio.json`` (US SMS $0.0150 per segment,
UK $0.0600, US MMS $0.0400, US voice $0.0200 per minute).
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from twilio.base.exceptions import (  # type: ignore[import-untyped]
    TwilioException,
    TwilioRestException,
)
from twilio.rest import Client  # type: ignore[import-untyped]

from tests import harness
from tests.harness import ServiceFactory, Stack
from tests.test_e2e_stripe import issue_key, key_state, wait_settled

pytestmark = pytest.mark.e2e

AGENT_SID = "AC" + "ff" * 16  # what the agent's SDK is configured with: not the real one
REAL_SID = harness.FAKE_TWILIO_ACCOUNT_SID
US, UK = "+14155550100", "+447700900123"
SENDER = "+15005550006"
FIXED_COSTS = {"twilio": {"GET /2010-04-01/Accounts/*/Messages/*.json": "0"}}


@pytest.fixture
def stack(service_factory: ServiceFactory, nats_url: str, database_url: str) -> Stack:
    return harness.build_stack(
        service_factory,
        nats_url=nats_url,
        database_url=database_url,
        vendors=("twilio",),
        extra_env={
            "SPENDGATE_TWILIO_CALL_SECONDS_MAX": "300",
            "SPENDGATE_FIXED_COSTS": json.dumps(FIXED_COSTS),
        },
    )


def client(stack: Stack, key: dict[str, Any]) -> Client:
    sdk = Client(AGENT_SID, key["key"])
    sdk.api.base_url = f"{stack.gateway_url}/twilio"
    return sdk


def fake_requests(stack: Stack) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.fake_url('twilio')}/_fake/requests", timeout=10)
    requests: list[dict[str, Any]] = response.json()["requests"]
    return requests


def committed(stack: Stack, key: dict[str, Any]) -> int:
    state = wait_settled(stack, key["key_id"])
    assert state["reserved_micros"] == 0
    value: int = state["committed_micros"]
    return value


def test_messages_settle_per_segment_with_the_real_account(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="5")
    sdk = client(stack, key)
    message = sdk.messages.create(to=US, from_=SENDER, body="hello")
    assert message.status == "queued"
    assert committed(stack, key) == 15_000
    sdk.messages.create(to=UK, from_=SENDER, body="a" * 161)  # 2 segments
    assert committed(stack, key) == 15_000 + 120_000
    sdk.messages.create(to=US, from_=SENDER, body="\U0001f600" * 36)  # UCS-2: 2 segments
    assert committed(stack, key) == 15_000 + 120_000 + 30_000
    for request in fake_requests(stack):
        assert request["path"] == f"/2010-04-01/Accounts/{REAL_SID}/Messages.json"
        assert request["auth_user"] == REAL_SID
        assert "sgk_" not in request["authorization"]


def test_a_price_in_twilios_answer_is_what_is_committed(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="5")
    httpx.post(f"{stack.fake_url('twilio')}/_fake/price", json={"price": "-0.0079"}, timeout=10)
    client(stack, key).messages.create(to=US, from_=SENDER, body="hello")
    assert committed(stack, key) == 7_900


def test_mms_and_calls(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="5")
    sdk = client(stack, key)
    sdk.messages.create(to=US, from_=SENDER, body="look", media_url=["https://e.com/a.png"])
    assert committed(stack, key) == 40_000
    sdk.calls.create(to=US, from_=SENDER, url="https://e.com/twiml", time_limit=90)
    assert committed(stack, key) == 40_000 + 2 * 20_000
    # Without TimeLimit the gateway adds its maximum (300 s here) and reserves for it.
    sdk.calls.create(to=US, from_=SENDER, twiml="<Response><Say>hi</Say></Response>")
    assert committed(stack, key) == 40_000 + 2 * 20_000 + 5 * 20_000
    calls = [r for r in fake_requests(stack) if r["path"].endswith("/Calls.json")]
    assert [r["fields"]["TimeLimit"] for r in calls] == ["90", "300"]
    with pytest.raises(TwilioRestException) as raised:
        sdk.calls.create(to=US, from_=SENDER, url="https://e.com/twiml", time_limit=3600)
    assert raised.value.status == 400
    assert raised.value.code == "time_limit_too_long"
    assert len(fake_requests(stack)) == 3


def test_refusals_by_twilio_are_free_and_failures_keep_the_hold(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="5")
    sdk = client(stack, key)
    with pytest.raises(TwilioRestException) as raised:
        sdk.messages.create(to=US, body="no sender")  # Twilio's 400 21603
    assert raised.value.code == 21603
    assert committed(stack, key) == 0
    httpx.post(f"{stack.fake_url('twilio')}/_fake/fail-next", json={"status": 503}, timeout=10)
    with pytest.raises(TwilioRestException) as raised:
        sdk.messages.create(to=UK, from_=SENDER, body="hello")
    assert raised.value.status == 503
    time.sleep(0.5)
    state = key_state(stack, key["key_id"])
    assert (state["committed_micros"], state["reserved_micros"]) == (0, 60_000)


def test_a_denied_message_never_reaches_twilio(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="0.05")
    with pytest.raises(TwilioRestException) as raised:
        client(stack, key).messages.create(to=UK, from_=SENDER, body="hello")  # $0.06
    assert raised.value.status == 429
    assert raised.value.code == "cap_exhausted"
    assert "cap exhausted" in raised.value.msg
    assert fake_requests(stack) == []


def test_unpriced_calls_and_fixed_costs(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="5")
    sdk = client(stack, key)
    sent = sdk.messages.create(to=US, from_=SENDER, body="hello")
    # Fetching one message has a fixed cost of 0 here: a free call, with the real SID.
    assert sdk.messages(sent.sid).fetch().body == "hello"
    # Listing messages has no price: refused before Twilio.
    with pytest.raises(TwilioException) as listing:  # the SDK's error for a list page
        sdk.messages.list(limit=5)
    assert "HTTP 403" in str(listing.value)
    assert '"code":"unpriced_call"' in str(listing.value)
    assert committed(stack, key) == 15_000
    paths = [r["path"] for r in fake_requests(stack)]
    assert paths == [
        f"/2010-04-01/Accounts/{REAL_SID}/Messages.json",
        f"/2010-04-01/Accounts/{REAL_SID}/Messages/{sent.sid}.json",
    ]


def test_the_idempotency_token_forwards_a_call_once(stack: Stack) -> None:
    """Twilio does not deduplicate, so a retry of a completed call is not sent again."""
    key = issue_key(stack, cap_usd="5")
    url = f"{stack.gateway_url}/twilio/2010-04-01/Accounts/{AGENT_SID}/Messages.json"
    headers = {"I-Twilio-Idempotency-Token": "retry-1"}
    form = {"To": US, "From": SENDER, "Body": "once"}
    auth = (AGENT_SID, key["key"])
    first = httpx.post(url, data=form, headers=headers, auth=auth, timeout=10)
    assert first.status_code == 201, first.text
    wait_settled(stack, key["key_id"])
    again = httpx.post(url, data=form, headers=headers, auth=auth, timeout=10)
    assert again.status_code == 409, again.text
    assert len(fake_requests(stack)) == 1
    assert committed(stack, key) == 15_000
