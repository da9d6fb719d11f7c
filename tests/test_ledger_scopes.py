"""The ledger's budget scopes, windows, revocation, overruns, expiry and retention.

Pure tests of :class:`PartitionState` (no I/O), driven like the partition loop drives it:
``decide`` then ``apply`` of every event, with the encoded log kept so that every
scenario ends by rebuilding the state from the log and comparing it with the live one.
A Hypothesis state machine checks every meter (keys and budgets) against a small model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import cast
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from spendgate_common.events_v1 import (
    BudgetClosed,
    BudgetCreated,
    BudgetScope,
    BudgetUpdated,
    KeyRevoked,
    ReservationCommitted,
    ReservationDenied,
    ReservationExpired,
    ReservationGranted,
    ReservationOverrun,
    Window,
    decode_event,
    encode_event,
)
from spendgate_common.ledger_v1 import (
    AnyCommand,
    AnyResult,
    BudgetState,
    CloseBudget,
    CreateBudget,
    Denied,
    Done,
    Granted,
    IssueKey,
    KeyCreated,
    KeyState,
    QueryBudget,
    QueryKey,
    RevokeKey,
    Settled,
    UpdateBudget,
)
from spendgate_common.limits import (
    ALLOWED_VENDORS_PER_KEY_MAX,
    AMOUNT_MICROS_MAX,
    BUDGETS_PER_TENANT_MAX,
    FLEET_LABELS_PER_KEY_MAX,
    LABEL_CHARS_MAX,
)
from spendgate_common.partitioning import partition_for_tenant
from spendgate_common.vault_keys import KEY_ID_PATTERN
from spendgate_ledger import PartitionState
from spendgate_ledger._state import Sweep
from tests.test_ledger_state import (
    DAY_MS,
    HOLD_DEFAULT_MS,
    HOUR_MS,
    K1,
    K2,
    NOW_MS,
    PARTITION,
    PARTITION_COUNT,
    SECRET_SHA256,
    TENANT,
    Ledger,
    commit,
    failed,
    granted,
    release,
    reserve,
)

K3 = "keythreeaaaaaaaa"
K4 = "keyfouraaaaaaaaa"
assert all(KEY_ID_PATTERN.fullmatch(key_id) for key_id in (K1, K2, K3, K4))


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    """Milliseconds since the epoch of a UTC wall-clock time (written out for the reader)."""
    return int(datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()) * 1000


FAR_FUTURE_MS = utc_ms(2030, 1, 1)


def _neighbour_of(tenant: str) -> str:
    """Another tenant whose keys and budgets live in the same partition as ``tenant``."""
    partition = partition_for_tenant(tenant, PARTITION_COUNT)
    for index in range(10_000):
        neighbour = f"neighbour-{index}"
        if partition_for_tenant(neighbour, PARTITION_COUNT) == partition:
            return neighbour
    raise AssertionError("no neighbour found")  # pragma: no cover


NEIGHBOUR = _neighbour_of(TENANT)
assert partition_for_tenant(TENANT, PARTITION_COUNT) == PARTITION
assert partition_for_tenant(NEIGHBOUR, PARTITION_COUNT) == PARTITION


@dataclass
class ScopeLedger(Ledger):
    """:class:`Ledger` with a clock (a command runs at the last time given), that also runs
    the internal ``Sweep`` and rebuilds with the live state's ``retention_ms``."""

    clock_ms: int = NOW_MS

    def run(self, command: AnyCommand | Sweep, now_ms: int | None = None) -> AnyResult:
        if now_ms is not None:
            self.clock_ms = now_ms
        decision = self.state.decide(command, self.clock_ms)
        for event in decision.events:
            seq = self.state.last_seq + 1
            self.state.apply(seq, event)
            self.log.append((seq, encode_event(event)))
        return decision.result

    def rebuilt(self) -> PartitionState:
        live = self.state
        state = PartitionState(
            live.partition,
            live.partition_count,
            live.default_hold_ms,
            retention_ms=live.retention_ms,
            settled_retention_ms=live.settled_retention_ms,
        )
        for seq, body in self.log:
            state.apply(seq, decode_event(body))
        return state

    def assert_replays(self) -> None:
        """The log has no gaps and rebuilding from its bytes gives the live state."""
        assert [seq for seq, _ in self.log] == list(range(1, self.state.last_seq + 1))
        assert self.rebuilt() == self.state

    def key(self, key_id: str, now_ms: int | None = None, tenant: str = TENANT) -> KeyState:
        result = self.run(QueryKey(tenant=tenant, key_id=key_id), now_ms)
        assert isinstance(result, KeyState), result
        return result

    def budget(
        self, budget_id: str, now_ms: int | None = None, tenant: str = TENANT
    ) -> BudgetState:
        result = self.run(QueryBudget(tenant=tenant, budget_id=budget_id), now_ms)
        assert isinstance(result, BudgetState), result
        return result


def issue_key(
    key_id: str,
    *,
    label: str = "run-1",
    cap: int = 10_000_000,
    window: Window = "total",
    timezone: str = "UTC",
    tenant: str = TENANT,
    expires_at_ms: int = FAR_FUTURE_MS,
    allowed_vendors: list[str] | None = None,
    fleet_labels: tuple[str, ...] = (),
) -> IssueKey:
    return IssueKey(
        tenant=tenant,
        key_id=key_id,
        label=label,
        secret_sha256=SECRET_SHA256,
        cap_micros=cap,
        window=window,
        timezone=timezone,
        expires_at_ms=expires_at_ms,
        allowed_vendors=allowed_vendors,
        fleet_labels=list(fleet_labels),
    )


def create_budget(
    budget_id: str,
    scope: BudgetScope,
    match: str,
    cap: int,
    window: Window = "total",
    timezone: str = "UTC",
    tenant: str = TENANT,
) -> CreateBudget:
    return CreateBudget(
        tenant=tenant,
        budget_id=budget_id,
        scope=scope,
        match=match,
        cap_micros=cap,
        window=window,
        timezone=timezone,
    )


def denied(result: AnyResult) -> Denied:
    assert isinstance(result, Denied), result
    return result


def budget_state(result: AnyResult) -> BudgetState:
    assert isinstance(result, BudgetState), result
    return result


def usage(state: KeyState | BudgetState) -> tuple[int, int]:
    """``(committed, reserved)`` in the state's window."""
    return state.committed_micros, state.reserved_micros


def fleet_ledger() -> ScopeLedger:
    """Two keys of fleet ``team-a/`` sharing a 0.50 USD daily budget, and one outsider."""
    ledger = ScopeLedger()
    assert isinstance(ledger.run(issue_key(K1, label="team-a/run-1")), KeyCreated)
    assert isinstance(ledger.run(issue_key(K2, label="team-a/run-2")), KeyCreated)
    assert isinstance(ledger.run(issue_key(K3, label="team-b/run-1")), KeyCreated)
    created = ledger.run(create_budget("team-a", "fleet", "team-a/", 500_000, "daily"))
    assert budget_state(created).window_start_at_ms == utc_ms(2025, 3, 10)
    return ledger


# ------------------------------------------------------------------------------- fleet


def test_fleet_budget_shared_by_two_keys_denies_the_second_key() -> None:
    ledger = fleet_ledger()
    first = granted(ledger.run(reserve(300_000, key_id=K1)))
    # The grant answers with the key's own numbers; the fleet meter holds the amount too.
    assert (first.committed_micros, first.reserved_micros, first.cap_micros) == (
        0,
        300_000,
        10_000_000,
    )
    event = ledger.events()[-1]
    assert isinstance(event, ReservationGranted)
    assert event.budget_ids == ["team-a"]
    seq = ledger.state.last_seq + 1
    refusal = denied(ledger.run(reserve(250_000, key_id=K2)))
    assert refusal == Denied(
        decision_id=f"dcn_{PARTITION}_{seq}",
        code="cap_exhausted",
        message="Spendgate: cap exhausted for fleet budget 'team-a': requested $0.25, "
        "remaining $0.20 of $0.50 (daily window)",
        scope="fleet",
        scope_id="team-a",
        committed_micros=0,
        reserved_micros=300_000,
        cap_micros=500_000,
        requested_micros=250_000,
    )
    denial = ledger.events()[-1]
    assert isinstance(denial, ReservationDenied)
    assert (denial.scope, denial.scope_id, denial.window_start_at_ms) == (
        "fleet",
        "team-a",
        utc_ms(2025, 3, 10),
    )
    # The second key's own meter took nothing; the rest of the fleet cap still fits.
    assert usage(ledger.key(K2)) == (0, 0)
    second = granted(ledger.run(reserve(200_000, key_id=K2)))
    ledger.run(commit(first.reservation_id, 280_000, key_id=K1))
    assert usage(ledger.budget("team-a")) == (280_000, 200_000)
    assert denied(ledger.run(reserve(20_001, key_id=K2))).scope_id == "team-a"
    granted(ledger.run(reserve(20_000, key_id=K1)))
    # A key of another fleet does not draw on it.
    outsider = granted(ledger.run(reserve(900_000, key_id=K3)))
    assert usage(ledger.budget("team-a")) == (280_000, 220_000)
    assert ledger.key(K3).budget_ids == []
    assert ledger.key(K1).budget_ids == ["team-a"]
    ledger.run(release(second.reservation_id, key_id=K2))
    ledger.run(release(outsider.reservation_id, key_id=K3))
    assert usage(ledger.budget("team-a")) == (280_000, 20_000)
    ledger.assert_replays()


