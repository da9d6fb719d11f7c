"""Realistic ledger events for the benchmark, valid for the auditor's rollups.

Per partition: one tenant with keys (some in fleets, zones differ) and budgets (fleet,
vendor, tenant), then a repeating cycle per key: a grant and its commit (every fifth one
above the hold, so with an overrun event), a grant and its release, a denial, a grant
that expires. Holds count against the budgets that apply, as the ledger records them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from spendgate_common.events_v1 import (
    AnyEvent,
    BudgetCreated,
    KeyIssued,
    ReservationCommitted,
    ReservationDenied,
    ReservationExpired,
    ReservationGranted,
    ReservationOverrun,
    ReservationReleased,
)

AT_MS = 1_700_000_000_000
KEYS_PER_PARTITION = 8
ZONES = ("UTC", "America/New_York", "Europe/Berlin", "Asia/Tokyo")
VENDORS = ("openai", "anthropic", "stripe", "twilio")


def partition_events(partition: int, count: int) -> Iterator[AnyEvent]:
    """``count`` events of one partition, in seq order (seq = position + 1)."""
    tenant = f"tenant-{partition}"
    made = 0
    at_ms = AT_MS

    def tick() -> int:
        nonlocal at_ms
        at_ms += 37_000  # spread over days, so day rows roll over
        return at_ms

    setup: list[AnyEvent] = [
        BudgetCreated(AT_MS, "fleet-a", tenant, "fleet", "fleet-a/", 10**15, "total", "UTC"),
        BudgetCreated(AT_MS, "openai", tenant, "vendor", "openai", 10**15, "monthly", "UTC"),
        BudgetCreated(AT_MS, "all", tenant, "tenant", "", 10**15, "daily", "Asia/Tokyo"),
    ]
    for index in range(KEYS_PER_PARTITION):
        setup.append(
            KeyIssued(
                at_ms=AT_MS,
                key_id=f"k{partition:04d}{index:011d}",
                tenant=tenant,
                label=f"fleet-a/run-{index}" if index % 2 == 0 else f"solo/run-{index}",
                secret_sha256="0" * 64,
                cap_micros=10**15,
                window="total",
                timezone=ZONES[index % len(ZONES)],
                expires_at_ms=4_102_444_800_000,
                fleet_labels=["team-blue"] if index % 3 == 0 else [],
            )
        )
    for event in setup[:count]:
        made += 1
        yield event
    cycle = 0
    while made < count:
        index = cycle % KEYS_PER_PARTITION
        key_id = f"k{partition:04d}{index:011d}"
        vendor = VENDORS[cycle % len(VENDORS)]
        budgets = ["all"] + (["fleet-a"] if index % 2 == 0 else [])
        budgets += ["openai"] if vendor == "openai" else []
        for event in _cycle(partition, made, cycle, key_id, vendor, budgets, tick):
            if made == count:
                return
            made += 1
            yield event
        cycle += 1


def _cycle(
    partition: int,
    made: int,
    cycle: int,
    key_id: str,
    vendor: str,
    budgets: list[str],
    tick: Callable[[], int],
) -> Iterator[AnyEvent]:
    seq = made + 1

    def grant(reservation_id: str, amount: int) -> ReservationGranted:
        return ReservationGranted(
            at_ms=tick(),
            reservation_id=reservation_id,
            key_id=key_id,
            amount_micros=amount,
            vendor=vendor,
            operation="POST /v1/chat/completions",
            idempotency_key=f"idem-{partition}-{reservation_id}",
            request_sha256="ab" * 32,
            window_start_at_ms=0,
            expires_at_ms=AT_MS + 900_000,
            budget_ids=budgets,
        )

    first, second = f"rsv_{partition}_{seq}", f"rsv_{partition}_{seq + 1}"
    yield grant(first, 180_000)
    yield grant(second, 90_000)
    over = cycle % 5 == 0
    actual = 200_000 if over else 150_000
    yield ReservationCommitted(tick(), first, key_id, 180_000, actual, 0)
    offset = 3
    if over:
        yield ReservationOverrun(tick(), first, key_id, 180_000, actual, actual - 180_000, budgets)
        offset = 4
    yield ReservationReleased(tick(), second, key_id, 90_000, "vendor_error")
    yield ReservationDenied(
        at_ms=tick(),
        decision_id=f"dcn_{partition}_{seq + offset + 1}",
        key_id=key_id,
        amount_micros=5_000_000,
        vendor=vendor,
        operation="POST /v1/chat/completions",
        idempotency_key=None,
        request_sha256="cd" * 32,
        code="cap_exhausted",
        scope="tenant",
        scope_id="all",
        committed_micros=1,
        reserved_micros=2,
        cap_micros=3,
        window_start_at_ms=0,
    )
    third = f"rsv_{partition}_{seq + offset + 2}"
    yield grant(third, 40_000)
    yield ReservationExpired(tick(), third, key_id, 40_000)
