"""Degrading an LLM call as a contract's ``degrade`` rule says: a cheaper model, and the
output limit clamped so the call's estimate fits what remains of the tightest budget.

Pure: the caller passes the vendor's estimator, and gets the rewritten JSON body (or
None when the vendor's calls cannot be rewritten). The clamp is a binary search over the
output limit with the estimator itself, so it agrees with the reserve that follows by
construction, whatever the estimator counts (choices, predictions, cache writes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from spendgate_gateway.vendors import anthropic, openai
from spendgate_gateway.vendors._base import Estimate

# Where each (vendor, path) takes its output limit, preferred name first: a name the
# caller used is kept; otherwise the first is set.
_OUTPUT_LIMITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("openai", "v1/chat/completions"): ("max_completion_tokens", "max_tokens"),
    ("openai", "v1/responses"): ("max_output_tokens",),
    ("openai", "v1/embeddings"): (),
    ("anthropic", "v1/messages"): ("max_tokens",),
}
# Halvings of the search: enough for any output limit below 2**40 tokens.
CLAMP_SEARCH_STEPS_MAX = 40


@dataclass(frozen=True, slots=True)
class DegradedCall:
    body: bytes
    estimate: Estimate
    model: str
    # The output limit the call now carries (None: not clamped).
    max_tokens: int | None


def model_of(estimate: Estimate) -> str:
    """The model an LLM estimate priced (empty for other vendors' calls)."""
    details = estimate.details
    if isinstance(details, openai.CallDetails | anthropic.CallDetails):
        return details.prices.name
    return ""


def can_degrade(vendor_name: str, path: str) -> bool:
    return (vendor_name, path) in _OUTPUT_LIMITS


def degrade(
    vendor_name: str,
    path: str,
    body: bytes,
    *,
    model: str | None,
    clamp_max_tokens: bool,
    remaining_micros: int,
    estimate: Callable[[bytes], Estimate],
) -> DegradedCall | None:
    """The call rewritten to ``model`` (None keeps it) and, with ``clamp_max_tokens``, its
    output limit lowered until the estimate fits ``remaining_micros`` (at least 1 token:
    a call that does not fit even then is left to the ledger to deny). None when this
    vendor call cannot be rewritten. Raises as the estimator does for a bad request."""
    limits = _OUTPUT_LIMITS.get((vendor_name, path))
    if limits is None:
        return None
    document = msgspec.json.decode(body)
    if not isinstance(document, dict):
        return None
    if model:
        document["model"] = model
    rewritten = msgspec.json.encode(document)
    current = estimate(rewritten)
    if not clamp_max_tokens or not limits or current.amount_micros <= remaining_micros:
        return DegradedCall(rewritten, current, model_of(current), None)
    name = next((n for n in limits if n in document), limits[0])
    given = document.get(name)
    high = given if isinstance(given, int) and given > 0 else _output_tokens_max(current)
    low = 1
    # The largest limit in [1, high] whose estimate fits (low when none fits).
    for _ in range(CLAMP_SEARCH_STEPS_MAX):
        if low >= high:
            break
        middle = (low + high + 1) // 2
        if estimate(msgspec.json.encode({**document, name: middle})).amount_micros <= (
            remaining_micros
        ):
            low = middle
        else:
            high = middle - 1
    rewritten = msgspec.json.encode({**document, name: low})
    clamped = estimate(rewritten)
    return DegradedCall(rewritten, clamped, model_of(clamped), low)


def _output_tokens_max(estimate: Estimate) -> int:
    details = estimate.details
    if isinstance(details, openai.CallDetails | anthropic.CallDetails):
        return details.prices.output_tokens_max
    return 1
