"""What the control plane answers: one msgspec Struct per response body.

The same Structs encode the responses and, through :mod:`spendgate_gateway._openapi`,
describe them in the OpenAPI document, so the document cannot drift from the bodies.
Amounts are integer ``*_micros`` plus the same amount as a decimal string ``*_usd``;
times are ISO 8601 UTC strings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal, TypedDict

import msgspec

from spendgate_common.events_v1 import BudgetScope, Window
from spendgate_common.ledger_v1 import BudgetState, Denied, Granted, KeyState, Settled
from spendgate_common.money import format_usd


class Usage(msgspec.Struct, kw_only=True):
    """A cap's use in its current window. ``remaining`` is ``cap - committed - reserved``,
    never below zero; ``overrun`` is the part of ``committed`` that exceeded holds."""

    cap_micros: int
    committed_micros: int
    reserved_micros: int
    remaining_micros: int
    overrun_micros: int
    cap_usd: str
    committed_usd: str
    reserved_usd: str
    remaining_usd: str
    overrun_usd: str


class KeyView(Usage, kw_only=True):
    """A vault key (never its secret) and its use in its current window."""

    key_id: str
    label: str
    tenant: str
    window: Window
    timezone: str
    window_start_at: str
    expires_at: str
    revoked: bool
    allowed_vendors: list[str] | None
    fleet_labels: list[str]
    # Open budgets the key draws on (fleet budgets matching its labels, tenant budgets).
    budget_ids: list[str]


class KeyList(msgspec.Struct, kw_only=True):
    """A page of keys in (label, key id) order; ``next_cursor`` is null on the last page.
    A page may hold fewer than ``limit`` keys while more follow."""

    keys: list[KeyView]
    next_cursor: str | None


class IssuedKey(msgspec.Struct, kw_only=True):
    """A new vault key: ``key`` is the plaintext, shown only in this answer."""

    key: str
    key_id: str
    label: str
    tenant: str
    window: Window
    timezone: str
    cap_micros: int
    cap_usd: str
    allowed_vendors: list[str] | None
    fleet_labels: list[str]
    expires_at: str


class BudgetView(Usage, kw_only=True):
    """A fleet, vendor or tenant budget and its use in its current window."""

    budget_id: str
    tenant: str
    scope: BudgetScope
    match: str
    window: Window
    timezone: str
    window_start_at: str
    closed: bool


class BudgetList(msgspec.Struct, kw_only=True):
    """A page of budgets in id order; may be short, even empty, while ``next_cursor`` is
    set."""

    budgets: list[BudgetView]
    next_cursor: str | None


class RunSpend(Usage, kw_only=True):
    """A run's spend: the totals over all keys with exactly this label (each key in its own
    current window; ``remaining`` sums each key's own remaining), and a page of the keys."""

    label: str
    tenant: str
    key_count: int
    keys: list[KeyView]
    next_cursor: str | None


class Reservation(msgspec.Struct, kw_only=True):
    """A granted reservation. ``committed`` / ``reserved`` / ``cap`` / ``remaining`` are the
    key's own figures right after the grant (on a replay: after the original grant)."""

    reservation_id: str
    key_id: str
    vendor: str
    operation: str
    amount_micros: int
    amount_usd: str
    expires_at: str
    committed_micros: int
    reserved_micros: int
    cap_micros: int
    remaining_micros: int
    committed_usd: str
    reserved_usd: str
    cap_usd: str
    remaining_usd: str
    # An earlier request with the same idempotency key got this grant: nothing new was
    # reserved. ``settled``: that reservation has been committed, released or expired.
    replayed: bool
    settled: bool


class Settlement(msgspec.Struct, kw_only=True):
    """A reservation committed (at ``actual``) or released; ``released`` is the part of
    the hold returned, ``overrun`` the part of ``actual`` above the hold."""

    reservation_id: str
    outcome: Literal["committed", "released"]
    actual_micros: int
    released_micros: int
    overrun_micros: int
    actual_usd: str
    released_usd: str
    overrun_usd: str


class Error(msgspec.Struct, kw_only=True):
    """Every error: a stable ``code`` (docs/api.md) and a message for humans."""

    code: str
    message: str


class Denial(msgspec.Struct, kw_only=True):
    """429 ``cap_exhausted``: the first cap (``scope``, ``scope_id``) the amount did not
    fit, with its figures; the same body as a refused proxy call, without the vendor's
    ``error`` object."""

    code: str
    message: str
    spent_usd: str
    reserved_usd: str
    remaining_usd: str
    cap_usd: str
    requested_usd: str
    spent_micros: int
    reserved_micros: int
    cap_micros: int
    requested_micros: int
    scope: str
    scope_id: str
    decision_id: str
    replayed: bool


