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

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        reservation = await self._reserve(messages, model_settings)
        try:
            response = await self.wrapped.request(
                messages, model_settings, model_request_parameters
            )
        except BaseException:
            await self.client.release(reservation, reason="the model request failed")
            raise
        await self._commit(reservation, response.usage)
        return response

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncGenerator[StreamedResponse]:
        reservation = await self._reserve(messages, model_settings)
        try:
            async with self.wrapped.request_stream(
                messages, model_settings, model_request_parameters, run_context
            ) as stream:
                yield stream
        except BaseException:
            await self.client.release(reservation, reason="the model request failed")
            raise
        await self._commit(reservation, stream.usage)

    def estimate(self, messages: list[ModelMessage], model_settings: ModelSettings | None) -> int:
        """The amount reserved for one request, in micro-USD (at least 1)."""
        if self.estimate_micros is not None:
            return max(1, self.estimate_micros)
        assert self.prices is not None
        characters = len(ModelMessagesTypeAdapter.dump_json(messages))
        input_tokens = math.ceil(characters / CHARACTERS_PER_TOKEN)
        output_tokens = (model_settings or {}).get("max_tokens") or self.max_output_tokens
        return max(1, self.prices.cost_micros(input_tokens, output_tokens))

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
    ) -> Reservation:
        amount_micros = self.estimate(messages, model_settings)
        key = self.idempotency_key(messages, model_settings)
        for attempt in range(ATTEMPTS_MAX):
            reservation = await self.client.reserve(
                amount_micros=amount_micros,
                vendor=self.vendor,
                operation=f"pydantic-ai {self.model_name}",
                idempotency_key=key if attempt == 0 else f"{key}:{attempt}",
                model=self.model_name,
                hold_seconds=self.hold_seconds,
            )
            if not reservation.settled:
                return reservation
        raise RuntimeError(f"{ATTEMPTS_MAX} holds of this request were settled already")

    async def _commit(self, reservation: Reservation, usage: RequestUsage) -> None:
        if self.prices is None:
            actual_micros = reservation.amount_micros
        else:
            actual_micros = self.prices.cost_micros(usage.input_tokens, usage.output_tokens)
        await self.client.commit(reservation, actual_micros=actual_micros)


__all__ = ["SpendgateModel", "TokenPrices"]