def test_fleet_labels_draw_on_a_budget_the_label_does_not_match() -> None:
    ledger = fleet_ledger()
    guest = issue_key(K4, label="ci/nightly", fleet_labels=("ops/x", "team-a/guest"))
    assert isinstance(ledger.run(guest), KeyCreated)
    assert ledger.key(K4).budget_ids == ["team-a"]
    assert ledger.key(K4).fleet_labels == ["ops/x", "team-a/guest"]
    granted(ledger.run(reserve(400_000, key_id=K1)))
    refusal = denied(ledger.run(reserve(100_001, key_id=K4)))
    assert (refusal.scope, refusal.scope_id) == ("fleet", "team-a")
    assert (refusal.reserved_micros, refusal.cap_micros) == (400_000, 500_000)
    rid = granted(ledger.run(reserve(100_000, key_id=K4))).reservation_id
    event = ledger.events()[-1]
    assert isinstance(event, ReservationGranted)
    assert event.budget_ids == ["team-a"]
    # The guest's hold now blocks the fleet's own keys.
    assert denied(ledger.run(reserve(1, key_id=K2))).scope == "fleet"
    ledger.run(commit(rid, 60_000, key_id=K4))
    assert usage(ledger.budget("team-a")) == (60_000, 400_000)
    # A fleet label matching no budget changes nothing.
    other = issue_key("keyfiveaaaaaaaaa", label="ci/nightly", fleet_labels=("team-ab",))
    assert isinstance(ledger.run(other), KeyCreated)
    assert ledger.key("keyfiveaaaaaaaaa").budget_ids == []
    granted(ledger.run(reserve(900_000, key_id="keyfiveaaaaaaaaa")))
    ledger.assert_replays()


# ------------------------------------------------------------------------------ vendor


def test_vendor_budget_applies_only_to_its_vendor() -> None:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1, label="team-a/run-1"))
    ledger.run(issue_key(K2, label="team-b/run-1"))
    ledger.run(create_budget("openai-cap", "vendor", "openai", 300_000))
    rid = granted(ledger.run(reserve(200_000, key_id=K1, vendor="openai"))).reservation_id
    # The vendor budget is shared by every key of the tenant...
    refusal = denied(ledger.run(reserve(100_001, key_id=K2, vendor="openai")))
    assert (refusal.scope, refusal.scope_id) == ("vendor", "openai-cap")
    assert (refusal.committed_micros, refusal.reserved_micros, refusal.cap_micros) == (
        0,
        200_000,
        300_000,
    )
    assert "vendor budget 'openai-cap'" in refusal.message
    granted(ledger.run(reserve(100_000, key_id=K2, vendor="openai")))
    # ...and other vendors do not draw on it.
    other = granted(ledger.run(reserve(5_000_000, key_id=K2, vendor="anthropic")))
    event = ledger.events()[-1]
    assert isinstance(event, ReservationGranted)
    assert event.budget_ids == []
    assert usage(ledger.budget("openai-cap")) == (0, 300_000)
    ledger.run(commit(rid, 150_000, key_id=K1))
    ledger.run(commit(other.reservation_id, 4_000_000, key_id=K2))
    assert usage(ledger.budget("openai-cap")) == (150_000, 100_000)
    # A key's state lists the budgets it always draws on, not the per-vendor ones.
    assert ledger.key(K1).budget_ids == []
    ledger.assert_replays()


# ------------------------------------------------------------------------------ tenant


def test_tenant_budget_applies_to_every_key_of_its_tenant_only() -> None:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1, label="team-a/run-1"))
    ledger.run(issue_key(K2, label="team-b/run-1"))
    ledger.run(issue_key(K3, label="team-a/run-1", tenant=NEIGHBOUR))
    assert isinstance(ledger.run(create_budget("all", "tenant", "", 400_000)), BudgetState)
    assert ledger.key(K1).budget_ids == ["all"]
    assert ledger.key(K3, tenant=NEIGHBOUR).budget_ids == []
    granted(ledger.run(reserve(250_000, key_id=K1, vendor="openai")))
    refusal = denied(ledger.run(reserve(150_001, key_id=K2, vendor="anthropic")))
    assert (refusal.scope, refusal.scope_id) == ("tenant", "all")
    assert (refusal.reserved_micros, refusal.cap_micros) == (250_000, 400_000)
    assert "tenant budget 'all'" in refusal.message
    granted(ledger.run(reserve(150_000, key_id=K2, vendor="anthropic")))
    # The neighbour shares the partition, not the budget.
    neighbour_rid = granted(
        ledger.run(reserve(2_000_000, key_id=K3, tenant=NEIGHBOUR))
    ).reservation_id
    assert usage(ledger.budget("all")) == (0, 400_000)
    # The neighbour neither sees nor changes it.
    for command in (
        QueryBudget(tenant=NEIGHBOUR, budget_id="all"),
        UpdateBudget(tenant=NEIGHBOUR, budget_id="all", cap_micros=1),
        CloseBudget(tenant=NEIGHBOUR, budget_id="all"),
    ):
        failed(ledger.run(command), "budget_not_found")
    ledger.run(release(neighbour_rid, key_id=K3, tenant=NEIGHBOUR))
    # And the neighbour's own tenant budget does not apply to us.
    ledger.run(create_budget("mine", "tenant", "", 2_000_000, tenant=NEIGHBOUR))
    assert ledger.key(K3, tenant=NEIGHBOUR).budget_ids == ["mine"]
    assert ledger.key(K1).budget_ids == ["all"]
    granted(ledger.run(reserve(2_000_000, key_id=K3, tenant=NEIGHBOUR)))
    refusal = denied(ledger.run(reserve(1, key_id=K3, tenant=NEIGHBOUR)))
    assert (refusal.scope, refusal.scope_id, refusal.reserved_micros) == (
        "tenant",
        "mine",
        2_000_000,
    )
    assert denied(ledger.run(reserve(1, key_id=K1))).scope_id == "all"
    assert usage(ledger.budget("all")) == (0, 400_000)
    assert usage(ledger.budget("mine", tenant=NEIGHBOUR)) == (0, 2_000_000)
    ledger.assert_replays()


def test_budget_ids_are_per_tenant() -> None:
    ledger = ScopeLedger()
    budget_state(ledger.run(create_budget("monthly", "tenant", "", 1_000_000, "monthly")))
    created = ledger.run(create_budget("monthly", "tenant", "", 500, tenant=NEIGHBOUR))
    assert isinstance(created, BudgetState), created
    assert ledger.budget("monthly").cap_micros == 1_000_000


# ------------------------------------------------------------------ order and atomicity

SCOPE_CHECK_CASES: list[tuple[frozenset[str], str | None]] = [
    (frozenset({"key", "fleet", "vendor", "tenant"}), "key"),
    (frozenset({"fleet", "vendor", "tenant"}), "fleet"),
    (frozenset({"vendor", "tenant"}), "vendor"),
    (frozenset({"tenant"}), "tenant"),
    (frozenset({"key", "tenant"}), "key"),
    (frozenset({"fleet", "tenant"}), "fleet"),
    (frozenset(), None),
]
SCOPE_IDS = {"key": K1, "fleet": "fleet-a", "vendor": "openai-cap", "tenant": "all"}


@pytest.mark.parametrize(("tight", "expected"), SCOPE_CHECK_CASES)
def test_scopes_are_checked_key_fleet_vendor_tenant_and_atomically(
    tight: frozenset[str], expected: str | None
) -> None:
    """Tight caps have 0.10 USD room, loose ones 1.00 USD; a 0.15 USD reserve is denied
    by the first tight scope in the order key, fleet, vendor, tenant, and holds nothing."""

    def cap(scope: str) -> int:
        return 100_000 if scope in tight else 1_000_000

    ledger = ScopeLedger()
    ledger.run(issue_key(K1, label="team-a/run-1", cap=cap("key")))
    ledger.run(create_budget("fleet-a", "fleet", "team-a/", cap("fleet")))
    ledger.run(create_budget("openai-cap", "vendor", "openai", cap("vendor")))
    ledger.run(create_budget("all", "tenant", "", cap("tenant")))
    result = ledger.run(reserve(150_000, key_id=K1, vendor="openai"))
    if expected is None:
        granted(result)
        reserved = 150_000
    else:
        refusal = denied(result)
        assert (refusal.scope, refusal.scope_id) == (expected, SCOPE_IDS[expected])
        assert (refusal.reserved_micros, refusal.cap_micros) == (0, 100_000)
        assert refusal.requested_micros == 150_000
        reserved = 0
    assert usage(ledger.key(K1)) == (0, reserved)
    for budget_id in ("fleet-a", "openai-cap", "all"):
        assert usage(ledger.budget(budget_id)) == (0, reserved), budget_id
    # What fits every cap is held on every one of them, in one event.
    granted(ledger.run(reserve(1 if expected is None else 100_000, key_id=K1)))
    event = ledger.events()[-1]
    assert isinstance(event, ReservationGranted)
    assert event.budget_ids == ["fleet-a", "openai-cap", "all"]
    ledger.assert_replays()


