"""Rollups, decisions and finance events of one batch of chained events. Pure: no I/O.

The shell decodes the events a batch chains, asks :func:`references` which keys and
open reservations they need, loads those (and then the budgets, :func:`budget_references`)
from Postgres inside the batch's transaction, and applies every event in chaining order
to a :class:`RollupBatch`. The batch aggregates its effects in memory (one counter row per
key, vendor and day, one per budget and day) so that the shell writes each row once.

Definitions (docs/finance.md), the same as the ledger's meters:

* ``granted``: reservations granted (count, held amount), on the grant's day;
* ``reserved``: the held amount of holds granted that day that are still open (a settle
  subtracts from the row of the grant's day, so summing over days gives the open holds);
* ``committed``: spent amount on the settlement's day: a commit's actual cost (overrun
  included), or the held amount of a hold that expired (the call may have happened);
  ``committed_count`` counts commits only;
* ``released``, ``expired``: count and held amount of holds settled that way;
* ``overrun``: ``ReservationOverrun`` events (count, excess over the hold);
* ``denied``: denials (count, requested amount).

A day is the local date of the event's ``at_ms`` in the key's time zone (from its
``KeyIssued``); budget rows use the budget's own zone (from ``BudgetCreated``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from spendgate_common import finance_v1
from spendgate_common.events_v1 import (
    AnyEvent,
    BudgetClosed,
    BudgetCreated,
    BudgetUpdated,
    KeyIssued,
    KeyRevoked,
    ReservationCommitted,
    ReservationDenied,
    ReservationExpired,
    ReservationGranted,
    ReservationOverrun,
    ReservationReleased,
)
from spendgate_common.timezones import zone

# Counter columns of a rollup row, in storage order (audit_rollups, audit_budget_rollups).
COUNTERS = (
    "granted_count",
    "granted_micros",
    "reserved_micros",
    "committed_count",
    "committed_micros",
    "released_count",
    "released_micros",
    "expired_count",
    "expired_micros",
    "overrun_count",
    "overrun_micros",
    "denied_count",
    "denied_micros",
)
(
    GRANTED_COUNT,
    GRANTED,
    RESERVED,
    COMMITTED_COUNT,
    COMMITTED,
    RELEASED_COUNT,
    RELEASED,
    EXPIRED_COUNT,
    EXPIRED,
    OVERRUN_COUNT,
    OVERRUN,
    DENIED_COUNT,
    DENIED,
) = range(len(COUNTERS))

KeyRef = tuple[int, str]  # (partition, key_id)
DecisionRef = tuple[int, str]  # (partition, decision_id)
BudgetRef = tuple[int, str, str]  # (partition, tenant, budget_id)
KeyRollupRef = tuple[int, str, str, date]  # (partition, key_id, vendor, day)
BudgetRollupRef = tuple[int, str, str, date]  # (partition, tenant, budget_id, day)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    tenant: str
    label: str
    fleet_labels: tuple[str, ...]
    timezone: str


@dataclass(slots=True)
class DecisionRow:
    """A row of ``audit_decisions``. ``in_store``: loaded from Postgres (so a change is an
    update, not an insert); ``changed``: the batch changed or created it."""

    partition: int
    decision_id: str
    key_id: str
    vendor: str
    operation: str
    outcome: str
    amount_micros: int
    budget_ids: list[str]
    decided_at_ms: int
    decided_seq: int
    spent_micros: int = 0
    overrun_micros: int = 0
    settled_at_ms: int | None = None
    settled_seq: int | None = None
    denial_code: str | None = None
    denial_scope: str | None = None
    denial_scope_id: str | None = None
    in_store: bool = False
    changed: bool = True


@dataclass(frozen=True, slots=True)
class FinanceRow:
    partition: int
    seq: int
    tenant: str
    body: bytes


@dataclass(slots=True)
class KeyRollup:
    tenant: str
    label: str
    counters: list[int] = field(default_factory=lambda: [0] * len(COUNTERS))


@dataclass(frozen=True, slots=True)
class Skipped:
    """An event the rollups could not use, and why (its chain link is written anyway)."""

    partition: int
    seq: int
    reason: str


def local_day(at_ms: int, timezone: str) -> date:
    """The local date of ``at_ms`` in ``timezone`` (an IANA name validated by the ledger)."""
    tz = zone(timezone)
    assert tz is not None, timezone
    return (_EPOCH + timedelta(milliseconds=at_ms)).astimezone(tz).date()


def rfc3339(at_ms: int) -> str:
    """``at_ms`` as RFC 3339 UTC with milliseconds, e.g. ``2023-11-14T22:13:20.000Z``."""
    moment = _EPOCH + timedelta(milliseconds=at_ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def references(events: Iterable[tuple[int, int, AnyEvent]]) -> tuple[set[KeyRef], set[DecisionRef]]:
    """Keys and reservations that ``(partition, seq, event)`` refer to (to load them)."""
    keys: set[KeyRef] = set()
    decisions: set[DecisionRef] = set()
    for partition, _, event in events:
        key_id = getattr(event, "key_id", None)
        if isinstance(key_id, str) and not isinstance(event, KeyIssued):
            keys.add((partition, key_id))
        if isinstance(
            event,
            ReservationCommitted | ReservationReleased | ReservationExpired | ReservationOverrun,
        ):
            decisions.add((partition, event.reservation_id))
    return keys, decisions


def budget_references(
    events: Iterable[tuple[int, int, AnyEvent]],
    keys: Mapping[KeyRef, KeyInfo],
    decisions: Mapping[DecisionRef, DecisionRow],
) -> set[BudgetRef]:
    """Budgets whose time zone the events need: those their holds count against, the ones
    that denied them, given the loaded ``keys`` and ``decisions``."""
    budgets: set[BudgetRef] = set()
    for partition, _, event in events:
        if isinstance(event, ReservationGranted | ReservationOverrun | ReservationDenied):
            key = keys.get((partition, event.key_id))
            if key is None:
                continue
            if isinstance(event, ReservationDenied):
                ids = [event.scope_id] if event.scope != "key" else []
            else:
                ids = list(event.budget_ids)
            budgets.update((partition, key.tenant, budget_id) for budget_id in ids)
        elif isinstance(event, ReservationCommitted | ReservationReleased | ReservationExpired):
            decision = decisions.get((partition, event.reservation_id))
            key = keys.get((partition, event.key_id))
            if decision is not None and key is not None:
                budgets.update((partition, key.tenant, bid) for bid in decision.budget_ids)
    return budgets


class RollupBatch:
    """The effects of one batch. Load state in, :meth:`apply` each event, read out."""

    def __init__(
        self,
        keys: Mapping[KeyRef, KeyInfo],
        budget_zones: Mapping[BudgetRef, str],
        decisions: Mapping[DecisionRef, DecisionRow],
    ) -> None:
        self.keys = dict(keys)
        self.budget_zones = dict(budget_zones)
        # Every decision the batch read or created; written back at the end.
        self.decisions = dict(decisions)
        self.new_keys: list[tuple[int, KeyIssued]] = []
        self.revoked_keys: list[tuple[int, str, int]] = []
        self.new_budgets: list[tuple[int, BudgetCreated]] = []
        self.budget_caps: list[tuple[int, str, str, int]] = []
        self.closed_budgets: list[tuple[int, str, str, int]] = []
        self.key_rollups: dict[KeyRollupRef, KeyRollup] = {}
        self.budget_rollups: dict[BudgetRollupRef, list[int]] = {}
        self.finance: list[FinanceRow] = []
        self.skipped: list[Skipped] = []

    # ------------------------------------------------------------------------ outputs

    def decisions_to_insert(self) -> list[DecisionRow]:
        return [row for row in self.decisions.values() if row.changed and not row.in_store]

    def decisions_to_update(self) -> list[DecisionRow]:
        return [row for row in self.decisions.values() if row.changed and row.in_store]

    # ------------------------------------------------------------------------- apply

    def apply(self, partition: int, seq: int, event: AnyEvent) -> None:
        """Apply one event (in chaining order)."""
        match event:
            case KeyIssued():
                info = KeyInfo(event.tenant, event.label, tuple(event.fleet_labels), event.timezone)
                self.keys[(partition, event.key_id)] = info
                self.new_keys.append((partition, event))
            case KeyRevoked():
                if self._key(partition, seq, event.key_id) is not None:
                    self.revoked_keys.append((partition, event.key_id, event.at_ms))
            case BudgetCreated():
                self.budget_zones[(partition, event.tenant, event.budget_id)] = event.timezone
                self.new_budgets.append((partition, event))
            case BudgetUpdated():
                self.budget_caps.append(
                    (partition, event.tenant, event.budget_id, event.cap_micros)
                )
            case BudgetClosed():
                self.closed_budgets.append((partition, event.tenant, event.budget_id, event.at_ms))
            case ReservationGranted():
                self._granted(partition, seq, event)
            case ReservationDenied():
                self._denied(partition, seq, event)
            case ReservationCommitted() | ReservationReleased() | ReservationExpired():
                self._settled(partition, seq, event)
            case ReservationOverrun():
                self._overrun(partition, seq, event)

    def _key(self, partition: int, seq: int, key_id: str) -> KeyInfo | None:
        key = self.keys.get((partition, key_id))
        if key is None:
            self._skip(partition, seq, f"unknown key {key_id!r}")
        return key

    def _skip(self, partition: int, seq: int, reason: str) -> None:
        self.skipped.append(Skipped(partition, seq, reason))

    def _key_row(
        self, partition: int, key_id: str, key: KeyInfo, vendor: str, at_ms: int
    ) -> list[int]:
        ref = (partition, key_id, vendor, local_day(at_ms, key.timezone))
        row = self.key_rollups.get(ref)
        if row is None:
            row = self.key_rollups[ref] = KeyRollup(key.tenant, key.label)
        return row.counters

    def _budget_rows(
        self, partition: int, seq: int, tenant: str, budget_ids: Iterable[str], at_ms: int
    ) -> list[list[int]]:
        rows: list[list[int]] = []
        for budget_id in budget_ids:
            timezone = self.budget_zones.get((partition, tenant, budget_id))
            if timezone is None:
                self._skip(partition, seq, f"unknown budget {budget_id!r}")
                continue
            ref = (partition, tenant, budget_id, local_day(at_ms, timezone))
            row = self.budget_rollups.get(ref)
            if row is None:
                row = self.budget_rollups[ref] = [0] * len(COUNTERS)
            rows.append(row)
        return rows

    def _granted(self, partition: int, seq: int, event: ReservationGranted) -> None:
        key = self._key(partition, seq, event.key_id)
        if key is None:
            return
        rows = [self._key_row(partition, event.key_id, key, event.vendor, event.at_ms)]
        rows += self._budget_rows(partition, seq, key.tenant, event.budget_ids, event.at_ms)
        for row in rows:
            row[GRANTED_COUNT] += 1
            row[GRANTED] += event.amount_micros
            row[RESERVED] += event.amount_micros
        self.decisions[(partition, event.reservation_id)] = DecisionRow(
            partition=partition,
            decision_id=event.reservation_id,
            key_id=event.key_id,
            vendor=event.vendor,
            operation=event.operation,
            outcome="open",
            amount_micros=event.amount_micros,
            budget_ids=list(event.budget_ids),
            decided_at_ms=event.at_ms,
            decided_seq=seq,
        )

    def _denied(self, partition: int, seq: int, event: ReservationDenied) -> None:
        key = self._key(partition, seq, event.key_id)
        if key is None:
            return
        rows = [self._key_row(partition, event.key_id, key, event.vendor, event.at_ms)]
        if event.scope != "key":
            rows += self._budget_rows(partition, seq, key.tenant, [event.scope_id], event.at_ms)
        for row in rows:
            row[DENIED_COUNT] += 1
            row[DENIED] += event.amount_micros
        self.decisions[(partition, event.decision_id)] = DecisionRow(
            partition=partition,
            decision_id=event.decision_id,
            key_id=event.key_id,
            vendor=event.vendor,
            operation=event.operation,
            outcome="denied",
            amount_micros=event.amount_micros,
            budget_ids=[],
            decided_at_ms=event.at_ms,
            decided_seq=seq,
            denial_code=event.code,
            denial_scope=event.scope,
            denial_scope_id=event.scope_id,
        )
        data = finance_v1.DeniedData(
            tenant=key.tenant,
            key_id=event.key_id,
            label=key.label,
            fleet_labels=list(key.fleet_labels),
            vendor=event.vendor,
            operation=event.operation,
            decision_id=event.decision_id,
            code=event.code,
            requested_micros=event.amount_micros,
            scope=event.scope,
            scope_id=event.scope_id,
            committed_micros=event.committed_micros,
            reserved_micros=event.reserved_micros,
            cap_micros=event.cap_micros,
            denied_at=rfc3339(event.at_ms),
            day=local_day(event.at_ms, key.timezone).isoformat(),
            timezone=key.timezone,
        )
        self._finance(
            partition,
            seq,
            key.tenant,
            finance_v1.ReservationDenied(
                **_envelope(partition, seq, event.decision_id, event.at_ms), data=data
            ),
        )

    def _open_decision(
        self, partition: int, seq: int, reservation_id: str, key_id: str
    ) -> DecisionRow | None:
        decision = self.decisions.get((partition, reservation_id))
        if decision is None or decision.key_id != key_id:
            self._skip(partition, seq, f"unknown reservation {reservation_id!r}")
            return None
        return decision

    def _settled(
        self,
        partition: int,
        seq: int,
        event: ReservationCommitted | ReservationReleased | ReservationExpired,
    ) -> None:
        key = self._key(partition, seq, event.key_id)
        if key is None:
            return
        decision = self._open_decision(partition, seq, event.reservation_id, event.key_id)
        if decision is None:
            return
        if decision.outcome != "open":
            self._skip(partition, seq, f"reservation {event.reservation_id!r} already settled")
            return
        held = event.reserved_micros
        granted_at_ms = decision.decided_at_ms
        key_grant = self._key_row(partition, event.key_id, key, decision.vendor, granted_at_ms)
        key_settle = self._key_row(partition, event.key_id, key, decision.vendor, event.at_ms)
        grant_rows = [key_grant]
        grant_rows += self._budget_rows(
            partition, seq, key.tenant, decision.budget_ids, granted_at_ms
        )
        settle_rows = [key_settle]
        settle_rows += self._budget_rows(
            partition, seq, key.tenant, decision.budget_ids, event.at_ms
        )
        for row in grant_rows:
            row[RESERVED] -= held
        if isinstance(event, ReservationCommitted):
            outcome: finance_v1.Outcome = "committed"
            spent = event.actual_micros
            for row in settle_rows:
                row[COMMITTED_COUNT] += 1
                row[COMMITTED] += spent
        elif isinstance(event, ReservationReleased):
            outcome, spent = "released", 0
            for row in settle_rows:
                row[RELEASED_COUNT] += 1
                row[RELEASED] += held
        else:
            outcome, spent = "expired", held
            for row in settle_rows:
                row[EXPIRED_COUNT] += 1
                row[EXPIRED] += held
                row[COMMITTED] += held
        decision.outcome = outcome
        decision.spent_micros = spent
        decision.overrun_micros = max(0, spent - held) if outcome == "committed" else 0
        decision.settled_at_ms = event.at_ms
        decision.settled_seq = seq
        decision.changed = True
        self._finance_settled(partition, seq, key, decision, outcome, held)

    def _finance_settled(
        self,
        partition: int,
        seq: int,
        key: KeyInfo,
        decision: DecisionRow,
        outcome: finance_v1.Outcome,
        held: int,
    ) -> None:
        assert decision.settled_at_ms is not None
        data = finance_v1.SettledData(
            tenant=key.tenant,
            key_id=decision.key_id,
            label=key.label,
            fleet_labels=list(key.fleet_labels),
            vendor=decision.vendor,
            operation=decision.operation,
            reservation_id=decision.decision_id,
            outcome=outcome,
            reserved_micros=held,
            spent_micros=decision.spent_micros,
            overrun_micros=decision.overrun_micros,
            budget_ids=list(decision.budget_ids),
            granted_at=rfc3339(decision.decided_at_ms),
            settled_at=rfc3339(decision.settled_at_ms),
            day=local_day(decision.settled_at_ms, key.timezone).isoformat(),
            timezone=key.timezone,
        )
        self._finance(
            partition,
            seq,
            key.tenant,
            finance_v1.ReservationSettled(
                **_envelope(partition, seq, decision.decision_id, decision.settled_at_ms),
                data=data,
            ),
        )

    def _overrun(self, partition: int, seq: int, event: ReservationOverrun) -> None:
        key = self._key(partition, seq, event.key_id)
        if key is None:
            return
        decision = self._open_decision(partition, seq, event.reservation_id, event.key_id)
        if decision is None:
            return
        rows = [self._key_row(partition, event.key_id, key, decision.vendor, event.at_ms)]
        rows += self._budget_rows(partition, seq, key.tenant, event.budget_ids, event.at_ms)
        for row in rows:
            row[OVERRUN_COUNT] += 1
            row[OVERRUN] += event.overrun_micros

    def _finance(
        self, partition: int, seq: int, tenant: str, event: finance_v1.FinanceEvent
    ) -> None:
        body = finance_v1.encode_finance_event(event)
        self.finance.append(FinanceRow(partition, seq, tenant, body))


def _envelope(partition: int, seq: int, subject: str, at_ms: int) -> dict[str, Any]:
    """The CloudEvents 1.0 attributes every finance event carries (docs/finance.md)."""
    return {
        "specversion": "1.0",
        "id": finance_v1.event_id(partition, seq),
        "source": finance_v1.source(partition),
        "subject": subject,
        "time": rfc3339(at_ms),
        "datacontenttype": "application/json",
        "spendgatepartition": partition,
        "spendgateseq": seq,
    }
