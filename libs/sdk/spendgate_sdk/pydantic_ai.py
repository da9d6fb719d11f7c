"""A Pydantic-AI model wrapper that reserves before every model request (extra
``spendgate-sdk[pydantic-ai]``; docs/sdk.md).

``SpendgateModel(wrapped, client, vendor=..., prices=... | estimate_micros=...)`` wraps any
Pydantic-AI model. Before each request (plain or streamed) it reserves either the
caller's per-request ``estimate_micros`` or, from ``prices``, the input tokens estimated
from the messages (4 characters a token) plus ``max_tokens`` (from the model settings,
else ``max_output_tokens``) output tokens. After the response it commits the cost of
``response.usage`` at ``prices`` (the estimate when no prices are given); when the
request fails it releases the hold. A refusal (``BudgetExceeded``, ``ApprovalRequired``,
``ContractStopped``...) propagates out of ``agent.run()``.

A contract's ``degrade`` decision is applied here, not passed on: with ``fallbacks``
(``{"gpt-4o-mini": Fallback(cheaper_model, prices)}``) the request goes to the model the
rule names, its ``max_tokens`` clamped so that the estimate fits what remains, reserved
with ``degraded_by`` set; ``degraded`` on the wrapper says what happened last. Only when
no fallback is configured for the rule's model does ``DegradeRequired`` propagate.

The idempotency key is derived from the run id, the model, the messages and the model
settings, so a retry of the same request whose hold is still open reuses it. A request
whose first hold was already settled (released after a failure, or committed) reserves
again under ``<key>:<attempt>``, at most ``ATTEMPTS_MAX`` times.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pydantic_ai._run_context import get_current_run_context
from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter, ModelResponse
from pydantic_ai.models import KnownModelName, Model, ModelRequestParameters, StreamedResponse
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext
from pydantic_ai.usage import RequestUsage

from spendgate_sdk._client import AsyncSpendgateClient
from spendgate_sdk._errors import DegradeRequired
from spendgate_sdk._types import Reservation

TOKENS_PER_MILLION = 1_000_000
# The usual rough size of a token in English text, for the input estimate only.
CHARACTERS_PER_TOKEN = 4
MAX_OUTPUT_TOKENS_DEFAULT = 4096
# Reserves of one request whose earlier holds were already settled (retries after failures).
ATTEMPTS_MAX = 16


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """A model's prices in micro-USD per million tokens (``$2.50 / 1M`` is ``2_500_000``)."""

    input_micros_per_million: int
    output_micros_per_million: int

    def cost_micros(self, input_tokens: int, output_tokens: int) -> int:
        """The cost of a request in micro-USD, rounded up."""
        total = (
            input_tokens * self.input_micros_per_million
            + output_tokens * self.output_micros_per_million
        )
        return math.ceil(total / TOKENS_PER_MILLION)


