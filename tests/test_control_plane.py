"""The control plane against a real stack: listings, direct reservations, a run's spend.

Everything goes through the gateway's HTTP API to a real ledger over real NATS and
Postgres (tests/harness.py); no vendor is involved, except the proxied charge that shows
a direct reservation and a proxied call draw on the same cap.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.harness import Stack
from tests.test_e2e_stripe import wait_settled

pytestmark = pytest.mark.e2e

OTHER_TENANT = "globex"


def admin_client(stack: Stack) -> httpx.Client:
    headers = {"authorization": f"Bearer {stack.admin_token}"}
    return httpx.Client(base_url=stack.gateway_url, headers=headers, timeout=10)


def key_client(stack: Stack, vault_key: str) -> httpx.Client:
    headers = {"authorization": f"Bearer {vault_key}"}
    return httpx.Client(base_url=stack.gateway_url, headers=headers, timeout=10)


def issue(client: httpx.Client, label: str, **fields: Any) -> Any:
    """A new key (``cap_usd`` 1.00 unless another cap is given)."""
    caps = ("cap_usd", "daily_usd_cap", "monthly_usd_cap")
    cap = {} if any(name in fields for name in caps) else {"cap_usd": "1.00"}
    issued = client.post("/v1/keys", json={"label": label, **cap, **fields})
    assert issued.status_code == 201, issued.text
    return issued.json()


def walk(client: httpx.Client, url: str, items: str, **params: Any) -> tuple[list[Any], int]:
    """Every item of a listing, following next_cursor; and how many pages it took."""
    seen: list[Any] = []
    cursor: str | None = None
    for pages in range(1, 1_000):
        page = client.get(url, params={**params, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        seen.extend(body[items])
        cursor = body["next_cursor"]
        if cursor is None:
            return seen, pages
    raise AssertionError("paging does not end")


def error_code(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["code"]


def test_keys_and_budgets_are_listed_page_by_page_per_tenant(spendgate_stack: Stack) -> None:
    with admin_client(spendgate_stack) as client:
        labels = ["fleet-a/run-3", "fleet-a/run-1", "fleet-b/run-1", "fleet-a/run-2", "solo"]
        issued = {issue(client, label)["key_id"]: label for label in labels}
        issue(client, "fleet-a/run-9", tenant=OTHER_TENANT)
        revoked = next(key for key, label in issued.items() if label == "solo")
        assert client.post(f"/v1/keys/{revoked}/revoke", json={}).status_code == 200

        keys, pages = walk(client, "/v1/keys", "keys", limit=2)
        assert pages == 3
        assert [key["label"] for key in keys] == sorted(labels)
        assert {key["key_id"] for key in keys} == set(issued)
        solo = keys[-1]
        assert solo["revoked"] is True
        assert (solo["cap_usd"], solo["remaining_micros"], solo["tenant"]) == (
            "1.00",
            1_000_000,
            "default",
        )
        assert "budget_ids" in solo

        fleet_a, _ = walk(client, "/v1/keys", "keys", label_prefix="fleet-a/", limit=1)
        assert [key["label"] for key in fleet_a] == [
            "fleet-a/run-1",
            "fleet-a/run-2",
            "fleet-a/run-3",
        ]
        exact, _ = walk(client, "/v1/keys", "keys", label="fleet-b/run-1")
        assert [key["label"] for key in exact] == ["fleet-b/run-1"]
        other, _ = walk(client, "/v1/keys", "keys", tenant=OTHER_TENANT)
        assert [(key["label"], key["tenant"]) for key in other] == [("fleet-a/run-9", OTHER_TENANT)]
        assert walk(client, "/v1/keys", "keys", tenant="initech")[0] == []

        for budget_id, scope, match in [
            ("fleet-a", "fleet", "fleet-a/"),
            ("all", "tenant", ""),
            ("stripe", "vendor", "stripe"),
        ]:
            created = client.post(
                "/v1/budgets",
                json={"budget_id": budget_id, "scope": scope, "match": match, "cap_usd": "5"},
            )
            assert created.status_code == 201, created.text
        assert client.delete("/v1/budgets/stripe").status_code == 200
        client.post(
            "/v1/budgets",
            json={"budget_id": "theirs", "scope": "tenant", "cap_usd": 1, "tenant": OTHER_TENANT},
        )

        budgets, pages = walk(client, "/v1/budgets", "budgets", limit=1)
        assert [budget["budget_id"] for budget in budgets] == ["all", "fleet-a"]
        assert budgets[0]["remaining_usd"] == "5.00"
        everything, _ = walk(client, "/v1/budgets", "budgets", include_closed="true")
        assert [(budget["budget_id"], budget["closed"]) for budget in everything] == [
            ("all", False),
            ("fleet-a", False),
            ("stripe", True),
        ]
        fleets, _ = walk(client, "/v1/budgets", "budgets", scope="fleet")
        assert [budget["budget_id"] for budget in fleets] == ["fleet-a"]
        theirs, _ = walk(client, "/v1/budgets", "budgets", tenant=OTHER_TENANT)
        assert [budget["budget_id"] for budget in theirs] == ["theirs"]
        # A listed key names the budgets it draws on, as GET /v1/keys/{key_id} does.
        run_1 = client.get("/v1/keys", params={"label": "fleet-a/run-1"}).json()["keys"][0]
        assert run_1["budget_ids"] == ["fleet-a", "all"]
        assert run_1 == client.get(f"/v1/keys/{run_1['key_id']}").json()

        refusals = [
            (client.get("/v1/keys", params={"limit": "0"}), (400, "invalid_limit")),
            (client.get("/v1/keys", params={"limit": "201"}), (400, "invalid_limit")),
            (client.get("/v1/keys", params={"limit": "ten"}), (400, "invalid_limit")),
            (client.get("/v1/keys", params={"cursor": "bogus"}), (400, "invalid_cursor")),
            (
                client.get("/v1/keys", params={"label": "a", "label_prefix": "a"}),
                (400, "invalid_label"),
            ),
            (client.get("/v1/keys", params={"tenant": "Not A Tenant"}), (400, "invalid_tenant")),
            (client.get("/v1/budgets", params={"scope": "galaxy"}), (400, "invalid_scope")),
            (client.get("/v1/budgets", params={"include_closed": "yes"}), (400, "invalid_field")),
            (
                httpx.get(f"{spendgate_stack.gateway_url}/v1/keys", timeout=10),
                (401, "invalid_admin_token"),
            ),
        ]
        for response, expected in refusals:
            assert error_code(response) == expected, response.text
        # A budget listing's cursor is not a key listing's.
        page = client.get("/v1/budgets", params={"limit": 1}).json()
        assert error_code(client.get("/v1/keys", params={"cursor": page["next_cursor"]})) == (
            400,
            "invalid_cursor",
        )


def test_direct_reservations_commit_release_deny_and_replay(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    with admin_client(stack) as admin:
        issued = issue(admin, "sdk-run", cap_usd="1.00", allowed_vendors=["openai"])
        key_id = issued["key_id"]
        with key_client(stack, issued["key"]) as sdk:
            granted = sdk.post(
                "/v1/reservations",
                json={"amount_usd": "0.40", "vendor": "openai", "operation": "chat gpt-4o"},
            )
            assert granted.status_code == 201, granted.text
            grant = granted.json()
            assert grant["reservation_id"].startswith("rsv_")
            assert (grant["amount_micros"], grant["amount_usd"]) == (400_000, "0.40")
            assert (grant["reserved_usd"], grant["remaining_usd"]) == ("0.40", "0.60")
            assert grant["expires_at"].endswith("Z")
            assert (grant["replayed"], grant["settled"]) == (False, False)
            state = admin.get(f"/v1/keys/{key_id}").json()
            assert (state["reserved_micros"], state["committed_micros"]) == (400_000, 0)

            commit_url = f"/v1/reservations/{grant['reservation_id']}/commit"
            committed = sdk.post(commit_url, json={"actual_micros": 250_000})
            assert committed.status_code == 200, committed.text
            assert committed.json() == {
                "reservation_id": grant["reservation_id"],
                "outcome": "committed",
                "actual_micros": 250_000,
                "released_micros": 150_000,
                "overrun_micros": 0,
                "actual_usd": "0.25",
                "released_usd": "0.15",
                "overrun_usd": "0.00",
            }
            state = admin.get(f"/v1/keys/{key_id}").json()
            assert (state["reserved_micros"], state["committed_micros"]) == (0, 250_000)
            again = sdk.post(commit_url, json={"actual_usd": "0.25"})
            assert error_code(again) == (409, "already_settled")

            # Idempotency: the header, a replay flagged (200), a conflict.
            body = {"amount_micros": 300_000, "vendor": "openai", "operation": "embed"}
            first = sdk.post("/v1/reservations", json=body, headers={"Idempotency-Key": "call-1"})
            assert first.status_code == 201, first.text
            replay = sdk.post(
                "/v1/reservations", json={**body, "idempotency_key": "call-1"}, headers={}
            )
            assert replay.status_code == 200, replay.text
            assert replay.headers["idempotent-replayed"] == "true"
            assert replay.json()["replayed"] is True
            assert replay.json()["reservation_id"] == first.json()["reservation_id"]
            conflict = sdk.post(
                "/v1/reservations",
                json={**body, "amount_micros": 1},
                headers={"Idempotency-Key": "call-1"},
            )
            assert error_code(conflict) == (409, "idempotency_conflict")
            state = admin.get(f"/v1/keys/{key_id}").json()
            assert state["reserved_micros"] == 300_000

            released = sdk.post(
                f"/v1/reservations/{first.json()['reservation_id']}/release",
                json={"reason": "the model call failed before sending"},
            )
            assert released.status_code == 200, released.text
            assert (released.json()["outcome"], released.json()["released_micros"]) == (
                "released",
                300_000,
            )
            state = admin.get(f"/v1/keys/{key_id}").json()
            assert (state["reserved_micros"], state["committed_micros"]) == (0, 250_000)
            settled_replay = sdk.post(
                "/v1/reservations", json=body, headers={"Idempotency-Key": "call-1"}
            )
            assert (settled_replay.json()["replayed"], settled_replay.json()["settled"]) == (
                True,
                True,
            )

            # 0.25 spent of 1.00: 0.80 does not fit, and nothing is held for it.
            denied = sdk.post(
                "/v1/reservations",
                json={"amount_usd": "0.80", "vendor": "openai", "operation": "chat"},
            )
            assert denied.status_code == 429, denied.text
            denial = denied.json()
            assert denial["code"] == "cap_exhausted"
            assert (denial["scope"], denial["scope_id"]) == ("key", key_id)
            assert (denial["spent_usd"], denial["cap_usd"], denial["requested_usd"]) == (
                "0.25",
                "1.00",
                "0.80",
            )
            assert denial["remaining_usd"] == "0.75"
            assert denial["decision_id"].startswith("dcn_")
            assert "error" not in denial
            not_allowed = sdk.post(
                "/v1/reservations", json={"amount_micros": 1, "vendor": "stripe", "operation": "x"}
            )
            assert error_code(not_allowed) == (403, "vendor_not_allowed")

            # Revoked: new reservations are refused, an open hold still settles.
            held = sdk.post(
                "/v1/reservations",
                json={"amount_micros": 10_000, "vendor": "openai", "operation": "x"},
            ).json()
            assert admin.post(f"/v1/keys/{key_id}/revoke", json={}).status_code == 200
            refused = sdk.post(
                "/v1/reservations", json={"amount_micros": 1, "vendor": "openai", "operation": "x"}
            )
            assert error_code(refused) == (401, "key_revoked")
            late = sdk.post(
                f"/v1/reservations/{held['reservation_id']}/commit", json={"actual_micros": 0}
            )
            assert late.status_code == 200, late.text
        state = admin.get(f"/v1/keys/{key_id}").json()
        assert (state["reserved_micros"], state["committed_micros"]) == (0, 250_000)


def test_direct_reservations_share_the_cap_with_proxied_calls(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    with admin_client(stack) as admin:
        issued = issue(admin, "mixed", cap_usd="1.00")
        with key_client(stack, issued["key"]) as agent:
            held = agent.post(
                "/v1/reservations",
                json={"amount_usd": "0.90", "vendor": "openai", "operation": "chat"},
            )
            assert held.status_code == 201, held.text
            charge = agent.post(
                "/stripe/v1/charges", data={"amount": "18", "currency": "usd", "source": "tok"}
            )
            assert charge.status_code == 429, charge.text
            assert charge.json()["scope"] == "key"
            agent.post(f"/v1/reservations/{held.json()['reservation_id']}/release", json={})
            charge = agent.post(
                "/stripe/v1/charges", data={"amount": "18", "currency": "usd", "source": "tok"}
            )
            assert charge.status_code == 200, charge.text
        state = wait_settled(stack, issued["key_id"])
        assert state["committed_micros"] == 180_000


def test_direct_reservations_refuse_bad_input_with_stable_codes(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    with admin_client(stack) as admin:
        issued = issue(admin, "bad-inputs")
    good = {"amount_micros": 1_000, "vendor": "openai", "operation": "chat"}
    cases: list[tuple[dict[str, Any] | bytes, dict[str, str], tuple[int, str]]] = [
        (b"{not json", {}, (400, "malformed_json")),
        (b"[1, 2]", {}, (400, "invalid_field")),
        ({**good, "amount_micros": "1000"}, {}, (400, "invalid_field")),
        ({**good, "amount_micros": 1.5}, {}, (400, "invalid_field")),
        ({**good, "amount_micros": True}, {}, (400, "invalid_field")),
        ({**good, "surprise": 1}, {}, (400, "invalid_field")),
        ({"vendor": "openai", "operation": "chat"}, {}, (400, "invalid_amount")),
        ({**good, "amount_usd": "0.001"}, {}, (400, "invalid_amount")),
        ({**good, "amount_micros": 0}, {}, (400, "invalid_amount")),
        ({**good, "amount_micros": -5}, {}, (400, "invalid_amount")),
        ({**good, "amount_micros": 10**30}, {}, (400, "invalid_amount")),
        ({"amount_usd": "-1", "vendor": "openai", "operation": "x"}, {}, (400, "invalid_amount")),
        ({"amount_usd": "0.0000001", "vendor": "x", "operation": "x"}, {}, (400, "invalid_amount")),
        ({"amount_usd": "1e400", "vendor": "x", "operation": "x"}, {}, (400, "invalid_amount")),
        ({"amount_usd": "NaN", "vendor": "x", "operation": "x"}, {}, (400, "invalid_amount")),
        ({**good, "vendor": "Open AI"}, {}, (400, "invalid_vendor")),
        ({**good, "operation": ""}, {}, (400, "invalid_operation")),
        ({**good, "hold_seconds": 0}, {}, (400, "invalid_hold")),
        ({**good, "hold_seconds": 10**9}, {}, (400, "invalid_hold")),
        ({**good, "idempotency_key": ""}, {}, (400, "invalid_idempotency_key")),
        (
            {**good, "idempotency_key": "a"},
            {"idempotency-key": "b"},
            (400, "invalid_idempotency_key"),
        ),
        (good, {"authorization": f"Bearer {stack.admin_token}"}, (401, "invalid_key")),
        (good, {"authorization": ""}, (401, "invalid_key")),
        (b"x" * 20_000, {}, (413, "body_too_large")),
    ]
    with key_client(stack, issued["key"]) as sdk:
        for body, headers, expected in cases:
            if isinstance(body, bytes):
                response = sdk.post("/v1/reservations", content=body, headers=headers)
            else:
                response = sdk.post("/v1/reservations", json=body, headers=headers)
            assert error_code(response) == expected, (body, response.text)
        settle_cases = [
            ("commit", {}, (400, "invalid_amount")),
            ("commit", {"actual_micros": 1, "actual_usd": "1"}, (400, "invalid_amount")),
            ("commit", {"actual_micros": -1}, (400, "invalid_amount")),
            ("commit", {"actual": 1}, (400, "invalid_field")),
            ("release", {"reason": "x" * 300}, (400, "invalid_reason")),
            ("release", {"reason": 5}, (400, "invalid_field")),
        ]
        for action, body, expected in settle_cases:
            response = sdk.post(f"/v1/reservations/rsv_0_1/{action}", json=body)
            assert error_code(response) == expected, (action, body, response.text)
        missing = sdk.post("/v1/reservations/rsv_0_999999/release", json={})
        assert error_code(missing) == (404, "reservation_not_found")
        too_long = sdk.post(f"/v1/reservations/{'r' * 100}/commit", json={"actual_micros": 1})
        assert error_code(too_long) == (404, "reservation_not_found")
        # Another key's reservation is not found for this key.
        with admin_client(stack) as admin:
            other = issue(admin, "other")
        with key_client(stack, other["key"]) as other_sdk:
            theirs = other_sdk.post("/v1/reservations", json=good).json()
        foreign = sdk.post(f"/v1/reservations/{theirs['reservation_id']}/release", json={})
        assert error_code(foreign) == (404, "reservation_not_found")
    wrong_secret = issued["key"][:-4] + "aaaa"
    with key_client(stack, wrong_secret) as impostor:
        assert error_code(impostor.post("/v1/reservations", json=good)) == (401, "invalid_key")


def test_run_spend_sums_the_keys_with_exactly_that_label(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    with admin_client(stack) as admin:
        first = issue(admin, "fleet-a/run-7", cap_usd="1.00")
        second = issue(admin, "fleet-a/run-7", daily_usd_cap="0.50")
        issue(admin, "fleet-a/run-70", cap_usd="9.00")
        with key_client(stack, first["key"]) as sdk:
            grant = sdk.post(
                "/v1/reservations",
                json={"amount_usd": "0.30", "vendor": "openai", "operation": "chat"},
            ).json()
            overrun = sdk.post(
                f"/v1/reservations/{grant['reservation_id']}/commit", json={"actual_usd": "1.20"}
            )
            assert overrun.json()["overrun_usd"] == "0.90"
        with key_client(stack, second["key"]) as sdk:
            sdk.post(
                "/v1/reservations",
                json={"amount_usd": "0.20", "vendor": "openai", "operation": "chat"},
            )

        run_url = f"/v1/runs/{quote('fleet-a/run-7', safe='')}/spend"
        spend = admin.get(run_url)
        assert spend.status_code == 200, spend.text
        body = spend.json()
        assert (body["label"], body["tenant"], body["key_count"]) == ("fleet-a/run-7", "default", 2)
        assert (body["cap_usd"], body["committed_usd"], body["reserved_usd"]) == (
            "1.50",
            "1.20",
            "0.20",
        )
        assert body["overrun_usd"] == "0.90"
        # The first key is over its cap; the second still has 0.30 of its own.
        assert body["remaining_usd"] == "0.30"
        windows = {key["key_id"]: key["window"] for key in body["keys"]}
        assert windows == {first["key_id"]: "total", second["key_id"]: "daily"}
        assert body["next_cursor"] is None

        paged = admin.get(run_url, params={"limit": 1}).json()
        assert len(paged["keys"]) == 1
        assert paged["committed_usd"] == "1.20"
        rest = admin.get(run_url, params={"limit": 1, "cursor": paged["next_cursor"]}).json()
        assert {paged["keys"][0]["key_id"], rest["keys"][0]["key_id"]} == set(windows)

        assert error_code(admin.get("/v1/runs/fleet-a%2Frun-8/spend")) == (404, "run_not_found")
        assert error_code(admin.get(run_url, params={"tenant": OTHER_TENANT})) == (
            404,
            "run_not_found",
        )
        assert error_code(admin.get(f"/v1/runs/{'x' * 129}/spend")) == (400, "invalid_label")
        # A label is free text: a line break, a slash or "/spend" in it still routes.
        odd = issue(admin, "line\nbreak/spend")
        odd_spend = admin.get(f"/v1/runs/{quote(odd['label'], safe='')}/spend")
        assert odd_spend.status_code == 200, odd_spend.text
        assert odd_spend.json()["keys"][0]["key_id"] == odd["key_id"]
        # The router's own 404 has our error shape too.
        assert error_code(admin.get("/")) == (404, "not_found")
