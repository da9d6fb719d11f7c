"""Resend through the gateway, end to end, with the official ``resend`` package.

Resend's SDK reads its address from ``resend.api_url`` (``RESEND_API_URL``) and its key
from ``resend.api_key``: pointing them at ``http://<gateway>/resend`` and the vault key is
all an agent changes. Expected costs are written out from ``pricing/resend.json``
($0.0009 per recipient).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import resend

from tests import harness
from tests.harness import ServiceFactory, Stack
from tests.test_e2e_stripe import issue_key, key_state, wait_settled

pytestmark = pytest.mark.e2e

PER_RECIPIENT = 900
SENDER = "agent@example.com"


@pytest.fixture
def stack(service_factory: ServiceFactory, nats_url: str, database_url: str) -> Stack:
    return harness.build_stack(
        service_factory, nats_url=nats_url, database_url=database_url, vendors=("resend",)
    )


@pytest.fixture
def use_key(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, Any]], None]:
    """Point the SDK's module settings at the gateway; ``use_key(key)`` sets the vault key."""
    monkeypatch.setattr(resend, "api_url", f"{stack.gateway_url}/resend")

    def use(key: dict[str, Any]) -> None:
        monkeypatch.setattr(resend, "api_key", key["key"])

    return use


def fake_requests(stack: Stack) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.fake_url('resend')}/_fake/requests", timeout=10)
    requests: list[dict[str, Any]] = response.json()["requests"]
    return requests


def committed(stack: Stack, key: dict[str, Any]) -> int:
    state = wait_settled(stack, key["key_id"])
    assert state["reserved_micros"] == 0
    value: int = state["committed_micros"]
    return value


def email(to: str | list[str], **more: Any) -> resend.Emails.SendParams:
    params: resend.Emails.SendParams = {"from": SENDER, "to": to, "subject": "hi", "html": "x"}
    params.update(more)  # type: ignore[typeddict-item]
    return params


def test_emails_cost_per_recipient(stack: Stack, use_key: Any) -> None:
    key = issue_key(stack)
    use_key(key)
    sent = resend.Emails.send(email(["a@x.com", "b@x.com"], cc="c@x.com", bcc=["d@x.com"]))
    assert sent["id"]
    assert committed(stack, key) == 4 * PER_RECIPIENT
    resend.Batch.send([email("e@x.com"), email(["f@x.com", "g@x.com"])])
    assert committed(stack, key) == 7 * PER_RECIPIENT
    for request in fake_requests(stack):
        assert request["authorization"] == f"Bearer {harness.FAKE_VENDOR_API_KEYS['resend']}"


def test_a_permissive_batch_counts_only_what_resend_sent(stack: Stack, use_key: Any) -> None:
    key = issue_key(stack)
    use_key(key)
    invalid = {"from": SENDER, "to": ["h@x.com", "i@x.com"]}  # no subject
    answer = resend.Batch.send(
        [email("e@x.com"), invalid, email("j@x.com")],  # type: ignore[list-item]
        options={"batch_validation": "permissive"},
    )
    assert len(answer["data"]) == 2
    assert [error["index"] for error in answer.get("errors", [])] == [1]
    assert committed(stack, key) == 2 * PER_RECIPIENT


def test_refusals_by_resend_are_free_and_failures_keep_the_hold(stack: Stack, use_key: Any) -> None:
    key = issue_key(stack)
    use_key(key)
    with pytest.raises(resend.exceptions.ResendError):
        resend.Emails.send({"from": SENDER, "to": "a@x.com"})
    assert committed(stack, key) == 0
    httpx.post(f"{stack.fake_url('resend')}/_fake/fail-next", json={"status": 500}, timeout=10)
    with pytest.raises(resend.exceptions.ResendError):
        resend.Emails.send(email(["a@x.com", "b@x.com", "c@x.com"]))
    time.sleep(0.5)
    state = key_state(stack, key["key_id"])
    assert (state["committed_micros"], state["reserved_micros"]) == (0, 3 * PER_RECIPIENT)


def test_a_denied_email_never_reaches_resend(stack: Stack, use_key: Any) -> None:
    key = issue_key(stack, cap_usd="0.002")
    use_key(key)
    resend.Emails.send(email(["a@x.com", "b@x.com"]))  # $0.0018
    with pytest.raises(resend.exceptions.ResendError) as raised:
        resend.Emails.send(email("c@x.com"))
    assert "cap exhausted" in str(raised.value)
    assert len(fake_requests(stack)) == 1
    assert committed(stack, key) == 2 * PER_RECIPIENT


def test_a_retry_with_the_same_idempotency_key_is_counted_once(stack: Stack, use_key: Any) -> None:
    key = issue_key(stack)
    use_key(key)
    options: resend.Emails.SendOptions = {"idempotency_key": "welcome-42"}
    first = resend.Emails.send(email("a@x.com"), options=options)
    wait_settled(stack, key["key_id"])
    again = resend.Emails.send(email("a@x.com"), options=options)
    assert again["id"] == first["id"]
    assert committed(stack, key) == PER_RECIPIENT


def test_unpriced_calls_are_refused(stack: Stack, use_key: Any) -> None:
    key = issue_key(stack)
    use_key(key)
    sent = resend.Emails.send(email("a@x.com"))
    with pytest.raises(resend.exceptions.ResendError) as raised:
        resend.Emails.get(sent["id"])
    assert "no cost estimate" in str(raised.value)
    assert len(fake_requests(stack)) == 1
