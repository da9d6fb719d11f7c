"""Idempotent retries through the proxy, across two gateway processes.

A retry with the same ``Idempotency-Key`` must never become a second grant or a second
upstream call: while the first attempt is in flight the retry gets 409
``request_in_progress``; once the first attempt's outcome is unknown (a 5xx, a timeout)
the retry resumes its hold and settles it; once it completed, Stripe (which deduplicates
by that header itself) answers the retry from its own memory and nothing is charged twice.
Calls beyond the gateway's in-flight limit are shed at once (503 ``overloaded``), never
reserved or forwarded.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.harness import ServiceFactory, free_port
from tests.test_e2e_stripe import fake_requests, issue_key, key_state, wait_settled

pytestmark = pytest.mark.e2e

CHARGE = {"amount": "500", "currency": "usd"}
CHARGE_MICROS = 5_000_000


def second_gateway(service_factory: ServiceFactory, stack: Any) -> str:
    port = free_port()
    service_factory("gateway", {**stack.env, "SPENDGATE_GATEWAY_PORT": str(port)})
    return f"http://127.0.0.1:{port}"


def charge_headers(key: dict[str, Any], idempotency_key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}", "Idempotency-Key": idempotency_key, **extra}


def upstream_calls_with(stack: Any, idempotency_key: str) -> int:
    return sum(1 for r in fake_requests(stack) if r["idempotency_key"] == idempotency_key)


async def test_concurrent_retries_across_gateways_make_one_upstream_call(
    spendgate_stack: Any, service_factory: ServiceFactory
) -> None:
    stack = spendgate_stack
    gateways = [stack.gateway_url, second_gateway(service_factory, stack)]
    key = issue_key(stack, cap_usd="100.00")
    headers = charge_headers(key, "retry-storm", **{"X-Fake-Delay-Ms": "1500"})
    async with httpx.AsyncClient(timeout=30) as client:
        responses = await asyncio.gather(
            *(
                client.post(f"{gateways[i % 2]}/stripe/v1/charges", data=CHARGE, headers=headers)
                for i in range(10)
            )
        )
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] + [409] * 9, [r.text for r in responses]
    for response in responses:
        if response.status_code == 409:
            assert response.json()["code"] == "request_in_progress"
            assert response.headers["retry-after"] == "1"
    assert upstream_calls_with(stack, "retry-storm") == 1
    state = wait_settled(stack, key["key_id"])
    assert state["committed_micros"] == CHARGE_MICROS

    # Once the first attempt completed, a retry is answered by Stripe's own idempotency
    # (the gateway forwards it without a new reservation) and nothing is charged again.
    async with httpx.AsyncClient(timeout=30) as client:
        retry = await client.post(
            f"{gateways[1]}/stripe/v1/charges",
            data=CHARGE,
            headers=charge_headers(key, "retry-storm"),
        )
    assert retry.status_code == 200, retry.text
    assert retry.headers.get("idempotent-replayed") == "true"
    assert retry.json()["id"] == next(r.json()["id"] for r in responses if r.status_code == 200)
    assert key_state(stack, key["key_id"])["committed_micros"] == CHARGE_MICROS


async def test_a_retry_resumes_a_call_whose_outcome_was_unknown(
    spendgate_stack: Any, service_factory: ServiceFactory
) -> None:
    stack = spendgate_stack
    other_gateway = second_gateway(service_factory, stack)
    key = issue_key(stack, cap_usd="100.00")
    async with httpx.AsyncClient(timeout=30) as client:
        failed = await client.post(
            f"{stack.gateway_url}/stripe/v1/charges",
            data=CHARGE,
            headers=charge_headers(key, "flaky-1", **{"X-Fake-Status": "500"}),
        )
        assert failed.status_code == 500
        # A 5xx may have cost money: the hold stays.
        await asyncio.sleep(0.5)
        held = key_state(stack, key["key_id"])
        assert (held["reserved_micros"], held["committed_micros"]) == (CHARGE_MICROS, 0)

        retried = await client.post(
            f"{other_gateway}/stripe/v1/charges",
            data=CHARGE,
            headers=charge_headers(key, "flaky-1"),
        )
    assert retried.status_code == 200, retried.text
    state = wait_settled(stack, key["key_id"])
    assert (state["reserved_micros"], state["committed_micros"]) == (0, CHARGE_MICROS)
    assert upstream_calls_with(stack, "flaky-1") == 2


async def test_calls_beyond_the_inflight_limit_are_shed_not_queued(
    spendgate_stack: Any, service_factory: ServiceFactory
) -> None:
    stack = spendgate_stack
    port = free_port()
    env = {**stack.env, "SPENDGATE_GATEWAY_PORT": str(port), "SPENDGATE_GATEWAY_INFLIGHT_MAX": "2"}
    service_factory("gateway", env)
    small_gateway = f"http://127.0.0.1:{port}"
    key = issue_key(stack, cap_usd="100.00")
    async with httpx.AsyncClient(timeout=30) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    f"{small_gateway}/stripe/v1/charges",
                    data=CHARGE,
                    headers=charge_headers(key, f"shed-{i}", **{"X-Fake-Delay-Ms": "1000"}),
                )
                for i in range(6)
            )
        )
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 200, 503, 503, 503, 503], [r.text for r in responses]
    for response in responses:
        if response.status_code == 503:
            assert response.json()["code"] == "overloaded"
            assert response.headers["retry-after"] == "1"
    state = wait_settled(stack, key["key_id"])
    assert state["committed_micros"] == 2 * CHARGE_MICROS
    assert (
        sum(1 for r in fake_requests(stack) if str(r["idempotency_key"]).startswith("shed-")) == 2
    )
