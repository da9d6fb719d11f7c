"""Anthropic through the gateway, end to end, with the official ``anthropic`` package.

Real gateway, ledger and auditor processes, real NATS and Postgres, and the fake
Anthropic (``spendgate fake-vendor anthropic``, a real HTTP server). Costs are checked
against list prices written out here (Claude Sonnet 5.5: $2 input, $10 output, $2.50 cache
write for 5 minutes, $0.10 cache read per million tokens).
"""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import httpx
import pytest

from spendgate_gateway.vendors import anthropic as anthropic_vendor
from tests import harness
from tests.harness import ServiceFactory, Stack
from tests.test_e2e_stripe import issue_key, key_state, wait_settled

pytestmark = pytest.mark.e2e

UPSTREAM_KEY = harness.FAKE_VENDOR_API_KEYS["anthropic"]
MODEL = "claude-sonnet-5-5"
SONNET_INPUT, SONNET_OUTPUT = 2_000_000, 10_000_000
SONNET_CACHE_WRITE_5M, SONNET_CACHE_READ = 2_500_000, 100_000
MESSAGES = [{"role": "user", "content": "Say something about budgets."}]


@pytest.fixture
def stack(service_factory: ServiceFactory, nats_url: str, database_url: str) -> Stack:
    return harness.build_stack(
        service_factory, nats_url=nats_url, database_url=database_url, vendors=("anthropic",)
    )


def client(stack: Stack, key: dict[str, Any], **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=key["key"], base_url=f"{stack.gateway_url}/anthropic", **options
    )


def fake_requests(stack: Stack) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.fake_url('anthropic')}/_fake/requests", timeout=10)
    requests: list[dict[str, Any]] = response.json()["requests"]
    return requests


