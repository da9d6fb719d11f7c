"""What a vendor module provides: credentials, a pre-call estimate, a post-call settle rule.

Every upstream outcome is classified as one of three :class:`Outcome` values:
``free`` (certainly cost nothing: release the hold), ``spent`` (commit the actual cost),
or ``unknown`` (the call may have cost money: keep the hold until a retry with the same
idempotency key settles it, or until it expires and is settled conservatively as spent).

A streamed answer (server-sent events) is passed to the caller chunk by chunk through the
vendor's :class:`StreamMeter`, which reads the usage on the way and settles at the end.
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
class Call:
    """An agent's request as the proxy received it (path already checked, body bounded)."""

    method: str
    # The upstream path without the vendor prefix and without a leading slash.
    path: str
    query: str
    # Request headers, names in lower case.
    headers: Mapping[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


@dataclass(frozen=True, slots=True)
class Estimate:
    """The cost to reserve before the call, and what the proxy needs to forward and settle it."""

    amount_micros: int
    # The operation's name for the record, e.g. "POST /v1/charges".
    operation: str
    # The version of the price data the estimate used (recorded with the reservation).
    pricing_version: str = ""
    # The body to send upstream instead of the caller's (None: the caller's, unchanged).
    upstream_body: bytes | None = None
    # The upstream path when it differs from the caller's (None: the caller's).
    upstream_path: str | None = None
    # What the settle rule needs to price the answer (the model, its prices, ...).
    details: object = None


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


class StreamMeter(Protocol):
    """Watches one streamed answer; the proxy feeds it every upstream chunk in order."""

    def feed(self, chunk: bytes) -> bytes:
        """Observe upstream bytes; return the bytes the caller gets now (usually ``chunk``;
        a meter may hold back an unfinished event until its end arrives)."""

    def interruption(self, code: str, message: str) -> bytes:
        """What the caller gets when the upstream stream broke off (a read timeout, a cut
        connection): the vendor's own mid-stream error event, so its SDK raises."""

    def finish(self, complete: bool) -> Settlement:
        """Settle once the stream ended (``complete`` is False when it broke off)."""


class Vendor(Protocol):
    name: str
    # Request headers that carry the caller's idempotency key, most preferred first.
    # They are passed upstream unchanged and become the ledger's idempotency key.
    idempotency_headers: tuple[str, ...]
    # Whether the vendor itself answers a retry with the same idempotency key without
    # acting (and charging) twice: only then may a completed call be forwarded again.
    upstream_deduplicates: bool

    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        """The credential the agent presented (where this vendor's SDK puts its key)."""

    def estimate(self, call: Call) -> Estimate:
        """Cost before the call; raises InvalidRequestError / UnpricedCallError."""

    def settle(self, status_code: int, body: bytes, estimate: Estimate) -> Settlement:
        """Classify a complete (not streamed) upstream answer."""

    def stream_meter(self, status_code: int, estimate: Estimate) -> StreamMeter | None:
        """A meter for a streamed answer, or None when this answer is not metered as a stream."""

    def upstream_auth_headers(self, api_key: str) -> dict[str, str]:
        """Headers that carry the real vendor key upstream."""

    def error_object(self, code: str, message: str, status: int) -> dict[str, object]:
        """Our error in the vendor's own error shape (so its SDK raises its usual error)."""

    def refusal_headers(self) -> dict[str, str]:
        """Headers on our refusals (e.g. telling the vendor's SDK not to retry)."""