@dataclass(frozen=True, slots=True)
class Fallback:
    """The model a ``degrade`` rule switches to (by the rule's ``degrade_model`` name)."""

    model: Model
    prices: TokenPrices | None = None


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one request runs on: its hold, the model and settings it was reserved for."""

    reservation: Reservation
    model: Model
    settings: ModelSettings | None
    prices: TokenPrices | None


class SpendgateModel(WrapperModel):
    """Wraps ``wrapped``: reserve, request, commit (or release on error). Give ``prices``,
    ``estimate_micros`` or both (the estimate then replaces the price-based one)."""

    def __init__(
        self,
        wrapped: Model | KnownModelName | str,
        client: AsyncSpendgateClient,
        *,
        vendor: str,
        prices: TokenPrices | None = None,
        estimate_micros: int | None = None,
        max_output_tokens: int = MAX_OUTPUT_TOKENS_DEFAULT,
        hold_seconds: int | None = None,
        fallbacks: dict[str, Fallback] | None = None,
    ) -> None:
        super().__init__(wrapped)
        if prices is None and estimate_micros is None:
            raise ValueError("give prices, estimate_micros or both")
        self.client = client
        self.vendor = vendor
        self.prices = prices
        self.estimate_micros = estimate_micros
        self.max_output_tokens = max_output_tokens
        self.hold_seconds = hold_seconds
        self.fallbacks = dict(fallbacks or {})
        # The last degrade applied: (rule, model name, max_tokens), None when none was.
        self.degraded: tuple[str, str, int | None] | None = None

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        plan = await self._reserve(messages, model_settings)
        try:
            response = await plan.model.request(messages, plan.settings, model_request_parameters)
        except BaseException:
            await self.client.release(plan.reservation, reason="the model request failed")
            raise
        await self._commit(plan, response.usage)
        return response

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncGenerator[StreamedResponse]:
        plan = await self._reserve(messages, model_settings)
        try:
            async with plan.model.request_stream(
                messages, plan.settings, model_request_parameters, run_context
            ) as stream:
                yield stream
        except BaseException:
            await self.client.release(plan.reservation, reason="the model request failed")
            raise
        await self._commit(plan, stream.usage)

    def estimate(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        prices: TokenPrices | None = None,
    ) -> int:
        """The amount reserved for one request, in micro-USD (at least 1)."""
        prices = prices or self.prices
        if prices is None:
            assert self.estimate_micros is not None
            return max(1, self.estimate_micros)
        if self.estimate_micros is not None and prices is self.prices:
            return max(1, self.estimate_micros)
        output_tokens = (model_settings or {}).get("max_tokens") or self.max_output_tokens
        return max(1, prices.cost_micros(_input_tokens(messages), output_tokens))

    def idempotency_key(
        self, messages: list[ModelMessage], model_settings: ModelSettings | None
    ) -> str:
        """The same run, model, messages and settings give the same key."""
        run_context = get_current_run_context()
        run_id = (run_context.run_id if run_context is not None else None) or ""
        digest = hashlib.sha256()
        for part in (
            run_id.encode("utf-8"),
            self.model_name.encode("utf-8"),
            ModelMessagesTypeAdapter.dump_json(messages),
            json.dumps(dict(model_settings or {}), sort_keys=True, default=str).encode("utf-8"),
        ):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        return f"pydantic-ai:{digest.hexdigest()}"

    async def _reserve(
        self, messages: list[ModelMessage], model_settings: ModelSettings | None
    ) -> _Plan:
        key = self.idempotency_key(messages, model_settings)
        self.degraded = None
        try:
            reservation = await self._hold(
                key, self.estimate(messages, model_settings), self.model_name, None
            )
        except DegradeRequired as degrade:
            return await self._reserve_degraded(degrade, key, messages, model_settings)
        return _Plan(reservation, self.wrapped, model_settings, self.prices)

    async def _reserve_degraded(
        self,
        degrade: DegradeRequired,
        key: str,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
    ) -> _Plan:
        """Apply a ``degrade`` rule: the cheaper model, the output clamped to what remains."""
        if degrade.model is None:
            target = Fallback(self.wrapped, self.prices)
        elif degrade.model in self.fallbacks:
            target = self.fallbacks[degrade.model]
        else:
            raise degrade
        settings: dict[str, Any] = dict(model_settings or {})
        max_tokens = settings.get("max_tokens") or self.max_output_tokens
        prices = target.prices or self.prices
        if degrade.clamp_max_tokens and prices is not None:
            input_micros = prices.cost_micros(_input_tokens(messages), 0)
            room = degrade.remaining_micros - input_micros
            fitting = room * TOKENS_PER_MILLION // max(1, prices.output_micros_per_million)
            if fitting < 1:
                raise degrade
            max_tokens = min(max_tokens, fitting)
        settings["max_tokens"] = max_tokens
        clamped = ModelSettings(**settings)  # type: ignore[typeddict-item]
        amount = self.estimate(messages, clamped, prices)
        if prices is None:
            amount = min(amount, degrade.remaining_micros)
        reservation = await self._hold(
            f"{key}:degraded:{degrade.contract}",
            amount,
            target.model.model_name,
            degrade.contract,
        )
        self.degraded = (degrade.contract, target.model.model_name, max_tokens)
        return _Plan(reservation, target.model, clamped, prices)

    async def _hold(
        self, key: str, amount_micros: int, model_name: str, degraded_by: str | None
    ) -> Reservation:
        for attempt in range(ATTEMPTS_MAX):
            reservation = await self.client.reserve(
                amount_micros=amount_micros,
                vendor=self.vendor,
                operation=f"pydantic-ai {model_name}",
                idempotency_key=key if attempt == 0 else f"{key}:{attempt}",
                model=model_name,
                hold_seconds=self.hold_seconds,
                degraded_by=degraded_by,
            )
            if not reservation.settled:
                return reservation
        raise RuntimeError(f"{ATTEMPTS_MAX} holds of this request were settled already")

    async def _commit(self, plan: _Plan, usage: RequestUsage) -> None:
        if plan.prices is None:
            actual_micros = plan.reservation.amount_micros
        else:
            actual_micros = plan.prices.cost_micros(usage.input_tokens, usage.output_tokens)
        await self.client.commit(plan.reservation, actual_micros=actual_micros)


def _input_tokens(messages: list[ModelMessage]) -> int:
    """A rough input size: the messages' JSON, 4 characters a token (the commit uses the
    real usage; only the hold depends on this)."""
    return math.ceil(len(ModelMessagesTypeAdapter.dump_json(messages)) / CHARACTERS_PER_TOKEN)


__all__ = ["Fallback", "SpendgateModel", "TokenPrices"]
