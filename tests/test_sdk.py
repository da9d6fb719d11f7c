"""The SDK (libs/sdk) against a real stack: sync and async round trips, a cap's refusal
as ``BudgetExceeded``, and contracts through the direct reservations API: ``stop`` as
``ContractStopped``, ``require_approval`` as ``ApprovalRequired`` whose ``resume()`` is
granted once approved (and ``ApprovalRejected`` once rejected), ``degrade`` as
``DegradeRequired`` and the degraded reserve granted."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from spendgate_sdk import (
    ApprovalRejected,
    ApprovalRequired,
    AsyncSpendgateClient,
    BudgetExceeded,
    ContractStopped,
    DegradeRequired,
    SpendgateClient,
    SpendgateError,
)
from tests.harness import Stack

pytestmark = pytest.mark.e2e

CONTRACTS = b"""\
rules:
  - name: no-forbidden
    when: request.operation == "forbidden"
    decision: stop
  - name: big-calls
    when: request.vendor == "openai" && request.amount_micros >= 300000
    decision: require_approval
    message: calls of $0.30 or more need an operator
  - name: cheaper-model
    when: request.vendor == "openai" && request.model == "gpt-4o"
    decision: degrade
    degrade_model: gpt-4o-mini
"""


def issue_key(stack: Stack, cap_usd: str = "1.00", label: str = "sdk-run") -> str:
    response = httpx.post(
        f"{stack.gateway_url}/v1/keys",
        headers={"authorization": f"Bearer {stack.admin_token}"},
        content=f'{{"label": "{label}", "cap_usd": {cap_usd}}}',
        timeout=10,
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


def admin_post(stack: Stack, path: str, body: object) -> dict[str, Any]:
    response = httpx.post(
        f"{stack.gateway_url}{path}",
        headers={"authorization": f"Bearer {stack.admin_token}"},
        json=body,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def upload_contracts(stack: Stack, source: bytes) -> None:
    response = httpx.put(
        f"{stack.gateway_url}/v1/contracts?tenant=default",
        headers={"authorization": f"Bearer {stack.admin_token}"},
        content=source,
        timeout=10,
    )
    assert response.status_code == 200, response.text


def test_sync_client_round_trip_and_budget_exceeded(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    key = issue_key(stack, cap_usd="1.00")
    with SpendgateClient(key, gateway_url=stack.gateway_url, admin_token=stack.admin_token) as sg:
        first = sg.reserve("0.40", vendor="openai", operation="chat gpt-4o", hold_seconds=60)
        assert first.amount_micros == 400_000
        assert first.remaining_micros == 600_000
        settled = sg.commit(first, actual_micros=250_000)
        assert (settled.outcome, settled.actual_micros) == ("committed", 250_000)
        assert settled.released_micros == 150_000

        # The same idempotency key replays the grant instead of holding twice.
        second = sg.reserve(
            amount_micros=100_000, vendor="openai", operation="x", idempotency_key="k1"
        )
        again = sg.reserve(
            amount_micros=100_000, vendor="openai", operation="x", idempotency_key="k1"
        )
        assert again.reservation_id == second.reservation_id
        assert again.replayed
        assert sg.release(second, reason="the call failed").outcome == "released"

        with pytest.raises(BudgetExceeded) as refused:
            sg.reserve("0.80", vendor="openai", operation="chat gpt-4o")
        assert refused.value.status == 429
        assert refused.value.code == "cap_exhausted"
        assert refused.value.scope == "key"
        assert refused.value.remaining_micros == 750_000
        assert refused.value.requested_micros == 800_000

        state = sg.key_state()
        assert (state.committed_micros, state.reserved_micros) == (250_000, 0)
        assert state.remaining_micros == 750_000

        with pytest.raises(SpendgateError) as twice:
            sg.commit(first, actual_usd="0.1")
        assert twice.value.code == "already_settled"
        assert twice.value.status == 409

    with SpendgateClient("sgk_default_nope_nope", gateway_url=stack.gateway_url) as bad:
        with pytest.raises(SpendgateError) as unauthorized:
            bad.reserve("0.01", vendor="openai", operation="x")
        assert unauthorized.value.status == 401


async def test_async_client_round_trip_and_approval(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    key = issue_key(stack, cap_usd="2.00", label="sdk-async")
    upload_contracts(stack, CONTRACTS)
    async with AsyncSpendgateClient(key, gateway_url=stack.gateway_url) as sg:
        small = await sg.reserve(amount_micros=10_000, vendor="openai", operation="chat")
        assert (await sg.commit(small, "0.005")).actual_micros == 5_000

        with pytest.raises(ContractStopped) as stopped:
            await sg.reserve("0.01", vendor="openai", operation="forbidden")
        assert stopped.value.status == 403

        with pytest.raises(ApprovalRequired) as pending:
            await sg.reserve("0.50", vendor="openai", operation="chat", idempotency_key="big-1")
        approval = pending.value
        assert approval.status == 409
        assert approval.contract == "big-calls"
        assert approval.approval_id
        assert approval.expires_at.endswith("Z")
        assert approval.idempotency_key == "big-1"
        with pytest.raises(ApprovalRequired):  # still pending
            await approval.resume_async()

        decided = admin_post(stack, f"/v1/approvals/{approval.approval_id}/approve", {"by": "t"})
        assert decided["status"] == "approved"
        granted = await approval.resume_async()
        assert granted.amount_micros == 500_000
        await sg.release(granted)

        # A generated idempotency key is resent as well; rejected -> ApprovalRejected.
        with pytest.raises(ApprovalRequired) as second:
            await sg.reserve("0.60", vendor="openai", operation="chat")
        assert second.value.idempotency_key.startswith("sdk-")
        admin_post(stack, f"/v1/approvals/{second.value.approval_id}/reject", {"by": "t"})
        with pytest.raises(ApprovalRejected) as rejected:
            await second.value.resume_async()
        assert rejected.value.code == "approval_rejected"
        assert rejected.value.status == 403

        with pytest.raises(DegradeRequired) as degrade:
            await sg.reserve("0.01", vendor="openai", operation="chat", model="gpt-4o")
        assert degrade.value.model == "gpt-4o-mini"
        assert degrade.value.contract == "cheaper-model"
        assert degrade.value.remaining_micros > 0
        cheaper = await sg.reserve(
            "0.002",
            vendor="openai",
            operation="chat",
            model="gpt-4o-mini",
            degraded_by=degrade.value.contract,
        )
        assert cheaper.amount_micros == 2_000
