"""Budgets and revocation through the gateway's control plane, end to end.

A fleet budget shared by two runs stops the fleet while each run still has room of its
own; the 429 names the fleet budget. Revoking a key refuses it at once. Closing the
budget lets the runs spend up to their own caps again.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.test_e2e_stripe import fake_requests, wait_settled

pytestmark = pytest.mark.e2e


def admin(stack: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {stack.admin_token}", "content-type": "application/json"}


def charge(stack: Any, vault_key: str, cents: int = 18) -> httpx.Response:
    return httpx.post(
        f"{stack.gateway_url}/stripe/v1/charges",
        headers={"authorization": f"Bearer {vault_key}"},
        data={"amount": str(cents), "currency": "usd"},
        timeout=30,
    )


def test_fleet_budget_revocation_and_close(spendgate_stack: Any) -> None:
    stack = spendgate_stack
    with httpx.Client(base_url=stack.gateway_url, headers=admin(stack), timeout=10) as client:
        created = client.post(
            "/v1/budgets",
            json={
                "budget_id": "fleet-a-daily",
                "scope": "fleet",
                "match": "fleet-a/",
                "cap_usd": "0.50",
                "window": "daily",
                "timezone": "Europe/Berlin",
            },
        )
        assert created.status_code == 201, created.text
        assert created.json()["cap_usd"] == "0.50"
        assert created.json()["window"] == "daily"
        keys = []
        for label in ("fleet-a/run-1", "fleet-a/run-2"):
            issued = client.post("/v1/keys", json={"label": label, "cap_usd": 1})
            assert issued.status_code == 201, issued.text
            keys.append(issued.json())
        assert (
            client.post(
                "/v1/budgets",
                json={"budget_id": "fleet-a-daily", "scope": "fleet", "match": "x", "cap_usd": 1},
            ).status_code
            == 409
        )

        # 0.18 + 0.18 fit the $0.50 fleet budget; the third charge, on the other run, does not.
        assert charge(stack, keys[0]["key"]).status_code == 200
        assert charge(stack, keys[1]["key"]).status_code == 200
        refused = charge(stack, keys[0]["key"])
        assert refused.status_code == 429
        body = refused.json()
        assert (body["code"], body["scope"], body["scope_id"]) == (
            "cap_exhausted",
            "fleet",
            "fleet-a-daily",
        )
        assert body["cap_usd"] == "0.50"
        assert "fleet budget 'fleet-a-daily'" in body["message"]
        assert len(fake_requests(stack)) == 2

        wait_settled(stack, keys[0]["key_id"])
        wait_settled(stack, keys[1]["key_id"])
        budget = client.get("/v1/budgets/fleet-a-daily").json()
        assert (budget["committed_usd"], budget["reserved_usd"]) == ("0.36", "0.00")
        assert budget["remaining_usd"] == "0.14"
        key_view = client.get(f"/v1/keys/{keys[0]['key_id']}").json()
        assert key_view["budget_ids"] == ["fleet-a-daily"]

        raised = client.patch("/v1/budgets/fleet-a-daily", json={"cap_usd": "0.54"})
        assert raised.status_code == 200, raised.text
        assert charge(stack, keys[0]["key"]).status_code == 200

        revoked = client.post(f"/v1/keys/{keys[1]['key_id']}/revoke", json={"reason": "leaked"})
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["revoked"] is True
        refusal = charge(stack, keys[1]["key"])
        assert (refusal.status_code, refusal.json()["code"]) == (401, "key_revoked")
        again = client.post(f"/v1/keys/{keys[1]['key_id']}/revoke", json={})
        assert (again.status_code, again.json()["code"]) == (409, "already_revoked")

        closed = client.delete("/v1/budgets/fleet-a-daily")
        assert closed.status_code == 200
        assert closed.json()["closed"] is True
        # Without the fleet budget, run-1 spends up to its own $1.00 cap: 0.36 + 3 x 0.18.
        wait_settled(stack, keys[0]["key_id"])
        statuses = [charge(stack, keys[0]["key"]).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        assert len(fake_requests(stack)) == 6

        missing = client.get("/v1/budgets/nope")
        assert (missing.status_code, missing.json()["code"]) == (404, "budget_not_found")
        bad = client.post(
            "/v1/budgets",
            json={"budget_id": "Bad Id", "scope": "fleet", "match": "a", "cap_usd": 1},
        )
        assert (bad.status_code, bad.json()["code"]) == (400, "invalid_budget_id")
        unknown_scope = client.post(
            "/v1/budgets", json={"budget_id": "b", "scope": "galaxy", "cap_usd": 1}
        )
        assert (unknown_scope.status_code, unknown_scope.json()["code"]) == (400, "invalid_field")


def test_openapi_document_resolves_every_reference(spendgate_stack: Any) -> None:
    document = httpx.get(f"{spendgate_stack.gateway_url}/openapi.json", timeout=10).json()
    schemas = document["components"]["schemas"]
    for name in ("IssueKeyRequest", "CreateBudgetRequest", "UpdateBudgetRequest"):
        assert name in schemas
    references: list[str] = []

    def collect(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    references.append(value)
                collect(value)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    collect(document)
    assert references
    for reference in references:
        assert reference.startswith("#/components/schemas/"), reference
        assert reference.rsplit("/", 1)[1] in schemas, reference
