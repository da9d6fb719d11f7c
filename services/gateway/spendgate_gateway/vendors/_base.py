"""What a vendor module provides: credentials, a pre-call estimate, a post-call settle rule.

Every upstream outcome is classified as one of three :class:`Outcome` values:
``free`` (certainly cost nothing: release the hold), ``spent`` (commit the actual cost),
or ``unknown`` (the call may have cost money: keep the hold until it expires, when it is
settled conservatively as spent).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from spendgate_common.errors import InvalidRequestError


class Outcome(enum.Enum):
    FREE = "free"
    SPENT = "spent"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Estimate:
    """The cost to reserve before the call, and the operation's name for the record."""

    amount_micros: int
    operation: str


@dataclass(frozen=True, slots=True)
class Settlement:
    outcome: Outcome
    # The actual cost when outcome is SPENT.
    actual_micros: int = 0


class UnpricedCallError(InvalidRequestError):
    def __init__(self, vendor: str, method: str, path: str) -> None:
        super().__init__(
            "unpriced_call",
            f"Spendgate has no cost estimate for {method} /{path} on {vendor}; "
            "the call was not forwarded",
            status=403,
        )


class Vendor(Protocol):
    name: str

    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        """The credential the agent presented (where this vendor's SDK puts its key)."""

    def estimate(self, method: str, path: str, content_type: str, body: bytes) -> Estimate:
        """Cost before the call; raises InvalidRequestError / UnpricedCallError."""

    def settle(self, status_code: int, estimate: Estimate) -> Settlement:
        """Classify the upstream's answer."""

    def upstream_auth_headers(self, api_key: str) -> dict[str, str]:
        """Headers that carry the real vendor key upstream."""

    def error_object(self, code: str, message: str, status: int) -> dict[str, object]:
        """Our error in the vendor's own error shape (so its SDK raises its usual error)."""

    def refusal_headers(self) -> dict[str, str]:
        """Headers on our refusals (e.g. telling the vendor's SDK not to retry)."""