def test_key_state_lists_the_open_budgets_it_draws_on() -> None:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1, label="team-a/run-1", fleet_labels=("shared/x",)))
    ledger.run(create_budget("all", "tenant", "", 1_000_000))
    ledger.run(create_budget("shared", "fleet", "shared/", 1_000_000))
    ledger.run(create_budget("openai-cap", "vendor", "openai", 1_000_000))
    ledger.run(create_budget("team-a", "fleet", "team-a", 1_000_000))
    ledger.run(create_budget("team-b", "fleet", "team-b", 1_000_000))
    # Fleet budgets first (in creation order), then tenant budgets; never vendor ones.
    assert ledger.key(K1).budget_ids == ["shared", "team-a", "all"]
    ledger.run(CloseBudget(tenant=TENANT, budget_id="shared"))
    assert ledger.key(K1).budget_ids == ["team-a", "all"]
    granted(ledger.run(reserve(1, key_id=K1, vendor="openai")))
    event = ledger.events()[-1]
    assert isinstance(event, ReservationGranted)
    assert event.budget_ids == ["team-a", "openai-cap", "all"]
    ledger.assert_replays()


# ---------------------------------------------------------------- closing and updating


def test_closing_a_budget_stops_it_applying_while_its_holds_settle_into_it() -> None:
    ledger = fleet_ledger()
    held = granted(ledger.run(reserve(300_000, key_id=K1))).reservation_id
    expiring = granted(ledger.run(reserve(150_000, key_id=K1, hold_ms=1_000))).reservation_id
    assert denied(ledger.run(reserve(100_000, key_id=K2))).scope_id == "team-a"
    closed = budget_state(ledger.run(CloseBudget(tenant=TENANT, budget_id="team-a")))
    assert closed.closed
    assert usage(closed) == (0, 450_000)
    assert ledger.events()[-1] == BudgetClosed(at_ms=NOW_MS, tenant=TENANT, budget_id="team-a")
    assert ledger.key(K2).budget_ids == []
    # New reserves no longer draw on it...
    fresh = granted(ledger.run(reserve(600_000, key_id=K2)))
    event = ledger.events()[-1]
    assert isinstance(event, ReservationGranted)
    assert event.budget_ids == []
    assert usage(ledger.budget("team-a")) == (0, 450_000)
    # ...but the holds it counted still settle into it: commit, overrun, expiry.
    ledger.run(commit(held, 350_000, key_id=K1))
    ledger.run(Sweep(), NOW_MS + 1_000)
    ledger.run(commit(fresh.reservation_id, 600_000, key_id=K2), NOW_MS + 1_000)
    state = ledger.budget("team-a", NOW_MS + 1_000)
    assert usage(state) == (350_000 + 150_000, 0)
    assert state.overrun_micros == 50_000
    assert state.closed
    failed(ledger.run(commit(expiring, 1, key_id=K1), NOW_MS + 1_000), "already_settled")
    ledger.assert_replays()


def test_a_closed_budget_refuses_changes_and_keeps_its_id() -> None:
    ledger = fleet_ledger()
    ledger.run(CloseBudget(tenant=TENANT, budget_id="team-a"))
    log_length = len(ledger.log)
    failed(ledger.run(CloseBudget(tenant=TENANT, budget_id="team-a")), "budget_closed")
    update = UpdateBudget(tenant=TENANT, budget_id="team-a", cap_micros=5)
    failed(ledger.run(update), "budget_closed")
    failed(ledger.run(create_budget("team-a", "fleet", "team-a/", 5)), "budget_exists")
    assert len(ledger.log) == log_length
    assert ledger.budget("team-a").cap_micros == 500_000
    ledger.assert_replays()


def test_raising_a_cap_lets_more_fit() -> None:
    ledger = fleet_ledger()
    granted(ledger.run(reserve(500_000, key_id=K1)))
    assert denied(ledger.run(reserve(100_000, key_id=K2))).cap_micros == 500_000
    raised = budget_state(ledger.run(UpdateBudget(TENANT, budget_id="team-a", cap_micros=700_000)))
    assert (raised.cap_micros, *usage(raised)) == (700_000, 0, 500_000)
    assert ledger.events()[-1] == BudgetUpdated(
        at_ms=NOW_MS,
        tenant=TENANT,
        budget_id="team-a",
        previous_cap_micros=500_000,
        cap_micros=700_000,
    )
    granted(ledger.run(reserve(200_000, key_id=K2)))
    refusal = denied(ledger.run(reserve(1, key_id=K2)))
    assert (refusal.reserved_micros, refusal.cap_micros) == (700_000, 700_000)
    ledger.assert_replays()


def test_lowering_a_cap_below_use_denies_further_reserves_and_keeps_the_holds() -> None:
    ledger = fleet_ledger()
    spent = granted(ledger.run(reserve(200_000, key_id=K1))).reservation_id
    ledger.run(commit(spent, 200_000, key_id=K1))
    held = granted(ledger.run(reserve(250_000, key_id=K2))).reservation_id
    lowered = budget_state(ledger.run(UpdateBudget(TENANT, budget_id="team-a", cap_micros=300_000)))
    # The holds are untouched: the budget is over its new cap until they settle.
    assert (lowered.cap_micros, *usage(lowered)) == (300_000, 200_000, 250_000)
    assert held in ledger.state.holds
    refusal = denied(ledger.run(reserve(1, key_id=K1)))
    assert (refusal.scope_id, refusal.committed_micros, refusal.reserved_micros) == (
        "team-a",
        200_000,
        250_000,
    )
    assert "remaining $0.00 of $0.30" in refusal.message
    assert ledger.run(commit(held, 50_000, key_id=K2)) == Settled(held, 50_000, 200_000)
    assert usage(ledger.budget("team-a")) == (250_000, 0)
    denied(ledger.run(reserve(50_001, key_id=K1)))
    granted(ledger.run(reserve(50_000, key_id=K1)))
    ledger.assert_replays()


def test_update_and_close_refusals() -> None:
    ledger = fleet_ledger()
    log_length = len(ledger.log)
    for cap in (0, -1, AMOUNT_MICROS_MAX + 1):
        update = UpdateBudget(tenant=TENANT, budget_id="team-a", cap_micros=cap)
        failed(ledger.run(update), "invalid_amount")
    for command in (
        UpdateBudget(tenant=TENANT, budget_id="nope", cap_micros=1),
        CloseBudget(tenant=TENANT, budget_id="nope"),
        QueryBudget(tenant=TENANT, budget_id="nope"),
    ):
        failed(ledger.run(command), "budget_not_found")
    assert len(ledger.log) == log_length
    top = UpdateBudget(tenant=TENANT, budget_id="team-a", cap_micros=AMOUNT_MICROS_MAX)
    assert budget_state(ledger.run(top)).cap_micros == AMOUNT_MICROS_MAX
    ledger.assert_replays()


# ----------------------------------------------------------------------------- windows

# 2025-03-09 is 23 hours long in New York (DST starts), 2025-11-02 is 25 hours long.
NY_DST_DAYS = [
    pytest.param(utc_ms(2025, 3, 9, 5), utc_ms(2025, 3, 10, 4), 23, id="spring-23h"),
    pytest.param(utc_ms(2025, 11, 2, 4), utc_ms(2025, 11, 3, 5), 25, id="fall-25h"),
]


@pytest.mark.parametrize(("day_start_ms", "next_day_start_ms", "hours"), NY_DST_DAYS)
def test_daily_budget_rolls_over_at_new_york_midnight_on_dst_days(
    day_start_ms: int, next_day_start_ms: int, hours: int
) -> None:
    assert next_day_start_ms - day_start_ms == hours * HOUR_MS
    ledger = ScopeLedger()
    ledger.run(issue_key(K1), day_start_ms + HOUR_MS)
    ledger.run(create_budget("daily", "tenant", "", 500_000, "daily", "America/New_York"))
    assert ledger.budget("daily", day_start_ms + HOUR_MS).window_start_at_ms == day_start_ms
    rid = granted(ledger.run(reserve(500_000), day_start_ms + HOUR_MS)).reservation_id
    ledger.run(commit(rid, 500_000), day_start_ms + HOUR_MS)
    # 24 hours after midnight is still the same day on the 25-hour day.
    after_24_hours = day_start_ms + DAY_MS
    if after_24_hours < next_day_start_ms:
        assert denied(ledger.run(reserve(1), after_24_hours)).scope == "tenant"
    refusal = denied(ledger.run(reserve(1), next_day_start_ms - 1))
    assert (refusal.scope_id, refusal.committed_micros) == ("daily", 500_000)
    event = ledger.events()[-1]
    assert isinstance(event, ReservationDenied)
    assert event.window_start_at_ms == day_start_ms
    granted(ledger.run(reserve(500_000), next_day_start_ms))
    state = ledger.budget("daily", next_day_start_ms)
    assert state.window_start_at_ms == next_day_start_ms
    assert usage(state) == (0, 500_000)
    ledger.assert_replays()


