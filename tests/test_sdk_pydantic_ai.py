"""``spendgate_sdk.pydantic_ai.SpendgateModel`` against a real stack: an agent whose
``FunctionModel`` calls a tool forever is stopped by its cap with ``BudgetExceeded``
out of ``agent.run()``; every request it made was committed from its usage at the
given prices (nothing stays held); a failed model request releases its hold."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from spendgate_sdk import AsyncSpendgateClient, BudgetExceeded, DegradeRequired
from spendgate_sdk.pydantic_ai import Fallback, SpendgateModel, TokenPrices
from tests.harness import Stack
from tests.test_sdk import issue_key, upload_contracts

pytestmark = pytest.mark.e2e

# Expensive on purpose: each request's estimate is tens of cents, so a $1 cap stops the
# loop after a few requests.
PRICES = TokenPrices(input_micros_per_million=10_000_000, output_micros_per_million=200_000_000)


def tool_forever(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[ToolCallPart("lookup", {"query": f"step {len(messages)}"})])


def failing(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    raise RuntimeError("upstream is down")


def key_state(stack: Stack, key: str) -> dict[str, int]:
    key_id = key.split("_")[-2]
    response = httpx.get(
        f"{stack.gateway_url}/v1/keys/{key_id}",
        headers={"authorization": f"Bearer {stack.admin_token}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    state: dict[str, int] = response.json()
    return state


async def test_agent_tool_loop_stops_at_its_cap(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    key = issue_key(stack, cap_usd="1.00", label="pydantic-ai-run")
    async with AsyncSpendgateClient(key, gateway_url=stack.gateway_url) as client:
        model = SpendgateModel(
            FunctionModel(tool_forever),
            client,
            vendor="openai",
            prices=PRICES,
            max_output_tokens=1000,
        )
        agent = Agent(model)
        lookups: list[str] = []

        @agent.tool_plain
        def lookup(query: str) -> str:
            lookups.append(query)
            return f"nothing found for {query}"

        with pytest.raises(BudgetExceeded) as refused:
            await agent.run("find it", model_settings={"max_tokens": 1000})
        assert refused.value.scope == "key"
        assert refused.value.requested_micros > refused.value.remaining_micros
        # Each request holds ~0.2 USD of output but commits only what its usage cost (a
        # few dozen tokens, growing with the history): the loop ran until the committed
        # total left less than one request's hold.
        assert len(lookups) >= 2
        state = key_state(stack, key)
        assert state["reserved_micros"] == 0
        assert state["committed_micros"] == 1_000_000 - refused.value.remaining_micros
        assert state["committed_micros"] > 1_000_000 - refused.value.requested_micros

        failing_model = SpendgateModel(
            FunctionModel(failing), client, vendor="openai", estimate_micros=50_000
        )
        with pytest.raises(RuntimeError, match="upstream is down"):
            await Agent(failing_model).run("hello")
        after = key_state(stack, key)
        assert after["reserved_micros"] == 0
        assert after["committed_micros"] == state["committed_micros"]


async def test_estimate_commits_without_prices_and_retry_reuses_the_hold(
    spendgate_stack: Stack,
) -> None:
    stack = spendgate_stack
    key = issue_key(stack, cap_usd="1.00", label="pydantic-ai-estimate")

    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("done")])

    async with AsyncSpendgateClient(key, gateway_url=stack.gateway_url) as client:
        model = SpendgateModel(
            FunctionModel(answer), client, vendor="openai", estimate_micros=70_000
        )
        result = await Agent(model).run("hi")
        assert result.output == "done"
        assert key_state(stack, key)["committed_micros"] == 70_000

        # The same request twice (outside a run: no run id): the first hold is committed,
        # so the second reserves again under an attempt suffix instead of riding free.
        messages: list[ModelMessage] = []
        first = (await model._reserve(messages, None)).reservation
        again = (await model._reserve(messages, None)).reservation
        assert again.reservation_id == first.reservation_id
        assert again.replayed
        await client.commit(first, actual_micros=1)
        third = (await model._reserve(messages, None)).reservation
        assert third.reservation_id != first.reservation_id
        await client.release(third)


async def test_streamed_requests_are_reserved_and_committed(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    key = issue_key(stack, cap_usd="1.00", label="pydantic-ai-stream")

    async def stream_answer(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        for word in ("budgets ", "hold"):
            yield word

    async with AsyncSpendgateClient(key, gateway_url=stack.gateway_url) as client:
        model = SpendgateModel(
            FunctionModel(stream_function=stream_answer),
            client,
            vendor="openai",
            prices=PRICES,
            max_output_tokens=100,
        )
        async with Agent(model).run_stream("stream it") as run:
            output = await run.get_output()
        assert output == "budgets hold"
        state = key_state(stack, key)
        assert state["reserved_micros"] == 0
        assert state["committed_micros"] > 0


DEGRADE_WHEN_LOW = b"""\
rules:
  - name: half-spent
    when: budget.percent_used >= 50.0
    decision: degrade
    degrade_model: cheap-model
"""
CHEAP_PRICES = TokenPrices(input_micros_per_million=1_000_000, output_micros_per_million=4_000_000)


async def test_a_degrade_rule_switches_the_agent_to_the_cheaper_model(
    spendgate_stack: Stack,
) -> None:
    stack = spendgate_stack
    upload_contracts(stack, DEGRADE_WHEN_LOW)
    key = issue_key(stack, cap_usd="1.00", label="pydantic-ai-degrade")
    seen: list[tuple[str, object]] = []

    def answer_as(name: str) -> Callable[[list[ModelMessage], AgentInfo], ModelResponse]:
        def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
            seen.append((name, (info.model_settings or {}).get("max_tokens")))
            return ModelResponse(parts=[TextPart(f"answered by {name}")])

        return answer

    async with AsyncSpendgateClient(key, gateway_url=stack.gateway_url) as client:
        model = SpendgateModel(
            FunctionModel(answer_as("big-model"), model_name="big-model"),
            client,
            vendor="openai",
            prices=PRICES,
            max_output_tokens=1000,
            fallbacks={
                "cheap-model": Fallback(
                    FunctionModel(answer_as("cheap-model"), model_name="cheap-model"),
                    CHEAP_PRICES,
                )
            },
        )
        agent = Agent(model)
        # Under half spent: the model asked for answers, with the settings asked for.
        assert (await agent.run("one", model_settings={"max_tokens": 1000})).output == (
            "answered by big-model"
        )
        assert model.degraded is None
        spend = await client.reserve(amount_micros=600_000, vendor="openai", operation="x")
        await client.commit(spend, actual_micros=600_000)

        result = await agent.run("two", model_settings={"max_tokens": 100_000})
        assert result.output == "answered by cheap-model"
        assert model.degraded is not None
        rule, model_name, max_tokens = model.degraded
        assert (rule, model_name) == ("half-spent", "cheap-model")
        assert max_tokens is not None
        # Clamped so that input + output at the cheap prices fit in what remained.
        assert max_tokens < 100_000
        assert seen[-1] == ("cheap-model", max_tokens)
        state = key_state(stack, key)
        assert state["reserved_micros"] == 0
        assert state["committed_micros"] <= 1_000_000

        # Without a fallback for the rule's model, the decision reaches the caller.
        bare = SpendgateModel(
            FunctionModel(answer_as("big-model"), model_name="big-model"),
            client,
            vendor="openai",
            prices=PRICES,
        )
        with pytest.raises(DegradeRequired):
            await Agent(bare).run("three")