RESPONSE_BODIES: tuple[type[msgspec.Struct], ...] = (
    KeyView,
    KeyList,
    IssuedKey,
    BudgetView,
    BudgetList,
    RunSpend,
    Reservation,
    Settlement,
    Error,
    Denial,
)


def iso(ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC (``2026-12-24T08:11:54.188000Z``)."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


class UsageFields(TypedDict):
    """The fields of :class:`Usage`, to pass as keyword arguments."""

    cap_micros: int
    committed_micros: int
    reserved_micros: int
    remaining_micros: int
    overrun_micros: int
    cap_usd: str
    committed_usd: str
    reserved_usd: str
    remaining_usd: str
    overrun_usd: str


def usage(
    cap: int, committed: int, reserved: int, overrun: int, *, remaining: int | None = None
) -> UsageFields:
    """One cap's figures; ``remaining`` defaults to ``cap - committed - reserved`` (>= 0)."""
    if remaining is None:
        remaining = max(0, cap - committed - reserved)
    return {
        "cap_micros": cap,
        "committed_micros": committed,
        "reserved_micros": reserved,
        "remaining_micros": remaining,
        "overrun_micros": overrun,
        "cap_usd": format_usd(cap),
        "committed_usd": format_usd(committed),
        "reserved_usd": format_usd(reserved),
        "remaining_usd": format_usd(remaining),
        "overrun_usd": format_usd(overrun),
    }


def key_view(state: KeyState) -> KeyView:
    return KeyView(
        key_id=state.key_id,
        label=state.label,
        tenant=state.tenant,
        window=state.window,
        timezone=state.timezone,
        window_start_at=iso(state.window_start_at_ms),
        expires_at=iso(state.expires_at_ms),
        revoked=state.revoked,
        allowed_vendors=state.allowed_vendors,
        fleet_labels=state.fleet_labels,
        budget_ids=state.budget_ids,
        **usage(
            state.cap_micros, state.committed_micros, state.reserved_micros, state.overrun_micros
        ),
    )


def budget_view(state: BudgetState) -> BudgetView:
    return BudgetView(
        budget_id=state.budget_id,
        tenant=state.tenant,
        scope=state.scope,
        match=state.match,
        window=state.window,
        timezone=state.timezone,
        window_start_at=iso(state.window_start_at_ms),
        closed=state.closed,
        **usage(
            state.cap_micros, state.committed_micros, state.reserved_micros, state.overrun_micros
        ),
    )


def reservation(grant: Granted, key_id: str, vendor: str, operation: str) -> Reservation:
    remaining = max(0, grant.cap_micros - grant.committed_micros - grant.reserved_micros)
    return Reservation(
        reservation_id=grant.reservation_id,
        key_id=key_id,
        vendor=vendor,
        operation=operation,
        amount_micros=grant.amount_micros,
        amount_usd=format_usd(grant.amount_micros),
        expires_at=iso(grant.expires_at_ms),
        committed_micros=grant.committed_micros,
        reserved_micros=grant.reserved_micros,
        cap_micros=grant.cap_micros,
        remaining_micros=remaining,
        committed_usd=format_usd(grant.committed_micros),
        reserved_usd=format_usd(grant.reserved_micros),
        cap_usd=format_usd(grant.cap_micros),
        remaining_usd=format_usd(remaining),
        replayed=grant.replayed,
        settled=grant.settled,
    )


def settlement(settled: Settled, outcome: Literal["committed", "released"]) -> Settlement:
    return Settlement(
        reservation_id=settled.reservation_id,
        outcome=outcome,
        actual_micros=settled.actual_micros,
        released_micros=settled.released_micros,
        overrun_micros=settled.overrun_micros,
        actual_usd=format_usd(settled.actual_micros),
        released_usd=format_usd(settled.released_micros),
        overrun_usd=format_usd(settled.overrun_micros),
    )


def denial(denied: Denied) -> Denial:
    remaining = max(0, denied.cap_micros - denied.committed_micros - denied.reserved_micros)
    return Denial(
        code=denied.code,
        message=denied.message,
        spent_usd=format_usd(denied.committed_micros),
        reserved_usd=format_usd(denied.reserved_micros),
        remaining_usd=format_usd(remaining),
        cap_usd=format_usd(denied.cap_micros),
        requested_usd=format_usd(denied.requested_micros),
        spent_micros=denied.committed_micros,
        reserved_micros=denied.reserved_micros,
        cap_micros=denied.cap_micros,
        requested_micros=denied.requested_micros,
        scope=denied.scope,
        scope_id=denied.scope_id,
        decision_id=denied.decision_id,
        replayed=denied.replayed,
    )
