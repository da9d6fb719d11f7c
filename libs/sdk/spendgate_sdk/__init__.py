"""Spendgate SDK: reserve an amount before a call, commit its actual cost after, or
release it (docs/sdk.md). Depends only on httpx and msgspec; ``spendgate_sdk.pydantic_ai``
(extra ``[pydantic-ai]``) wraps a Pydantic-AI model so that every request is reserved."""

from spendgate_sdk._client import AsyncSpendgateClient, SpendgateClient, to_micros
from spendgate_sdk._errors import (
    ApprovalRejected,
    ApprovalRequired,
    BudgetExceeded,
    ContractStopped,
    DegradeRequired,
    SpendgateError,
)
from spendgate_sdk._types import KeyState, Reservation, Settlement

__all__ = [
    "ApprovalRejected",
    "ApprovalRequired",
    "AsyncSpendgateClient",
    "BudgetExceeded",
    "ContractStopped",
    "DegradeRequired",
    "KeyState",
    "Reservation",
    "Settlement",
    "SpendgateClient",
    "SpendgateError",
    "to_micros",
]