MONTH_ENDS = [
    # New York, winter: March starts at 05:00 UTC (EST, UTC-5).
    pytest.param("America/New_York", utc_ms(2025, 2, 1, 5), utc_ms(2025, 3, 1, 5), id="ny-feb"),
    # New York, November: starts in EDT (04:00 UTC), ends in EST (05:00 UTC).
    pytest.param("America/New_York", utc_ms(2025, 11, 1, 4), utc_ms(2025, 12, 1, 5), id="ny-nov"),
    # Kolkata (UTC+5:30): March starts on 28 February at 18:30 UTC.
    pytest.param("Asia/Kolkata", utc_ms(2025, 1, 31, 18, 30), utc_ms(2025, 2, 28, 18, 30), id="in"),
]


@pytest.mark.parametrize(("timezone", "month_start_ms", "next_month_start_ms"), MONTH_ENDS)
def test_monthly_budget_rolls_over_at_local_month_end(
    timezone: str, month_start_ms: int, next_month_start_ms: int
) -> None:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1), month_start_ms)
    ledger.run(create_budget("monthly", "vendor", "openai", 700_000, "monthly", timezone))
    assert ledger.budget("monthly", month_start_ms).window_start_at_ms == month_start_ms
    first = granted(ledger.run(reserve(400_000), month_start_ms)).reservation_id
    ledger.run(commit(first, 400_000), month_start_ms + DAY_MS)
    mid_month_ms = month_start_ms + 20 * DAY_MS
    second = granted(ledger.run(reserve(300_000), mid_month_ms)).reservation_id
    ledger.run(commit(second, 300_000), mid_month_ms)
    refusal = denied(ledger.run(reserve(1), next_month_start_ms - 1))
    assert (refusal.scope, refusal.committed_micros, refusal.cap_micros) == (
        "vendor",
        700_000,
        700_000,
    )
    assert "(monthly window)" in refusal.message
    granted(ledger.run(reserve(700_000), next_month_start_ms))
    state = ledger.budget("monthly", next_month_start_ms)
    assert (state.window_start_at_ms, *usage(state)) == (next_month_start_ms, 0, 700_000)
    ledger.assert_replays()


def test_the_same_instant_is_a_new_month_in_kolkata_but_not_in_new_york() -> None:
    """Key (daily, Kolkata) and budgets (monthly, Kolkata and New York) roll on their own."""
    kolkata_march_ms = utc_ms(2025, 2, 28, 18, 30)
    new_york_march_ms = utc_ms(2025, 3, 1, 5)
    ledger = ScopeLedger()
    start_ms = utc_ms(2025, 2, 28, 12)
    ledger.run(issue_key(K1, cap=600_000, window="daily", timezone="Asia/Kolkata"), start_ms)
    ledger.run(create_budget("in", "tenant", "", 1_000_000, "monthly", "Asia/Kolkata"))
    ledger.run(create_budget("ny", "vendor", "openai", 800_000, "monthly", "America/New_York"))
    rid = granted(ledger.run(reserve(600_000), start_ms)).reservation_id
    ledger.run(commit(rid, 600_000), start_ms)
    assert denied(ledger.run(reserve(1), kolkata_march_ms - 1)).scope == "key"
    # Kolkata midnight: the key's day and the Kolkata month are new, New York's month is not.
    refusal = denied(ledger.run(reserve(200_001), kolkata_march_ms))
    assert (refusal.scope_id, refusal.committed_micros) == ("ny", 600_000)
    assert usage(ledger.key(K1, kolkata_march_ms)) == (0, 0)
    assert usage(ledger.budget("in", kolkata_march_ms)) == (0, 0)
    assert usage(ledger.budget("ny", kolkata_march_ms)) == (600_000, 0)
    # Another vendor does not draw on the New York budget.
    granted(ledger.run(reserve(600_000, vendor="anthropic"), kolkata_march_ms))
    assert ledger.key(K1, kolkata_march_ms).window_start_at_ms == kolkata_march_ms
    assert ledger.budget("ny", new_york_march_ms).window_start_at_ms == new_york_march_ms
    assert usage(ledger.budget("ny", new_york_march_ms)) == (0, 0)
    ledger.assert_replays()


def test_hold_across_midnight_counts_in_the_budgets_new_window() -> None:
    kolkata_midnight_ms = utc_ms(2025, 3, 10, 18, 30)
    ledger = ScopeLedger()
    ledger.run(issue_key(K1), kolkata_midnight_ms - HOUR_MS)
    ledger.run(create_budget("day", "tenant", "", 1_000_000, "daily", "Asia/Kolkata"))
    spent = granted(ledger.run(reserve(300_000), kolkata_midnight_ms - HOUR_MS)).reservation_id
    ledger.run(commit(spent, 300_000), kolkata_midnight_ms - HOUR_MS)
    held = granted(ledger.run(reserve(600_000), kolkata_midnight_ms - 1)).reservation_id
    # After midnight the spend is gone but the open hold still counts.
    refusal = denied(ledger.run(reserve(400_001), kolkata_midnight_ms))
    assert (refusal.committed_micros, refusal.reserved_micros) == (0, 600_000)
    assert refusal.scope_id == "day"
    ledger.run(commit(held, 550_000), kolkata_midnight_ms + 10)
    state = ledger.budget("day", kolkata_midnight_ms + 10)
    assert (state.window_start_at_ms, *usage(state)) == (kolkata_midnight_ms, 550_000, 0)
    denied(ledger.run(reserve(450_001), kolkata_midnight_ms + 20))
    granted(ledger.run(reserve(450_000), kolkata_midnight_ms + 20))
    ledger.assert_replays()


# -------------------------------------------------------------------------- revocation


def _exhausted_by_the_tenant_budget(expires_at_ms: int = FAR_FUTURE_MS) -> ScopeLedger:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1, expires_at_ms=expires_at_ms))
    ledger.run(create_budget("all", "tenant", "", 100_000))
    granted(ledger.run(reserve(100_000)))
    assert denied(ledger.run(reserve(1))).scope == "tenant"
    return ledger


def test_a_revoked_key_is_refused_before_any_budget_check() -> None:
    ledger = _exhausted_by_the_tenant_budget()
    assert ledger.run(RevokeKey(tenant=TENANT, key_id=K1, reason="leaked")) == Done(
        f"key {K1} revoked"
    )
    assert ledger.events()[-1] == KeyRevoked(at_ms=NOW_MS, key_id=K1, reason="leaked")
    assert ledger.key(K1).revoked
    log_length = len(ledger.log)
    # Not cap_exhausted (the budget is full) and not a ReservationDenied event.
    assert failed(ledger.run(reserve(1)), "key_revoked").message == (
        "the vault key has been revoked"
    )
    failed(ledger.run(reserve(1, vendor="anthropic")), "key_revoked")
    # Revocation is checked before expiry too.
    failed(ledger.run(reserve(1), FAR_FUTURE_MS), "key_revoked")
    assert len(ledger.log) == log_length
    assert usage(ledger.budget("all")) == (0, 100_000)
    ledger.assert_replays()


def test_an_expired_key_is_refused_before_any_budget_check() -> None:
    expires_at_ms = NOW_MS + HOUR_MS
    ledger = _exhausted_by_the_tenant_budget(expires_at_ms)
    assert denied(ledger.run(reserve(1), expires_at_ms - 1)).scope == "tenant"
    log_length = len(ledger.log)
    failed(ledger.run(reserve(1), expires_at_ms), "key_expired")
    assert len(ledger.log) == log_length
    ledger.assert_replays()


def test_a_revoked_key_still_settles_its_open_holds() -> None:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1, expires_at_ms=NOW_MS + HOUR_MS))
    ledger.run(create_budget("all", "tenant", "", 1_000_000))
    committed_rid = granted(ledger.run(reserve(300_000))).reservation_id
    released_rid = granted(ledger.run(reserve(200_000))).reservation_id
    ledger.run(RevokeKey(tenant=TENANT, key_id=K1))
    # Settled after both revocation and expiry.
    later_ms = NOW_MS + 2 * HOUR_MS
    assert ledger.run(commit(committed_rid, 350_000), later_ms) == Settled(
        committed_rid, 350_000, 0, overrun_micros=50_000
    )
    assert ledger.run(release(released_rid), later_ms) == Settled(released_rid, 0, 200_000)
    assert usage(ledger.budget("all", later_ms)) == (350_000, 0)
    assert usage(ledger.key(K1, later_ms)) == (350_000, 0)
    ledger.assert_replays()


