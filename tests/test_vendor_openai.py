"""OpenAI through the gateway, end to end, with the official ``openai`` package.

Real gateway, ledger and auditor processes, real NATS and Postgres, and the fake OpenAI
(``spendgate fake-vendor openai``, a real HTTP server). Costs are checked against list
prices written out here (gpt-4o: $2.50 / $1.25 cached / $10.00 per million tokens), not
against the gateway's own arithmetic.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from spendgate_gateway.vendors import openai as openai_vendor
from tests import harness
from tests.harness import ServiceFactory, Stack
from tests.test_e2e_stripe import issue_key, key_state, wait_settled

pytestmark = pytest.mark.e2e

UPSTREAM_KEY = harness.FAKE_VENDOR_API_KEYS["openai"]
# Short enough for the stalled-stream test, far above what the fake needs otherwise.
READ_TIMEOUT_MS = 1_500
# gpt-4o list prices, micro-USD per million tokens.
GPT_4O_INPUT, GPT_4O_CACHED, GPT_4O_OUTPUT = 2_500_000, 1_250_000, 10_000_000
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something about budgets."},
]


@pytest.fixture
def stack(service_factory: ServiceFactory, nats_url: str, database_url: str) -> Stack:
    return harness.build_stack(
        service_factory,
        nats_url=nats_url,
        database_url=database_url,
        vendors=("openai",),
        extra_env={"SPENDGATE_UPSTREAM_READ_TIMEOUT_MS": str(READ_TIMEOUT_MS)},
    )


def client(stack: Stack, key: dict[str, Any], **options: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key=key["key"], base_url=f"{stack.gateway_url}/openai/v1", **options)


def fake_requests(stack: Stack) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.fake_url('openai')}/_fake/requests", timeout=10)
    requests: list[dict[str, Any]] = response.json()["requests"]
    return requests


def gpt_4o_cost(usage: dict[str, Any]) -> int:
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    cached = details.get("cached_tokens", 0)
    total = (prompt - cached) * GPT_4O_INPUT + cached * GPT_4O_CACHED + completion * GPT_4O_OUTPUT
    return -(-total // 1_000_000)


def estimate_of(path: str, body: dict[str, Any]) -> int:
    """The hold the gateway takes for ``body`` (to check that a hold stayed in full)."""
    api = {"v1/chat/completions": openai_vendor.Api.CHAT}[path]
    return openai_vendor.estimate_call(
        api, f"POST /{path}", json.dumps(body).encode()
    ).amount_micros


def wait_for(condition: Any, timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def test_chat_completion_settles_at_the_usage_cost(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="5.00")
    sdk = client(stack, key)
    first = sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=50)
    assert first.choices[0].message.content
    assert first.usage is not None
    second = sdk.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        extra_headers={"x-fake-cached-tokens": "10"},
    )
    assert second.usage is not None
    assert second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == 10

    # The fake gzips its JSON, as OpenAI does: the gateway decodes it to read the usage,
    # and answers uncompressed.
    raw = httpx.post(
        f"{stack.gateway_url}/openai/v1/chat/completions",
        headers={"authorization": f"Bearer {key['key']}", "accept-encoding": "gzip"},
        json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50},
        timeout=10,
    )
    assert raw.status_code == 200
    assert "content-encoding" not in raw.headers
    third = raw.json()["usage"]

    expected = sum(
        gpt_4o_cost(usage) for usage in (first.usage.model_dump(), second.usage.model_dump(), third)
    )
    state = wait_settled(stack, key["key_id"])
    assert state["reserved_micros"] == 0
    assert state["committed_micros"] == expected
    received = fake_requests(stack)
    assert len(received) == 3
    # The vendor sees the real key, never the vault key.
    assert {r["headers"]["authorization"] for r in received} == {f"Bearer {UPSTREAM_KEY}"}
    # ... and is asked for compressed answers, which the gateway decodes.
    assert all("gzip" in r["headers"]["accept-encoding"] for r in received)


def test_chat_stream_without_usage_option_hides_the_added_usage_chunk(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="5.00")
    sdk = client(stack, key)
    chunks = list(sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert chunks
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text.startswith("Spendgate fake reply")
    assert chunks[-1].choices[0].finish_reason == "stop"

    # On the wire too: no usage chunk and no "usage":null member, and [DONE] at the end.
    raw = httpx.post(
        f"{stack.gateway_url}/openai/v1/chat/completions",
        headers={"authorization": f"Bearer {key['key']}"},
        json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
        timeout=10,
    )
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert '"usage"' not in raw.text
    assert raw.text.endswith("data: [DONE]\n\n")

    received = fake_requests(stack)
    assert len(received) == 2
    for request in received:
        # The gateway asked for the usage the caller did not ask for.
        assert request["body"]["stream_options"] == {"include_usage": True}
        assert request["stream"] == "complete"
    expected = sum(gpt_4o_cost(request["usage"]) for request in received)
    assert wait_settled(stack, key["key_id"])["committed_micros"] == expected


def test_chat_stream_with_usage_option_shows_the_usage_chunk(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="5.00")
    stream = client(stack, key).chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        max_completion_tokens=5,
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None
    assert chunks[-1].choices == []
    assert usage.completion_tokens == 5  # cut short by max_completion_tokens
    assert wait_settled(stack, key["key_id"])["committed_micros"] == gpt_4o_cost(usage.model_dump())


def test_responses_api_streamed_and_not(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="5.00")
    sdk = client(stack, key)
    response = sdk.responses.create(model="gpt-4o", input="Hello", max_output_tokens=100)
    assert response.output_text.startswith("Spendgate fake reply")
    assert response.usage is not None
    events = list(sdk.responses.create(model="gpt-4o", input="Hello again", stream=True))
    assert events[-1].type == "response.completed"
    streamed_usage = events[-1].response.usage
    assert streamed_usage is not None
    expected = gpt_4o_cost(response.usage.model_dump()) + gpt_4o_cost(streamed_usage.model_dump())
    assert wait_settled(stack, key["key_id"])["committed_micros"] == expected
    # Responses streams always carry usage: nothing is added to the request.
    assert all("stream_options" not in r["body"] for r in fake_requests(stack))


def test_embeddings_settle_at_the_usage_cost(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="1.00")
    result = client(stack, key).embeddings.create(
        model="text-embedding-3-large", input=["budget " * 300, "cap"]
    )
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 8
    # text-embedding-3-large: $0.13 per million tokens.
    expected = -(-result.usage.prompt_tokens * 130_000 // 1_000_000)
    assert wait_settled(stack, key["key_id"])["committed_micros"] == expected


def test_denied_call_raises_rate_limit_error_without_retries(stack: Stack) -> None:
    key = issue_key(stack, cap_usd="0.0001")
    attempts: list[str] = []
    http_client = openai.DefaultHttpxClient(
        event_hooks={"request": [lambda request: attempts.append(str(request.url))]}
    )
    sdk = client(stack, key, max_retries=3, http_client=http_client)
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    error = raised.value
    assert error.code == "cap_exhausted"
    assert error.type == "insufficient_quota"
    assert "cap exhausted" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    body = error.response.json()
    assert body["code"] == "cap_exhausted"
    assert body["cap_usd"] == "0.0001"
    # x-should-retry: false kept the SDK from retrying.
    assert len(attempts) == 1
    assert fake_requests(stack) == []
    state = key_state(stack, key["key_id"])
    assert state["committed_micros"] == 0
    assert state["reserved_micros"] == 0


def test_unknown_model_and_unpriced_features_are_refused_before_the_vendor(stack: Stack) -> None:
    key = issue_key(stack)
    sdk = client(stack, key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as unknown:
        sdk.chat.completions.create(model="gpt-9-ultra", messages=MESSAGES)
    assert unknown.value.code == "unknown_model"
    with pytest.raises(openai.PermissionDeniedError) as unpriced:
        sdk.responses.create(model="gpt-4o", input="hi", tools=[{"type": "web_search_preview"}])
    assert unpriced.value.code == "unpriced_feature"
    with pytest.raises(openai.PermissionDeniedError) as unpriced_path:
        sdk.models.list()
    assert unpriced_path.value.code == "unpriced_call"
    assert fake_requests(stack) == []
    state = key_state(stack, key["key_id"])
    assert (state["committed_micros"], state["reserved_micros"]) == (0, 0)


def test_upstream_5xx_keeps_the_hold_and_4xx_releases_it(stack: Stack) -> None:
    server_error_key = issue_key(stack, label="run-5xx")
    sdk = client(stack, server_error_key, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            max_tokens=20,
            extra_headers={"x-fake-status": "500"},
        )
    hold = estimate_of(
        "v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20}
    )
    # The settle runs after the answer; give a wrong release time to happen.
    time.sleep(1)
    state = key_state(stack, server_error_key["key_id"])
    assert (state["reserved_micros"], state["committed_micros"]) == (hold, 0)

    refused_key = issue_key(stack, label="run-4xx")
    sdk = client(stack, refused_key, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_headers={"x-fake-status": "400"},
        )
    state = wait_settled(stack, refused_key["key_id"])
    assert (state["reserved_micros"], state["committed_micros"]) == (0, 0)


def _stream_lines(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line


def test_caller_leaving_mid_stream_closes_upstream_and_settles_at_the_estimate(
    stack: Stack,
) -> None:
    key = issue_key(stack)
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "max_tokens": 200}
    headers = {
        "authorization": f"Bearer {key['key']}",
        "x-fake-output-tokens": "200",
        "x-fake-chunk-delay-ms": "100",
    }
    with httpx.stream(
        "POST",
        f"{stack.gateway_url}/openai/v1/chat/completions",
        headers=headers,
        json=body,
        timeout=10,
    ) as response:
        lines = _stream_lines(response)
        assert [next(lines) for _ in range(3)]
    # The gateway closed the upstream stream long before its 20 s of tokens were sent.
    abandoned = wait_for(lambda: fake_requests(stack)[0].get("stream") == "abandoned")
    assert abandoned, fake_requests(stack)
    assert fake_requests(stack)[0]["events_sent"] < 100
    # No usage was seen: the whole estimate is committed, at once.
    state = wait_settled(stack, key["key_id"])
    assert state["committed_micros"] == estimate_of("v1/chat/completions", body)


def test_stream_broken_off_upstream_raises_in_the_sdk_and_settles_at_the_estimate(
    stack: Stack,
) -> None:
    key = issue_key(stack)
    stream = client(stack, key, max_retries=0).chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        max_tokens=30,
        extra_headers={"x-fake-break-after-events": "3"},
    )
    received = []
    with pytest.raises(openai.APIError) as raised:
        received.extend(stream)
    assert len(received) == 3
    assert "stopped streaming" in raised.value.message
    assert fake_requests(stack)[0]["stream"] == "broken"
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "max_tokens": 30}
    state = wait_settled(stack, key["key_id"])
    assert state["committed_micros"] == estimate_of("v1/chat/completions", body)


def test_stalled_stream_times_out_and_settles_at_the_estimate(stack: Stack) -> None:
    key = issue_key(stack)
    # Started before the request: the gateway may read the two events before create()
    # returns, and its read timeout counts from that read, so only a clock started
    # earlier is sure to see the whole timeout pass.
    started = time.monotonic()
    stream = client(stack, key, max_retries=0).chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        max_tokens=30,
        extra_headers={"x-fake-stall-after-events": "2"},
    )
    with pytest.raises(openai.APIError) as raised:
        list(stream)
    assert "read timeout" in raised.value.message
    assert READ_TIMEOUT_MS / 1000 <= time.monotonic() - started < 10
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "max_tokens": 30}
    state = wait_settled(stack, key["key_id"])
    assert state["committed_micros"] == estimate_of("v1/chat/completions", body)
    # The gateway dropped the stalled upstream stream.
    assert wait_for(lambda: fake_requests(stack)[0].get("stream") == "abandoned")
