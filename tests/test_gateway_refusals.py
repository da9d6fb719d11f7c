"""Bad input gets a clear error (stable ``code``, human ``message``), nothing is forwarded
upstream, and the budget is untouched. Fail closed when the ledger or NATS is down."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.test_e2e_stripe import fake_requests, issue_key, key_state

pytestmark = pytest.mark.e2e

_JSON = {"content-type": "application/json"}
_FORM = {"content-type": "application/x-www-form-urlencoded"}


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: bytes
    headers: dict[str, str]
    status: int
    code: str
    key: str = "vault"  # "vault": the issued key; "none": no key; otherwise the literal
    method: str = "POST"


PROXY_CASES = [
    Case("malformed json", "/stripe/v1/charges", b'{"amount": 18,', _JSON, 400, "malformed_json"),
    Case("json not an object", "/stripe/v1/charges", b"[18]", _JSON, 400, "malformed_json"),
    Case(
        "amount text",
        "/stripe/v1/charges",
        b"amount=abc&currency=usd",
        _FORM,
        400,
        "invalid_amount",
    ),
    Case(
        "amount fraction",
        "/stripe/v1/charges",
        b'{"amount": 1.5, "currency": "usd"}',
        _JSON,
        400,
        "invalid_amount",
    ),
    Case(
        "amount bool",
        "/stripe/v1/charges",
        b'{"amount": true, "currency": "usd"}',
        _JSON,
        400,
        "invalid_amount",
    ),
    Case(
        "amount negative",
        "/stripe/v1/charges",
        b"amount=-5&currency=usd",
        _FORM,
        400,
        "invalid_amount",
    ),
    Case(
        "amount zero",
        "/stripe/v1/charges",
        b'{"amount": 0, "currency": "usd"}',
        _JSON,
        400,
        "invalid_amount",
    ),
    Case(
        "amount huge",
        "/stripe/v1/charges",
        b'{"amount": 1000000000000000000000000, "currency": "usd"}',
        _JSON,
        400,
        "invalid_amount",
    ),
    Case(
        "amount twice",
        "/stripe/v1/charges",
        b"amount=1&amount=2&currency=usd",
        _FORM,
        400,
        "malformed_form",
    ),
    Case("amount missing", "/stripe/v1/charges", b"currency=usd", _FORM, 400, "missing_amount"),
    Case(
        "currency unknown",
        "/stripe/v1/charges",
        b"amount=18&currency=xyz",
        _FORM,
        400,
        "unsupported_currency",
    ),
    Case(
        "media type",
        "/stripe/v1/charges",
        b"amount=18",
        {"content-type": "text/plain"},
        415,
        "unsupported_media_type",
    ),
    Case(
        "unknown vendor",
        "/acme/v1/charges",
        b"amount=18&currency=usd",
        _FORM,
        404,
        "unknown_vendor",
    ),
    Case("unpriced call", "/stripe/v1/customers", b"email=a@b.c", _FORM, 403, "unpriced_call"),
    Case(
        "dot segments",
        "/stripe/v1/%2e%2e/charges",
        b"amount=18&currency=usd",
        _FORM,
        400,
        "invalid_path",
    ),
    Case(
        "absolute url",
        "/stripe/http:%2F%2Fevil.example/v1/charges",
        b"amount=18&currency=usd",
        _FORM,
        400,
        "invalid_path",
    ),
    Case(
        "body too large",
        "/stripe/v1/charges",
        b"amount=18&currency=usd&pad=" + b"x" * 2_000_000,
        _FORM,
        413,
        "body_too_large",
    ),
    Case(
        "no key",
        "/stripe/v1/charges",
        b"amount=18&currency=usd",
        _FORM,
        401,
        "invalid_key",
        key="none",
    ),
    Case(
        "malformed key",
        "/stripe/v1/charges",
        b"amount=18&currency=usd",
        _FORM,
        401,
        "invalid_key",
        key="sk_live_not_a_vault_key",
    ),
    Case(
        "unknown key",
        "/stripe/v1/charges",
        b"amount=18&currency=usd",
        _FORM,
        401,
        "invalid_key",
        key="sgk_default_aaaaaaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    ),
]

ADMIN_CASES = [
    ('{"label": "r", "cap_usd": "abc"}', 400, "invalid_field"),
    ('{"label": "r", "cap_usd": -1}', 400, "invalid_amount"),
    ('{"label": "r", "cap_usd": 0}', 400, "invalid_amount"),
    ('{"label": "r", "cap_usd": 0.0000001}', 400, "invalid_amount"),
    ('{"label": "r", "cap_usd": 1e400}', 400, "invalid_amount"),
    ('{"label": "r", "cap_usd": 1, "daily_usd_cap": 1}', 400, "invalid_cap"),
    ('{"label": "r"}', 400, "invalid_cap"),
    ('{"label": "r", "cap_usd": 1, "cap_us": 2}', 400, "invalid_field"),
    ('{"label": "r", "cap_usd": true}', 400, "invalid_field"),
    ('{"label": "", "cap_usd": 1}', 400, "invalid_label"),
    ('{"label": "r", "cap_usd": 1, "tenant": "Bad_Tenant"}', 400, "invalid_tenant"),
    ('{"label": "r", "daily_usd_cap": 1, "timezone": "Mars/Olympus"}', 400, "invalid_timezone"),
    ('{"label": "r", "cap_usd": 1, "ttl_seconds": -1}', 400, "invalid_ttl"),
    ('{"label": "r", "cap_usd": 1', 400, "malformed_json"),
]


def test_bad_proxy_input_is_refused_and_nothing_reaches_stripe(spendgate_stack: Any) -> None:
    stack = spendgate_stack
    key = issue_key(stack)
    with httpx.Client(base_url=stack.gateway_url, timeout=10) as client:
        for case in PROXY_CASES:
            headers = dict(case.headers)
            presented = {"vault": key["key"], "none": None}.get(case.key, case.key)
            if presented:
                headers["authorization"] = f"Bearer {presented}"
            response = client.request(case.method, case.path, content=case.body, headers=headers)
            assert response.status_code == case.status, (case.name, response.text)
            body = response.json()
            assert body["code"] == case.code, (case.name, body)
            assert body["message"], case.name
            if case.code != "unknown_vendor":
                # In Stripe's own error shape, so the Stripe SDK raises its usual error.
                assert body["error"]["code"] == case.code, case.name
    assert fake_requests(stack) == []
    state = key_state(stack, key["key_id"])
    assert (state["committed_micros"], state["reserved_micros"]) == (0, 0)


def test_bad_admin_input_is_refused(spendgate_stack: Any) -> None:
    stack = spendgate_stack
    admin = {"authorization": f"Bearer {stack.admin_token}", **_JSON}
    with httpx.Client(base_url=stack.gateway_url, timeout=10) as client:
        for body, status, code in ADMIN_CASES:
            response = client.post("/v1/keys", content=body, headers=admin)
            assert response.status_code == status, (body, response.text)
            assert response.json()["code"] == code, (body, response.json())
        for token in (None, "wrong-token-wrong-token"):
            headers = dict(_JSON)
            if token:
                headers["authorization"] = f"Bearer {token}"
            response = client.post("/v1/keys", content='{"label":"r","cap_usd":1}', headers=headers)
            assert response.status_code == 401
            assert response.json()["code"] == "invalid_admin_token"


def _charge_status(stack: Any, vault_key: str) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    response = httpx.post(
        f"{stack.gateway_url}/stripe/v1/charges",
        headers={"authorization": f"Bearer {vault_key}"},
        data={"amount": "18", "currency": "usd"},
        timeout=30,
    )
    return response.status_code, response.json(), time.monotonic() - started


def test_fails_closed_when_the_ledger_is_down(spendgate_stack: Any) -> None:
    stack = spendgate_stack
    key = issue_key(stack)
    stack.services["ledger"].kill()
    status, body, _ = _charge_status(stack, key["key"])
    assert status == 503
    assert body["code"] == "ledger_unavailable"
    assert body["error"]["code"] == "ledger_unavailable"
    assert fake_requests(stack) == []


def test_fails_closed_when_nats_is_down(spendgate_stack: Any, embedded_nats: Any) -> None:
    stack = spendgate_stack
    key = issue_key(stack)
    embedded_nats.kill()
    status, body, _ = _charge_status(stack, key["key"])
    assert status == 503
    assert body["code"] == "ledger_unavailable"
    assert fake_requests(stack) == []