def test_revoke_refusals() -> None:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1))
    ledger.run(issue_key(K2, tenant=NEIGHBOUR))
    ledger.run(RevokeKey(tenant=TENANT, key_id=K1))
    log_length = len(ledger.log)
    failed(ledger.run(RevokeKey(tenant=TENANT, key_id=K1)), "already_revoked")
    failed(ledger.run(RevokeKey(tenant=TENANT, key_id="nope")), "key_not_found")
    failed(ledger.run(RevokeKey(tenant=TENANT, key_id=K2)), "key_not_found")
    assert len(ledger.log) == log_length
    # The neighbour's key is untouched.
    assert not ledger.key(K2, tenant=NEIGHBOUR).revoked
    granted(ledger.run(reserve(1, key_id=K2, tenant=NEIGHBOUR)))
    ledger.assert_replays()


# ---------------------------------------------------------------------- vendor allow-list


def test_allowed_vendors() -> None:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1, allowed_vendors=["openai", "anthropic"]))
    ledger.run(issue_key(K2, allowed_vendors=[]))
    ledger.run(create_budget("all", "tenant", "", 1_000_000))
    assert ledger.key(K1).allowed_vendors == ["anthropic", "openai"]
    log_length = len(ledger.log)
    result = failed(ledger.run(reserve(1, vendor="stripe")), "vendor_not_allowed")
    assert result.message == "this vault key may not be used for 'stripe'"
    # An empty allow-list allows nothing.
    failed(ledger.run(reserve(1, key_id=K2, vendor="openai")), "vendor_not_allowed")
    assert len(ledger.log) == log_length
    assert usage(ledger.budget("all")) == (0, 0)
    granted(ledger.run(reserve(100_000, vendor="openai")))
    granted(ledger.run(reserve(200_000, vendor="anthropic")))
    assert usage(ledger.budget("all")) == (0, 300_000)
    ledger.assert_replays()


# ----------------------------------------------------------------------------- overrun


def test_overrun_counts_on_the_key_and_every_budget_of_the_hold() -> None:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1, label="team-a/run-1", cap=1_000_000))
    ledger.run(create_budget("fleet-a", "fleet", "team-a/", 2_000_000))
    ledger.run(create_budget("openai-cap", "vendor", "openai", 600_000))
    ledger.run(create_budget("all", "tenant", "", 3_000_000))
    rid = granted(ledger.run(reserve(200_000))).reservation_id
    assert ledger.run(commit(rid, 500_000)) == Settled(rid, 500_000, 0, overrun_micros=300_000)
    committed, overrun = ledger.events()[-2:]
    assert committed == ReservationCommitted(
        at_ms=NOW_MS,
        reservation_id=rid,
        key_id=K1,
        reserved_micros=200_000,
        actual_micros=500_000,
        window_start_at_ms=0,
    )
    assert overrun == ReservationOverrun(
        at_ms=NOW_MS,
        reservation_id=rid,
        key_id=K1,
        reserved_micros=200_000,
        actual_micros=500_000,
        overrun_micros=300_000,
        budget_ids=["fleet-a", "openai-cap", "all"],
    )
    key = ledger.key(K1)
    assert (*usage(key), key.overrun_micros) == (500_000, 0, 300_000)
    for budget_id in ("fleet-a", "openai-cap", "all"):
        budget = ledger.budget(budget_id)
        assert (*usage(budget), budget.overrun_micros) == (500_000, 0, 300_000), budget_id
    # The next reserve sees the full actual cost against every cap.
    refusal = denied(ledger.run(reserve(100_001)))
    assert (refusal.scope_id, refusal.committed_micros) == ("openai-cap", 500_000)
    granted(ledger.run(reserve(100_000)))
    # A commit within its hold adds no overrun.
    other = granted(ledger.run(reserve(400_000, vendor="anthropic"))).reservation_id
    assert ledger.run(commit(other, 400_000, key_id=K1)) == Settled(other, 400_000, 0)
    assert ledger.key(K1).overrun_micros == 300_000
    assert ledger.budget("all").overrun_micros == 300_000
    ledger.assert_replays()


def test_overrun_belongs_to_the_window_it_was_committed_in() -> None:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1, cap=1_000_000, window="daily", timezone="America/New_York"))
    ledger.run(create_budget("month", "tenant", "", 5_000_000, "monthly", "America/New_York"))
    rid = granted(ledger.run(reserve(100_000))).reservation_id
    ledger.run(commit(rid, 250_000))
    assert ledger.key(K1).overrun_micros == 150_000
    next_day_ms = utc_ms(2025, 3, 11, 4)
    key = ledger.key(K1, next_day_ms)
    assert (key.window_start_at_ms, key.committed_micros, key.overrun_micros) == (
        next_day_ms,
        0,
        0,
    )
    # An event of the new day moves the meters: the key's overrun is gone with its day,
    # the monthly budget keeps it.
    granted(ledger.run(reserve(1_000_000), next_day_ms))
    key = ledger.key(K1, next_day_ms)
    assert (key.committed_micros, key.reserved_micros, key.overrun_micros) == (0, 1_000_000, 0)
    budget = ledger.budget("month", next_day_ms)
    assert (budget.committed_micros, budget.overrun_micros) == (250_000, 150_000)
    ledger.assert_replays()


# ------------------------------------------------------------------------------- sweep


def test_sweep_expires_holds_at_their_expiry_and_counts_them_as_spent() -> None:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1, label="team-a/run-1", cap=1_000_000))
    ledger.run(issue_key(K2, label="team-b/run-1", cap=1_000_000))
    ledger.run(create_budget("all", "tenant", "", 1_500_000))
    short = granted(ledger.run(reserve(300_000, hold_ms=5_000))).reservation_id
    other = granted(ledger.run(reserve(200_000, key_id=K2, hold_ms=5_000))).reservation_id
    long = granted(ledger.run(reserve(100_000))).reservation_id  # default hold: 60 s
    log_length = len(ledger.log)
    assert ledger.run(Sweep(), NOW_MS + 4_999) == Done("0 reservations expired")
    assert len(ledger.log) == log_length
    assert ledger.run(Sweep(), NOW_MS + 5_000) == Done("2 reservations expired")
    assert ledger.events()[-2:] == [
        ReservationExpired(
            at_ms=NOW_MS + 5_000, reservation_id=short, key_id=K1, reserved_micros=300_000
        ),
        ReservationExpired(
            at_ms=NOW_MS + 5_000, reservation_id=other, key_id=K2, reserved_micros=200_000
        ),
    ]
    # Spent at the reserved amount, on the key and on the budget.
    assert usage(ledger.key(K1, NOW_MS + 5_000)) == (300_000, 100_000)
    assert usage(ledger.key(K2, NOW_MS + 5_000)) == (200_000, 0)
    assert usage(ledger.budget("all", NOW_MS + 5_000)) == (500_000, 100_000)
    assert set(ledger.state.holds) == {long}
    # Nothing left to expire until the long hold's time.
    assert ledger.run(Sweep(), NOW_MS + 59_999) == Done("0 reservations expired")
    assert ledger.run(Sweep(), NOW_MS + HOLD_DEFAULT_MS) == Done("1 reservations expired")
    assert usage(ledger.budget("all", NOW_MS + HOLD_DEFAULT_MS)) == (600_000, 0)
    assert ledger.state.holds == {}
    ledger.assert_replays()


def test_settling_an_expired_hold_is_already_settled_and_changes_nothing() -> None:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1, cap=1_000_000))
    ledger.run(create_budget("all", "tenant", "", 1_000_000))
    rid = granted(ledger.run(reserve(400_000, hold_ms=1_000))).reservation_id
    ledger.run(Sweep(), NOW_MS + 1_000)
    before = copy.deepcopy(ledger.state)
    log_length = len(ledger.log)
    for command in (commit(rid, 100_000), commit(rid, 900_000), release(rid)):
        result = failed(ledger.run(command, NOW_MS + 2_000), "already_settled")
        assert result.message == "reservation was already settled (expired); nothing changed"
    assert ledger.state == before
    assert len(ledger.log) == log_length
    assert usage(ledger.key(K1, NOW_MS + 2_000)) == (400_000, 0)
    ledger.assert_replays()


def test_sweep_leaves_settled_holds_alone() -> None:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1, cap=1_000_000))
    committed_rid = granted(ledger.run(reserve(300_000, hold_ms=1_000))).reservation_id
    released_rid = granted(ledger.run(reserve(200_000, hold_ms=1_000))).reservation_id
    open_rid = granted(ledger.run(reserve(100_000, hold_ms=1_000))).reservation_id
    ledger.run(commit(committed_rid, 10_000), NOW_MS + 500)
    ledger.run(release(released_rid), NOW_MS + 500)
    assert ledger.run(Sweep(), NOW_MS + 10_000) == Done("1 reservations expired")
    event = ledger.events()[-1]
    assert isinstance(event, ReservationExpired)
    assert event.reservation_id == open_rid
    assert usage(ledger.key(K1, NOW_MS + 10_000)) == (110_000, 0)
    ledger.assert_replays()


