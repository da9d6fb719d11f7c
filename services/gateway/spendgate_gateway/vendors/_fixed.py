"""Calls whose cost is not read from the request: operator-set fixed costs, and free calls.

**Fixed costs.** A call that no estimator prices is refused (``403 unpriced_call``) unless
the operator gave a fixed cost for its vendor, method and path in ``SPENDGATE_FIXED_COSTS``,
a JSON object read once at start::

    {"stripe": {"GET /v1/customers/*": "0.0001", "POST /v1/customers": "0"},
     "twilio": {"GET /2010-04-01/Accounts/*/Messages/*.json": "0"}}

Keys are ``"<METHOD> /<path pattern>"``: in a segment, ``*`` matches one or more
characters other than ``/``; a last segment ``**`` matches one or more whole segments.
The first pattern that matches, in the order written, wins. Amounts are USD as decimal
strings (or JSON numbers), parsed exactly with at most six decimals. A vendor's own
estimator always comes first: a fixed cost only prices what the estimator cannot. Every
such estimate records the version ``fixed-<hash of the table>``, so finance can tell
which table priced a hold.

**Free calls.** The ledger refuses to reserve 0 (a reservation of nothing would prove
nothing), yet a free call (a Stripe refund, a fixed cost of ``"0"``) must still be checked
against the ledger: the key's secret, revocation, expiry and vendor allow-list are only
known there, and the call belongs in the audited log. So a free call reserves
:data:`FREE_CALL_HOLD_MICROS` (one micro-USD) and its hold is always released, whatever
the answer. The price of that choice: a key with less than one micro-USD left cannot
make free calls either.

Settling: a vendor's ``settle`` first asks :func:`settle_fixed`, which classifies fixed
and free calls (fixed: 2xx spent at the fixed cost, 4xx free, anything else unknown;
free: always free) and answers None for the vendor's own estimates.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal

import msgspec

from spendgate_common.errors import ConfigurationError, InvalidAmountError
from spendgate_common.money import parse_usd
from spendgate_gateway.vendors._base import Call, Estimate, Outcome, Settlement

# What a free call reserves (and always releases): the ledger refuses an amount of 0.
FREE_CALL_HOLD_MICROS = 1
# Most fixed-cost patterns (every unpriced call is matched against its vendor's list).
FIXED_COSTS_MAX = 256
FIXED_COSTS_VARIABLE = "SPENDGATE_FIXED_COSTS"
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
# Pattern segments: the proxy's safe path characters, plus "*".
_PATTERN_SEGMENT = re.compile(r"^[A-Za-z0-9_.~:@!$'()*+,;=-]{1,200}$")
_decoder = msgspec.json.Decoder(float_hook=Decimal)


@dataclass(frozen=True, slots=True)
class FreeCall:
    """``Estimate.details`` of a free call: its hold is released whatever the answer."""

    reason: str


@dataclass(frozen=True, slots=True)
class FixedCost:
    """One configured pattern; also the ``Estimate.details`` of a call it priced."""

    vendor: str
    method: str
    # As written after the method, e.g. "/v1/customers/*" (the operation's name).
    pattern: str
    amount_micros: int
    regex: re.Pattern[str]

    def matches(self, call: Call) -> bool:
        return call.method == self.method and self.regex.fullmatch(call.path) is not None


@dataclass(frozen=True, slots=True)
class FixedCosts:
    """The parsed ``SPENDGATE_FIXED_COSTS`` table (empty when the variable is not set)."""

    by_vendor: Mapping[str, tuple[FixedCost, ...]]
    # "fixed-<first 16 hex digits of the table's SHA-256>", or "" for an empty table.
    version: str = ""

    def estimate(self, vendor: str, call: Call) -> Estimate | None:
        """The fixed cost of ``call``, or None when no pattern of ``vendor`` matches."""
        for entry in self.by_vendor.get(vendor, ()):
            if entry.matches(call):
                operation = f"{entry.method} {entry.pattern}"
                if entry.amount_micros == 0:
                    return free_call_estimate(operation, self.version, "fixed cost of 0")
                return Estimate(
                    entry.amount_micros, operation, pricing_version=self.version, details=entry
                )
        return None


NO_FIXED_COSTS = FixedCosts(by_vendor={})


def free_call_estimate(operation: str, pricing_version: str, reason: str) -> Estimate:
    """The estimate of a call that costs nothing (see the module's docstring)."""
    return Estimate(
        FREE_CALL_HOLD_MICROS, operation, pricing_version=pricing_version, details=FreeCall(reason)
    )


def settle_fixed(status_code: int, estimate: Estimate) -> Settlement | None:
    """The settlement of a free or fixed-cost call; None for any other estimate."""
    if isinstance(estimate.details, FreeCall):
        return Settlement(Outcome.FREE)
    if isinstance(estimate.details, FixedCost):
        if 200 <= status_code < 300:
            return Settlement(Outcome.SPENT, estimate.details.amount_micros)
        if 400 <= status_code < 500:
            return Settlement(Outcome.FREE)
        return Settlement(Outcome.UNKNOWN)
    return None


def parse_fixed_costs(text: str | None, vendors: Collection[str]) -> FixedCosts:
    """Parse the ``SPENDGATE_FIXED_COSTS`` JSON; raises :class:`ConfigurationError`."""
    if text is None:
        return NO_FIXED_COSTS
    try:
        table = _decoder.decode(text)
    except msgspec.DecodeError as error:
        raise _invalid(f"is not valid JSON: {error}") from None
    if not isinstance(table, dict):
        raise _invalid('must be a JSON object {"<vendor>": {"<METHOD> /<path>": "<usd>"}}')
    by_vendor: dict[str, tuple[FixedCost, ...]] = {}
    for vendor, patterns in table.items():
        if vendor not in vendors:
            raise _invalid(f"names an unknown vendor {vendor!r} (known: {sorted(vendors)})")
        if not isinstance(patterns, dict):
            raise _invalid(f"{vendor}: must map '<METHOD> /<path>' to a USD amount")
        by_vendor[vendor] = tuple(_entry(vendor, key, amount) for key, amount in patterns.items())
    count = sum(len(entries) for entries in by_vendor.values())
    if count > FIXED_COSTS_MAX:
        raise _invalid(f"has {count} patterns; at most {FIXED_COSTS_MAX} are allowed")
    canonical = msgspec.json.encode(
        [
            [entry.vendor, entry.method, entry.pattern, entry.amount_micros]
            for entries in by_vendor.values()
            for entry in entries
        ]
    )
    version = "fixed-" + hashlib.sha256(canonical).hexdigest()[:16] if count else ""
    return FixedCosts(by_vendor=by_vendor, version=version)


def _entry(vendor: str, key: str, amount: object) -> FixedCost:
    method, _, pattern = key.strip().partition(" ")
    pattern = pattern.strip()
    if method not in _METHODS:
        raise _invalid(f"{vendor}: {key!r} must start with one of {sorted(_METHODS)}")
    try:
        micros = parse_usd(amount, field=f"{vendor}: {key!r}", allow_zero=True)
    except InvalidAmountError as error:
        raise _invalid(error.message) from None
    return FixedCost(vendor, method, pattern, micros, _compile(vendor, key, pattern))


def _compile(vendor: str, key: str, pattern: str) -> re.Pattern[str]:
    if not pattern.startswith("/"):
        raise _invalid(f"{vendor}: {key!r}: the path must start with '/'")
    segments = pattern[1:].split("/")
    parts: list[str] = []
    for index, segment in enumerate(segments):
        if not _PATTERN_SEGMENT.match(segment) or segment in (".", ".."):
            raise _invalid(f"{vendor}: {key!r}: {segment!r} is not a plain path segment")
        if segment == "**":
            if index != len(segments) - 1:
                raise _invalid(f"{vendor}: {key!r}: '**' may only be the last segment")
            parts.append("[^/]+(?:/[^/]+)*")
        elif "**" in segment:
            raise _invalid(f"{vendor}: {key!r}: '**' must be a whole segment")
        else:
            parts.append("[^/]+".join(re.escape(piece) for piece in segment.split("*")))
    return re.compile("/".join(parts))


def _invalid(problem: str) -> ConfigurationError:
    return ConfigurationError(FIXED_COSTS_VARIABLE, problem)