def sonnet_cost(usage: dict[str, Any]) -> int:
    total = (
        usage["input_tokens"] * SONNET_INPUT
        + (usage.get("cache_creation_input_tokens") or 0) * SONNET_CACHE_WRITE_5M
        + (usage.get("cache_read_input_tokens") or 0) * SONNET_CACHE_READ
        + usage["output_tokens"] * SONNET_OUTPUT
    )
    return -(-total // 1_000_000)


def estimate_of(body: dict[str, Any]) -> int:
    """The hold the gateway takes for ``body`` (to check that a hold stayed in full)."""
    operation = "POST /v1/messages"
    estimate = anthropic_vendor.estimate_call(operation, {}, json.dumps(body).encode())
    return estimate.amount_micros


def test_message_settles_at_the_usage_cost_with_cache_prices(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="5.00")
    sdk = client(stack, key)
    plain = sdk.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    assert plain.content[0].text.startswith("Spendgate fake reply")
    cached = sdk.messages.create(
        model=MODEL,
        max_tokens=100,
        messages=MESSAGES,
        extra_headers={"x-fake-cached-tokens": "40", "x-fake-cache-write-tokens": "20"},
    )
    assert cached.usage.cache_read_input_tokens == 40
    expected = sonnet_cost(plain.usage.model_dump()) + sonnet_cost(cached.usage.model_dump())
    state = wait_settled(stack, key["key_id"])
    assert (state["committed_micros"], state["reserved_micros"]) == (expected, 0)
    received = fake_requests(stack)
    # The vendor gets the real key as x-api-key and the SDK's anthropic-version.
    assert {r["headers"]["x-api-key"] for r in received} == {UPSTREAM_KEY}
    assert all(r["headers"]["anthropic-version"] for r in received)
    assert all(r["headers"]["authorization"] is None for r in received)


def test_streamed_message_settles_from_message_start_and_message_delta(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="5.00")
    sdk = client(stack, key)
    with sdk.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.startswith("Spendgate fake reply")
    events = list(sdk.messages.create(model=MODEL, max_tokens=5, messages=MESSAGES, stream=True))
    assert [event.type for event in events][-2:] == ["message_delta", "message_stop"]
    assert events[-2].usage.output_tokens == 5

    received = fake_requests(stack)
    assert [r["stream"] for r in received] == ["complete", "complete"]
    assert final.usage.model_dump()["output_tokens"] == received[0]["usage"]["output_tokens"]
    expected = sum(sonnet_cost(r["usage"]) for r in received)
    assert wait_settled(stack, key["key_id"])["committed_micros"] == expected


def test_denied_call_raises_rate_limit_error_without_retries(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="0.0001")
    attempts: list[str] = []
    http_client = anthropic.DefaultHttpxClient(
        event_hooks={"request": [lambda request: attempts.append(str(request.url))]}
    )
    sdk = client(stack, key, max_retries=3, http_client=http_client)
    with pytest.raises(anthropic.RateLimitError) as raised:
        sdk.messages.create(model=MODEL, max_tokens=1000, messages=MESSAGES)
    error = raised.value
    assert error.response.headers["x-should-retry"] == "false"
    body = error.response.json()
    assert body["code"] == "cap_exhausted"
    assert body["error"]["type"] == "rate_limit_error"
    assert "cap exhausted" in body["error"]["message"]
    assert len(attempts) == 1
    assert fake_requests(stack) == []
    state = key_state(stack, key["key_id"])
    assert (state["committed_micros"], state["reserved_micros"]) == (0, 0)


def test_refusals_before_the_vendor(stack: Stack) -> None:
    key = issue_key(stack)
    sdk = client(stack, key, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as unknown:
        sdk.messages.create(model="claude-9-opus", max_tokens=10, messages=MESSAGES)
    assert unknown.value.response.json()["code"] == "unknown_model"
    with pytest.raises(anthropic.PermissionDeniedError) as unpriced:
        sdk.messages.create(
            model=MODEL,
            max_tokens=10,
            messages=MESSAGES,
            tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
        )
    assert unpriced.value.response.json()["code"] == "unpriced_feature"
    # The SDK insists on max_tokens; so does the gateway, for a raw call.
    raw = httpx.post(
        f"{stack.gateway_url}/anthropic/v1/messages",
        headers={"x-api-key": key["key"], "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "messages": MESSAGES},
        timeout=10,
    )
    assert raw.status_code == 400
    assert raw.json()["code"] == "missing_max_tokens"
    assert raw.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens is required",
    }
    assert fake_requests(stack) == []
    state = key_state(stack, key["key_id"])
    assert (state["committed_micros"], state["reserved_micros"]) == (0, 0)


def test_overloaded_keeps_the_hold_and_a_refusal_releases_it(stack: Stack) -> None:
    overloaded_key = issue_key(stack, label="run-529")
    with pytest.raises(anthropic.APIStatusError) as raised:
        client(stack, overloaded_key, max_retries=0).messages.create(
            model=MODEL,
            max_tokens=300,
            messages=MESSAGES,
            extra_headers={"x-fake-status": "529"},
        )
    assert raised.value.status_code == 529
    time.sleep(1)  # the settle runs after the answer; give a wrong release time to happen
    state = key_state(stack, overloaded_key["key_id"])
    hold = estimate_of({"model": MODEL, "max_tokens": 300, "messages": MESSAGES})
    assert (state["reserved_micros"], state["committed_micros"]) == (hold, 0)

    refused_key = issue_key(stack, label="run-413")
    with pytest.raises(anthropic.APIStatusError):
        client(stack, refused_key, max_retries=0).messages.create(
            model=MODEL,
            max_tokens=300,
            messages=MESSAGES,
            extra_headers={"x-fake-status": "413"},
        )
    state = wait_settled(stack, refused_key["key_id"])
    assert (state["reserved_micros"], state["committed_micros"]) == (0, 0)


def test_stream_broken_after_message_start_settles_at_input_plus_max_tokens(stack: Stack) -> None:
    key = issue_key(stack)
    stream = client(stack, key, max_retries=0).messages.create(
        model=MODEL,
        max_tokens=400,
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-fake-break-after-events": "4"},
    )
    received = []
    with pytest.raises(anthropic.APIStatusError) as raised:
        received.extend(stream)
    assert received[0].type == "message_start"
    assert "stopped streaming" in str(raised.value)
    request = fake_requests(stack)[0]
    assert request["stream"] == "broken"
    # The input is known from message_start; the output may be anything up to max_tokens.
    expected = sonnet_cost({**request["usage"], "output_tokens": 400})
    assert expected < estimate_of({"model": MODEL, "max_tokens": 400, "messages": MESSAGES})
    assert wait_settled(stack, key["key_id"])["committed_micros"] == expected


def test_caller_leaving_mid_stream_closes_the_upstream_stream(stack: Stack) -> None:
    key = issue_key(stack)
    body = {"model": MODEL, "max_tokens": 300, "messages": MESSAGES, "stream": True}
    headers = {
        "x-api-key": key["key"],
        "anthropic-version": "2023-06-01",
        "x-fake-output-tokens": "300",
        "x-fake-chunk-delay-ms": "100",
    }
    with httpx.stream(
        "POST", f"{stack.gateway_url}/anthropic/v1/messages", headers=headers, json=body, timeout=10
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert any(line == "event: message_start" for line in lines)
    deadline = time.monotonic() + 10
    while fake_requests(stack)[0].get("stream") != "abandoned" and time.monotonic() < deadline:
        time.sleep(0.05)
    request = fake_requests(stack)[0]
    assert request["stream"] == "abandoned"
    expected = sonnet_cost({**request["usage"], "output_tokens": 300})
    assert wait_settled(stack, key["key_id"])["committed_micros"] == expected
