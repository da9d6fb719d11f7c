"""Contracts and approvals through the gateway, end to end (docs/contracts.md).

A contract file is uploaded as YAML (a bad expression is refused with the rule's name);
a ``stop`` rule refuses a Stripe charge with 403; a ``require_approval`` rule holds a
charge until an operator approves it (the retry with the same idempotency key is then
forwarded once) or rejects it (the retry is refused); a ``degrade`` rule rewrites an
OpenAI call to a cheaper model with its output clamped to what remains, and the fake
OpenAI shows the upstream received the rewritten call.
"""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest

from tests import harness
from tests.harness import ServiceFactory

pytestmark = pytest.mark.e2e

CONTRACTS = b"""\
rules:
  - name: no-99-cents
    when: request.vendor == "stripe" && request.amount_micros == 990000
    decision: stop
    message: 99-cent charges are not allowed
  - name: big-charges
    when: request.vendor == "stripe" && request.amount_micros >= 5000000
    decision: require_approval
    message: charges of $5 or more need an operator
  - name: cheaper-model
    when: request.vendor == "openai" && request.model == "gpt-4o"
    decision: degrade
    degrade_model: gpt-4o-mini
"""

BAD_CONTRACTS = b"""\
rules:
  - name: fine
    when: request.amount_usd > 1.0
    decision: stop
  - name: broken-rule
    when: request.amount_usd >
    decision: stop
"""


def admin(stack: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {stack.admin_token}"}


def charge(stack: Any, key: str, cents: int, idempotency_key: str) -> httpx.Response:
    return httpx.post(
        f"{stack.gateway_url}/stripe/v1/charges",
        headers={"authorization": f"Bearer {key}", "idempotency-key": idempotency_key},
        data={"amount": str(cents), "currency": "usd", "source": "tok_visa"},
        timeout=30,
    )


def stripe_charges(stack: Any) -> list[dict[str, Any]]:
    answer = httpx.get(f"{stack.fake_stripe_url}/_fake/requests", timeout=10).json()
    return [r for r in answer["requests"] if "charges" in str(r.get("path", ""))]


@pytest.fixture
def stack(service_factory: ServiceFactory, nats_url: str, database_url: str) -> Any:
    return harness.build_stack(
        service_factory, nats_url=nats_url, database_url=database_url, vendors=("openai",)
    )


def test_contracts_stop_approve_reject_and_degrade(stack: Any) -> None:
    with httpx.Client(base_url=stack.gateway_url, headers=admin(stack), timeout=10) as client:
        refused = client.put("/v1/contracts", content=BAD_CONTRACTS)
        assert refused.status_code == 400, refused.text
        assert refused.json()["code"] == "invalid_contract"
        assert "broken-rule" in refused.json()["message"]
        assert client.put("/v1/contracts", content=b"rules: 5").status_code == 400
        assert client.get("/v1/contracts").json()["version"] == 0

        uploaded = client.put("/v1/contracts", content=CONTRACTS)
        assert uploaded.status_code == 200, uploaded.text
        shown = client.get("/v1/contracts").json()
        assert shown["version"] == 1
        assert [rule["name"] for rule in shown["rules"]] == [
            "no-99-cents",
            "big-charges",
            "cheaper-model",
        ]
        assert shown["source_sha256"] == hashlib.sha256(CONTRACTS).hexdigest()
        assert httpx.get(f"{stack.gateway_url}/v1/contracts", timeout=10).status_code == 401

        key = client.post("/v1/keys", json={"label": "run-1", "cap_usd": 20}).json()["key"]

        # stop: 403 with the cap_exhausted body shape; the upstream is never called.
        stopped = charge(stack, key, 99, "stop-1")
        assert stopped.status_code == 403, stopped.text
        assert stopped.json()["code"] == "contract_stop"
        assert stopped.json()["scope_id"] == "no-99-cents"
        assert stopped.json()["error"]["code"] == "contract_stop"

        # require_approval, then approve: the retry is forwarded once.
        pending = charge(stack, key, 600, "big-1")
        assert pending.status_code == 409, pending.text
        body = pending.json()
        assert body["code"] == "approval_required"
        assert body["contract"] == "big-charges"
        approval_id = body["approval_id"]
        assert charge(stack, key, 600, "big-1").json()["approval_id"] == approval_id
        assert stripe_charges(stack) == []
        listed = client.get("/v1/approvals", params={"status": "pending"}).json()
        assert [a["approval_id"] for a in listed["approvals"]] == [approval_id]
        assert client.get(f"/v1/approvals/{approval_id}").json()["status"] == "pending"
        assert client.get("/v1/approvals/apr_nope").status_code == 404
        assert client.post(f"/v1/approvals/{approval_id}/approve", json={}).status_code == 400
        approved = client.post(
            f"/v1/approvals/{approval_id}/approve", json={"by": "alice", "note": "ok"}
        )
        assert approved.status_code == 200, approved.text
        assert approved.json()["status"] == "approved"
        again = client.post(f"/v1/approvals/{approval_id}/reject", json={"by": "bob"})
        assert again.status_code == 409
        assert again.json()["code"] == "approval_not_pending"
        granted = charge(stack, key, 600, "big-1")
        assert granted.status_code == 200, granted.text
        assert len(stripe_charges(stack)) == 1

        # require_approval, then reject: the retry is refused with 403.
        second = charge(stack, key, 700, "big-2").json()["approval_id"]
        rejected = client.post(f"/v1/approvals/{second}/reject", json={"by": "bob"})
        assert rejected.json()["status"] == "rejected"
        refused_call = charge(stack, key, 700, "big-2")
        assert refused_call.status_code == 403
        assert refused_call.json()["code"] == "approval_rejected"
        assert len(stripe_charges(stack)) == 1

        # degrade: gpt-4o becomes gpt-4o-mini, with its output clamped to fit a tiny cap.
        tiny = client.post("/v1/keys", json={"label": "run-2", "cap_usd": "0.001"}).json()
        completion = httpx.post(
            f"{stack.gateway_url}/openai/v1/chat/completions",
            headers={"authorization": f"Bearer {tiny['key']}"},
            json={
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "hello"}],
                "max_completion_tokens": 10_000,
            },
            timeout=30,
        )
        assert completion.status_code == 200, completion.text
        header = completion.headers["spendgate-degraded"]
        assert header.startswith("cheaper-model; model=gpt-4o-mini; max_tokens=")
        clamped = int(header.rsplit("=", 1)[1])
        assert 0 < clamped < 10_000
        upstream = httpx.get(f"{stack.fake_url('openai')}/_fake/requests", timeout=10).json()
        sent = upstream["requests"][-1]["body"]
        assert sent["model"] == "gpt-4o-mini"
        assert sent["max_completion_tokens"] == clamped