def test_an_expired_hold_counts_in_the_window_it_expired_in() -> None:
    new_york_midnight_ms = utc_ms(2025, 3, 11, 4)
    ledger = ScopeLedger()
    ledger.run(issue_key(K1, cap=1_000_000, window="daily", timezone="America/New_York"))
    rid = granted(ledger.run(reserve(700_000, hold_ms=HOUR_MS), new_york_midnight_ms - 10))
    ledger.run(Sweep(), new_york_midnight_ms + HOUR_MS)
    key = ledger.key(K1, new_york_midnight_ms + HOUR_MS)
    assert (key.window_start_at_ms, *usage(key)) == (new_york_midnight_ms, 700_000, 0)
    assert rid.reservation_id in ledger.state.settled
    ledger.assert_replays()


def test_a_sweep_decision_that_is_not_applied_changes_nothing() -> None:
    ledger = ScopeLedger()
    ledger.run(issue_key(K1))
    rid = granted(ledger.run(reserve(100_000, hold_ms=1_000))).reservation_id
    first = ledger.state.decide(Sweep(), NOW_MS + 1_000)
    assert len(first.events) == 1
    assert ledger.state.decide(Sweep(), NOW_MS + 1_000) == first
    assert ledger.run(Sweep(), NOW_MS + 2_000) == Done("1 reservations expired")
    assert rid not in ledger.state.holds


# --------------------------------------------------------------------------- retention

RETENTION_MS = HOUR_MS


def retention_ledger() -> ScopeLedger:
    state = PartitionState(PARTITION, PARTITION_COUNT, HOLD_DEFAULT_MS, retention_ms=RETENTION_MS)
    ledger = ScopeLedger(state)
    ledger.run(issue_key(K1, cap=1_000_000))
    ledger.run(issue_key(K2, cap=1_000_000))
    return ledger


def test_idempotent_retry_replays_inside_retention_and_is_decided_anew_after_it() -> None:
    ledger = retention_ledger()
    first = granted(ledger.run(reserve(100_000, idempotency_key="call-1")))
    ledger.run(commit(first.reservation_id, 100_000))
    # Another key's activity moves the ledger clock to the last millisecond of retention.
    granted(ledger.run(reserve(1, key_id=K2), NOW_MS + RETENTION_MS))
    last_seq = ledger.state.last_seq
    again = granted(ledger.run(reserve(100_000, idempotency_key="call-1"), NOW_MS + RETENTION_MS))
    assert again.replayed
    assert again.reservation_id == first.reservation_id
    assert ledger.state.last_seq == last_seq
    # One millisecond later an event prunes it: the same retry is a new decision.
    granted(ledger.run(reserve(1, key_id=K2), NOW_MS + RETENTION_MS + 1))
    assert ("keyoneaaaaaaaaaa", "call-1") not in ledger.state.idempotency
    fresh = granted(
        ledger.run(reserve(100_000, idempotency_key="call-1"), NOW_MS + RETENTION_MS + 1)
    )
    assert not fresh.replayed
    assert fresh.reservation_id == f"rsv_{PARTITION}_{ledger.state.last_seq}"
    assert (fresh.committed_micros, fresh.reserved_micros) == (100_000, 100_000)
    ledger.assert_replays()


def test_retention_holds_even_when_no_event_pruned_the_answer() -> None:
    ledger = retention_ledger()
    first = granted(ledger.run(reserve(100_000, idempotency_key="call-1")))
    # No event at all between the first call and a retry long after the window.
    later = NOW_MS + RETENTION_MS + 1
    retry = granted(ledger.run(reserve(100_000, idempotency_key="call-1"), later))
    assert not retry.replayed
    assert retry.reservation_id != first.reservation_id
    ledger.assert_replays()


def test_a_remembered_denial_is_forgotten_after_retention() -> None:
    ledger = retention_ledger()
    held = granted(ledger.run(reserve(1_000_000))).reservation_id
    refusal = denied(ledger.run(reserve(1, idempotency_key="call-2")))
    ledger.run(release(held))
    replay = denied(ledger.run(reserve(1, idempotency_key="call-2"), NOW_MS + RETENTION_MS))
    assert (replay.replayed, replay.decision_id) == (True, refusal.decision_id)
    ledger.run(reserve(1, key_id=K2), NOW_MS + RETENTION_MS + 1)
    assert not granted(ledger.run(reserve(1, idempotency_key="call-2"))).replayed
    ledger.assert_replays()


def test_settled_ids_are_forgotten_after_retention() -> None:
    ledger = retention_ledger()
    committed_rid = granted(ledger.run(reserve(100_000))).reservation_id
    expired_rid = granted(ledger.run(reserve(100_000, hold_ms=1_000))).reservation_id
    ledger.run(commit(committed_rid, 100_000))
    ledger.run(Sweep(), NOW_MS + 1_000)
    boundary_ms = NOW_MS + RETENTION_MS
    ledger.run(reserve(1, key_id=K2), boundary_ms)
    failed(ledger.run(commit(committed_rid, 1), boundary_ms), "already_settled")
    failed(ledger.run(release(expired_rid), boundary_ms), "already_settled")
    ledger.run(reserve(1, key_id=K2), boundary_ms + 1)
    assert committed_rid not in ledger.state.settled
    failed(ledger.run(commit(committed_rid, 1), boundary_ms + 1), "reservation_not_found")
    # The expired one was settled a second later, so it is remembered a second longer.
    failed(ledger.run(release(expired_rid), boundary_ms + 1), "already_settled")
    ledger.run(reserve(1, key_id=K2), boundary_ms + 1_001)
    failed(ledger.run(release(expired_rid), boundary_ms + 1_001), "reservation_not_found")
    # Forgetting the id forgets nothing spent.
    assert usage(ledger.key(K1, boundary_ms + 1_001)) == (200_000, 0)
    rebuilt = ledger.rebuilt()
    assert (len(rebuilt.settled), rebuilt.idempotency) == (0, {})
    ledger.assert_replays()


# -------------------------------------------------------------------------- validation

_BAD_BUDGETS: list[tuple[CreateBudget, str]] = [
    (create_budget("", "tenant", "", 1), "invalid_budget_id"),
    (create_budget("Team", "tenant", "", 1), "invalid_budget_id"),
    (create_budget("-team", "tenant", "", 1), "invalid_budget_id"),
    (create_budget("team a", "tenant", "", 1), "invalid_budget_id"),
    (create_budget("t" * 65, "tenant", "", 1), "invalid_budget_id"),
    (create_budget("b", cast("BudgetScope", "region"), "", 1), "invalid_scope"),
    (create_budget("b", cast("BudgetScope", "key"), "", 1), "invalid_scope"),
    (create_budget("b", "fleet", "", 1), "invalid_match"),
    (create_budget("b", "fleet", "f" * (LABEL_CHARS_MAX + 1), 1), "invalid_match"),
    (create_budget("b", "vendor", "", 1), "invalid_match"),
    (create_budget("b", "vendor", "OpenAI", 1), "invalid_match"),
    (create_budget("b", "vendor", "v" * 33, 1), "invalid_match"),
    (create_budget("b", "tenant", "acme", 1), "invalid_match"),
    (create_budget("b", "tenant", "", 0), "invalid_amount"),
    (create_budget("b", "tenant", "", -1), "invalid_amount"),
    (create_budget("b", "tenant", "", AMOUNT_MICROS_MAX + 1), "invalid_amount"),
    (create_budget("b", "tenant", "", 1, cast("Window", "weekly")), "invalid_window"),
    (create_budget("b", "tenant", "", 1, "daily", "Mars/Olympus_Mons"), "invalid_timezone"),
    (create_budget("b", "tenant", "", 1, "monthly", ""), "invalid_timezone"),
    (create_budget("b", "tenant", "", 1, "daily", "America"), "invalid_timezone"),
]


@pytest.mark.parametrize(("command", "code"), _BAD_BUDGETS)
def test_create_budget_refusals(command: CreateBudget, code: str) -> None:
    ledger = ScopeLedger()
    failed(ledger.run(command), code)
    assert ledger.log == []
    assert ledger.state.budgets == {}


def test_create_budget_accepts_the_boundaries() -> None:
    ledger = ScopeLedger()
    for command in (
        create_budget("b" * 64, "tenant", "", AMOUNT_MICROS_MAX),
        create_budget("0.a_b-c", "fleet", "f" * LABEL_CHARS_MAX, 1, "monthly", "Asia/Kolkata"),
        create_budget("v", "vendor", "v" * 32, 1, "daily", "America/New_York"),
    ):
        created = budget_state(ledger.run(command))
        assert (created.budget_id, created.cap_micros) == (
            command.budget_id,
            command.cap_micros,
        )
        assert not created.closed
    assert ledger.events()[0] == BudgetCreated(
        at_ms=NOW_MS,
        budget_id="b" * 64,
        tenant=TENANT,
        scope="tenant",
        match="",
        cap_micros=AMOUNT_MICROS_MAX,
        window="total",
        timezone="UTC",
    )
    ledger.assert_replays()


def test_create_budget_with_a_taken_id_or_in_the_wrong_partition() -> None:
    ledger = ScopeLedger()
    ledger.run(create_budget("b", "tenant", "", 1_000))
    log_length = len(ledger.log)
    failed(ledger.run(create_budget("b", "vendor", "openai", 5)), "budget_exists")
    other_partition = next(
        tenant
        for tenant in (f"far-{index}" for index in range(1_000))
        if partition_for_tenant(tenant, PARTITION_COUNT) != PARTITION
    )
    failed(
        ledger.run(create_budget("c", "tenant", "", 5, tenant=other_partition)), "wrong_partition"
    )
    assert len(ledger.log) == log_length
    assert ledger.budget("b").cap_micros == 1_000
    ledger.assert_replays()


def test_a_tenant_has_a_bounded_number_of_open_budgets() -> None:
    ledger = ScopeLedger()
    for index in range(BUDGETS_PER_TENANT_MAX):
        scope: BudgetScope = ("fleet", "vendor", "tenant")[index % 3]
        match = {"fleet": f"team-{index}", "vendor": f"vendor-{index}", "tenant": ""}[scope]
        budget_state(ledger.run(create_budget(f"b{index}", scope, match, 1)))
    failed(ledger.run(create_budget("one-more", "tenant", "", 1)), "too_many_budgets")
    # Another tenant of the partition has its own allowance; closing one frees a place.
    budget_state(ledger.run(create_budget("theirs", "tenant", "", 1, tenant=NEIGHBOUR)))
    ledger.run(CloseBudget(tenant=TENANT, budget_id="b0"))
    budget_state(ledger.run(create_budget("one-more", "tenant", "", 1)))
    failed(ledger.run(create_budget("two-more", "tenant", "", 1)), "too_many_budgets")
    ledger.assert_replays()


_BAD_KEYS: list[tuple[IssueKey, str]] = [
    (
        issue_key(K1, allowed_vendors=[f"v{i}" for i in range(ALLOWED_VENDORS_PER_KEY_MAX + 1)]),
        "invalid_allowed_vendors",
    ),
    (issue_key(K1, allowed_vendors=["openai", "OpenAI"]), "invalid_allowed_vendors"),
    (issue_key(K1, allowed_vendors=[""]), "invalid_allowed_vendors"),
    (issue_key(K1, allowed_vendors=["v" * 33]), "invalid_allowed_vendors"),
    (issue_key(K1, allowed_vendors=["-openai"]), "invalid_allowed_vendors"),
    (
        issue_key(K1, fleet_labels=tuple(f"f{i}" for i in range(FLEET_LABELS_PER_KEY_MAX + 1))),
        "invalid_fleet_labels",
    ),
    (issue_key(K1, fleet_labels=("team-a/", "")), "invalid_fleet_labels"),
    (issue_key(K1, fleet_labels=("f" * (LABEL_CHARS_MAX + 1),)), "invalid_fleet_labels"),
]


@pytest.mark.parametrize(("command", "code"), _BAD_KEYS)
def test_issue_key_allow_list_and_fleet_label_refusals(command: IssueKey, code: str) -> None:
    ledger = ScopeLedger()
    failed(ledger.run(command), code)
    assert ledger.log == []
    assert ledger.state.keys == {}


def test_issue_key_accepts_full_allow_list_and_fleet_labels() -> None:
    ledger = ScopeLedger()
    vendors = [f"v{i}" for i in range(ALLOWED_VENDORS_PER_KEY_MAX)]
    labels = tuple(f"team-{i}/" + "x" * 100 for i in range(FLEET_LABELS_PER_KEY_MAX))
    command = issue_key(K1, allowed_vendors=vendors, fleet_labels=labels)
    assert isinstance(ledger.run(command), KeyCreated)
    state = ledger.key(K1)
    assert state.allowed_vendors == sorted(vendors)
    assert state.fleet_labels == list(labels)
    ledger.assert_replays()


# ------------------------------------------------------------------- stateful model


def model_window_start(window: Window, timezone: str, at_ms: int) -> int:
    """Start of the window holding ``at_ms``, computed apart from spendgate_common.windows:
    local midnight of the day (or of the first of the month) in ``timezone``."""
    if window == "total":
        return 0
    zone = ZoneInfo(timezone)
    day = datetime.fromtimestamp(at_ms // 1000, tz=zone).date()
    if window == "monthly":
        day = day.replace(day=1)
    return int(datetime.combine(day, time(), tzinfo=zone).timestamp()) * 1000


def model_next_window_start(window: Window, timezone: str, at_ms: int) -> int:
    assert window != "total"
    zone = ZoneInfo(timezone)
    day = datetime.fromtimestamp(at_ms // 1000, tz=zone).date()
    following = day + timedelta(days=1)
    if window == "monthly":
        following = (day.replace(day=28) + timedelta(days=4)).replace(day=1)
    return int(datetime.combine(following, time(), tzinfo=zone).timestamp()) * 1000


@dataclass
class ModelMeter:
    """One cap as the model sees it: usage in the window of ``window_start``."""

    scope: str
    scope_id: str
    cap: int
    window: Window
    timezone: str
    window_start: int
    committed: int = 0
    reserved: int = 0
    closed: bool = False

    def roll(self, now_ms: int) -> None:
        start = model_window_start(self.window, self.timezone, now_ms)
        if start > self.window_start:
            self.window_start = start
            self.committed = 0


@dataclass
class ModelHold:
    key_id: str
    amount: int
    expires_at_ms: int
    meters: list[ModelMeter] = field(default_factory=list)


# 2025-10-31 12:00 UTC: 17:30 in Kolkata (its November starts in an hour), 08:00 in New
# York (November starts in 16 hours, DST ends on the 2nd).
MACHINE_START_MS = utc_ms(2025, 10, 31, 12)
MACHINE_VENDORS = ("openai", "anthropic")
MACHINE_ZONES = ("America/New_York", "Asia/Kolkata")
MACHINE_HOLDS_MS = (1_000, HOLD_DEFAULT_MS, HOUR_MS, DAY_MS)
# key id -> label, cap, window, timezone. The first two share the fleet prefix "team-a/".
MACHINE_KEYS: dict[str, tuple[str, int, Window, str]] = {
    "keyfleetoneaaaaa": ("team-a/run-1", 900_000, "total", "UTC"),
    "keyfleettwoaaaaa": ("team-a/run-2", 600_000, "daily", "America/New_York"),
    "keysoloaaaaaaaaa": ("solo/run-3", 700_000, "monthly", "Asia/Kolkata"),
}
# role -> scope, match, cap, window, timezone. One open budget per role at a time.
MACHINE_BUDGETS: dict[str, tuple[BudgetScope, str, int, Window, str]] = {
    "fleet": ("fleet", "team-a/", 800_000, "daily", "America/New_York"),
    "vendor": ("vendor", "openai", 700_000, "monthly", "Asia/Kolkata"),
    "tenant": ("tenant", "", 1_000_000, "monthly", "America/New_York"),
}
assert all(KEY_ID_PATTERN.fullmatch(key_id) for key_id in MACHINE_KEYS)


class ScopesMachine(RuleBasedStateMachine):
    """Keys and budgets of one tenant against a model of every meter's current window."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = ScopeLedger(clock_ms=MACHINE_START_MS)
        self.now_ms = MACHINE_START_MS
        self.keys: dict[str, ModelMeter] = {}
        self.budgets: dict[str, ModelMeter] = {}  # every budget, closed ones too
        self.open_budgets: dict[str, str] = {}  # role -> budget id
        self.budgets_created = 0
        self.holds: dict[str, ModelHold] = {}

    @initialize()
    def create_keys_and_budgets(self) -> None:
        for key_id, (label, cap, window, timezone) in MACHINE_KEYS.items():
            command = issue_key(key_id, label=label, cap=cap, window=window, timezone=timezone)
            assert isinstance(self.ledger.run(command, self.now_ms), KeyCreated)
            start = model_window_start(window, timezone, self.now_ms)
            self.keys[key_id] = ModelMeter("key", key_id, cap, window, timezone, start)
        for role in MACHINE_BUDGETS:
            self._create_budget(role)

    def _create_budget(self, role: str) -> None:
        scope, match, cap, window, timezone = MACHINE_BUDGETS[role]
        self.budgets_created += 1
        budget_id = f"{role}-{self.budgets_created}"
        command = create_budget(budget_id, scope, match, cap, window, timezone)
        created = budget_state(self.ledger.run(command, self.now_ms))
        start = model_window_start(window, timezone, self.now_ms)
        assert (created.window_start_at_ms, *usage(created)) == (start, 0, 0)
        self.budgets[budget_id] = ModelMeter(scope, budget_id, cap, window, timezone, start)
        self.open_budgets[role] = budget_id

    def _meters_for(self, key_id: str, vendor: str) -> list[ModelMeter]:
        """The caps a reserve must fit, in the order the ledger checks them."""
        meters = [self.keys[key_id]]
        label = MACHINE_KEYS[key_id][0]
        for role in ("fleet", "vendor", "tenant"):
            budget_id = self.open_budgets.get(role)
            if budget_id is None:
                continue
            _, match, *_ = MACHINE_BUDGETS[role]
            applies = (
                (role == "fleet" and label.startswith(match))
                or (role == "vendor" and vendor == match)
                or role == "tenant"
            )
            if applies:
                meters.append(self.budgets[budget_id])
        for meter in meters:
            meter.roll(self.now_ms)
        return meters

    # ---------------------------------------------------------------------- rules

    @rule(
        key_id=st.sampled_from(sorted(MACHINE_KEYS)),
        amount=st.integers(min_value=1, max_value=400_000),
        vendor=st.sampled_from(MACHINE_VENDORS),
        hold_ms=st.sampled_from(MACHINE_HOLDS_MS),
    )
    def reserve(self, key_id: str, amount: int, vendor: str, hold_ms: int) -> None:
        meters = self._meters_for(key_id, vendor)
        seq = self.ledger.state.last_seq + 1
        command = reserve(amount, key_id=key_id, vendor=vendor, hold_ms=hold_ms)
        result = self.ledger.run(command, self.now_ms)
        assert self.ledger.state.last_seq == seq
        full = next((m for m in meters if m.committed + m.reserved + amount > m.cap), None)
        note(f"reserve: denied by {full.scope}" if full else f"reserve: {len(meters)} caps")
        if full is not None:
            refusal = denied(result)
            assert refusal.decision_id == f"dcn_{PARTITION}_{seq}"
            assert (refusal.code, refusal.scope, refusal.scope_id) == (
                "cap_exhausted",
                full.scope,
                full.scope_id,
            )
            assert (refusal.committed_micros, refusal.reserved_micros, refusal.cap_micros) == (
                full.committed,
                full.reserved,
                full.cap,
            )
            assert refusal.requested_micros == amount
            return
        for meter in meters:
            meter.reserved += amount
        key = meters[0]
        assert result == Granted(
            reservation_id=f"rsv_{PARTITION}_{seq}",
            amount_micros=amount,
            expires_at_ms=self.now_ms + hold_ms,
            committed_micros=key.committed,
            reserved_micros=key.reserved,
            cap_micros=key.cap,
        )
        event = self.ledger.events()[-1]
        assert isinstance(event, ReservationGranted)
        assert event.budget_ids == [meter.scope_id for meter in meters[1:]]
        self.holds[event.reservation_id] = ModelHold(key_id, amount, self.now_ms + hold_ms, meters)

    @rule(
        key_id=st.sampled_from(sorted(MACHINE_KEYS)),
        vendor=st.sampled_from(MACHINE_VENDORS),
        one_more=st.booleans(),
    )
    def reserve_exactly_the_room_left(self, key_id: str, vendor: str, one_more: bool) -> None:
        meters = self._meters_for(key_id, vendor)
        room = min(meter.cap - meter.committed - meter.reserved for meter in meters)
        amount = room + (1 if one_more else 0)
        if amount > 0:
            self.reserve(key_id, amount, vendor, HOLD_DEFAULT_MS)

    def _settle(self, rid: str, actual: int | None) -> None:
        hold = self.holds.pop(rid)
        if actual is None:
            result = self.ledger.run(release(rid, key_id=hold.key_id), self.now_ms)
            assert result == Settled(rid, 0, hold.amount)
        else:
            result = self.ledger.run(commit(rid, actual, key_id=hold.key_id), self.now_ms)
            assert result == Settled(rid, actual, hold.amount - actual)
        for meter in hold.meters:
            meter.roll(self.now_ms)
            meter.reserved -= hold.amount
            meter.committed += actual or 0

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data(), percent=st.integers(min_value=0, max_value=100))
    def commit(self, data: st.DataObject, percent: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.holds)))
        self._settle(rid, self.holds[rid].amount * percent // 100)

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self._settle(data.draw(st.sampled_from(sorted(self.holds))), None)

    @rule(data=st.data(), extra_ms=st.integers(min_value=0, max_value=HOUR_MS))
    def sweep(self, data: st.DataObject, extra_ms: int) -> None:
        """Advance the clock past one hold's expiry (when there is one), then sweep."""
        if self.holds:
            rid = data.draw(st.sampled_from(sorted(self.holds)))
            self.now_ms = max(self.now_ms, self.holds[rid].expires_at_ms + extra_ms)
        # Expiry order, then grant order (the seq in the reservation id).
        expired = sorted(
            (hold.expires_at_ms, int(rid.rsplit("_", 1)[1]), rid)
            for rid, hold in self.holds.items()
            if hold.expires_at_ms <= self.now_ms
        )
        seq = self.ledger.state.last_seq
        result = self.ledger.run(Sweep(), self.now_ms)
        assert result == Done(f"{len(expired)} reservations expired")
        note(f"sweep: {min(len(expired), 2)}+ expired")
        events = [decode_event(body) for _, body in self.ledger.log[seq:]]
        expected = []
        for _, _, rid in expired:
            hold = self.holds.pop(rid)
            expected.append(ReservationExpired(self.now_ms, rid, hold.key_id, hold.amount))
            for meter in hold.meters:
                meter.roll(self.now_ms)
                meter.reserved -= hold.amount
                meter.committed += hold.amount
        assert events == expected

    @precondition(lambda self: bool(self.open_budgets))
    @rule(data=st.data(), increase=st.integers(min_value=1, max_value=500_000))
    def raise_a_cap(self, data: st.DataObject, increase: int) -> None:
        budget_id = data.draw(st.sampled_from(sorted(self.open_budgets.values())))
        meter = self.budgets[budget_id]
        meter.cap += increase
        command = UpdateBudget(tenant=TENANT, budget_id=budget_id, cap_micros=meter.cap)
        assert budget_state(self.ledger.run(command, self.now_ms)).cap_micros == meter.cap

    @precondition(lambda self: bool(self.open_budgets))
    @rule(data=st.data())
    def close_a_budget(self, data: st.DataObject) -> None:
        role = data.draw(st.sampled_from(sorted(self.open_budgets)))
        budget_id = self.open_budgets.pop(role)
        self.budgets[budget_id].closed = True
        closed = self.ledger.run(CloseBudget(tenant=TENANT, budget_id=budget_id), self.now_ms)
        assert budget_state(closed).closed

    @precondition(lambda self: len(self.open_budgets) < len(MACHINE_BUDGETS))
    @rule(data=st.data())
    def open_a_new_budget(self, data: st.DataObject) -> None:
        missing = sorted(set(MACHINE_BUDGETS) - set(self.open_budgets))
        self._create_budget(data.draw(st.sampled_from(missing)))

    @rule(
        step_ms=st.one_of(
            st.integers(min_value=1, max_value=10 * HOUR_MS),
            st.sampled_from([DAY_MS, 7 * DAY_MS, 31 * DAY_MS]),
        )
    )
    def advance_clock(self, step_ms: int) -> None:
        self.now_ms += step_ms

    @rule(
        meter=st.sampled_from(
            [(window, zone) for window in ("daily", "monthly") for zone in MACHINE_ZONES]
        ),
        offset_ms=st.sampled_from([-1, 0, 1]),
    )
    def advance_to_a_window_end(self, meter: tuple[Window, str], offset_ms: int) -> None:
        """Land on (or next to) the next local midnight or month start of a zone in use."""
        window, timezone = meter
        self.now_ms = max(
            self.now_ms, model_next_window_start(window, timezone, self.now_ms) + offset_ms
        )

    # ----------------------------------------------------------------- invariants

    @invariant()
    def model_matches_the_ledger(self) -> None:
        for key_id, meter in self.keys.items():
            meter.roll(self.now_ms)
            state = self.ledger.key(key_id, self.now_ms)
            assert (state.window_start_at_ms, *usage(state)) == (
                meter.window_start,
                meter.committed,
                meter.reserved,
            ), key_id
            assert (state.cap_micros, state.overrun_micros) == (meter.cap, 0)
            assert self.ledger.state.keys[key_id].meter.reserved_micros == meter.reserved
            label = MACHINE_KEYS[key_id][0]
            expected_budget_ids = [
                self.open_budgets[role]
                for role in ("fleet", "tenant")
                if role in self.open_budgets
                and (role == "tenant" or label.startswith(MACHINE_BUDGETS["fleet"][1]))
            ]
            assert state.budget_ids == expected_budget_ids
        for budget_id, meter in self.budgets.items():
            meter.roll(self.now_ms)
            budget = self.ledger.budget(budget_id, self.now_ms)
            assert (budget.window_start_at_ms, *usage(budget)) == (
                meter.window_start,
                meter.committed,
                meter.reserved,
            ), budget_id
            assert (budget.cap_micros, budget.overrun_micros, budget.closed) == (
                meter.cap,
                0,
                meter.closed,
            )
            ledger_budget = self.ledger.state.budgets[(TENANT, budget_id)]
            assert ledger_budget.meter.reserved_micros == meter.reserved

    @invariant()
    def no_open_meter_is_over_its_cap(self) -> None:
        open_meters = [*self.keys.values()]
        open_meters.extend(self.budgets[budget_id] for budget_id in self.open_budgets.values())
        for meter in open_meters:
            meter.roll(self.now_ms)
            assert meter.committed + meter.reserved <= meter.cap, meter
        assert set(self.ledger.state.holds) == set(self.holds)

    def teardown(self) -> None:
        self.ledger.assert_replays()


ScopesMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestScopesMachine = ScopesMachine.TestCase
