"""Ledger events, version 1: what happened, in the past tense.

Every command that changes state, and every denial, becomes one event in its partition's
ordered log (Postgres ``events``, primary key ``(partition, seq)``) and is then published
to the JetStream stream ``SPENDGATE_EVENTS``. The JSON encoding of an event by
:func:`encode_event` is its *canonical bytes*: they are stored verbatim in
``events.body``, published verbatim, and hashed into the audit chain (docs/audit.md).

Adding an optional field at the end of a struct, or a new event type, is compatible;
anything else is a new version module. Amounts are ``int`` micro-USD, times are ``int``
milliseconds since the Unix epoch (``*_at_ms``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

Window = Literal["total", "daily", "monthly"]
Scope = Literal["key", "fleet", "vendor", "tenant"]
BudgetScope = Literal["fleet", "vendor", "tenant"]
ContractDecision = Literal["allow", "stop", "require_approval", "degrade"]


class ContractRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One rule of a tenant's contract set (docs/contracts.md).

    ``when`` is a CEL expression over ``request`` and ``budget`` that must be a bool; when
    it is true the rule's ``decision`` applies (the most restrictive match wins).
    """

    name: str
    when: str
    decision: ContractDecision
    message: str = ""
    # require_approval: how long the pending approval waits for an operator.
    approval_ttl_seconds: int = 3_600
    # degrade: the cheaper model to switch LLM calls to (None keeps the model).
    degrade_model: str | None = None
    # degrade: clamp the call's maximum output tokens so its estimate fits what remains.
    degrade_clamp_max_tokens: bool = True


class Event(msgspec.Struct, frozen=True, tag_field="type", forbid_unknown_fields=True):
    """Base of all events. ``at_ms`` is the ledger's clock when the event was decided."""

    at_ms: int


class KeyIssued(Event, frozen=True, tag="KeyIssued"):
    key_id: str
    tenant: str
    label: str
    secret_sha256: str
    cap_micros: int
    window: Window
    timezone: str
    expires_at_ms: int
    # None: every vendor. Otherwise the only vendors this key may reserve for.
    allowed_vendors: list[str] | None = None
    # Extra labels matched (by prefix) against fleet budgets, besides the key's label.
    fleet_labels: list[str] = msgspec.field(default_factory=list)


class KeyRevoked(Event, frozen=True, tag="KeyRevoked"):
    key_id: str
    reason: str


class BudgetCreated(Event, frozen=True, tag="BudgetCreated"):
    """A cap on a scope: ``fleet`` (keys whose label, or one of their fleet labels, starts
    with ``match``), ``vendor`` (reserves for the vendor named ``match``) or ``tenant``
    (every reserve of the tenant; ``match`` is empty)."""

    budget_id: str
    tenant: str
    scope: BudgetScope
    match: str
    cap_micros: int
    window: Window
    timezone: str


class BudgetUpdated(Event, frozen=True, tag="BudgetUpdated"):
    tenant: str
    budget_id: str
    previous_cap_micros: int
    cap_micros: int


class BudgetClosed(Event, frozen=True, tag="BudgetClosed"):
    """The budget no longer applies to new reserves; its open holds still settle into it."""

    tenant: str
    budget_id: str


class ReservationGranted(Event, frozen=True, tag="ReservationGranted"):
    reservation_id: str
    key_id: str
    amount_micros: int
    vendor: str
    operation: str
    idempotency_key: str | None
    request_sha256: str
    window_start_at_ms: int
    expires_at_ms: int
    # The budgets (besides the key's own cap) this hold counts against.
    budget_ids: list[str] = msgspec.field(default_factory=list)
    # The version of the price data the estimate used ("" when the caller priced it).
    pricing_version: str = ""
    # The approval this grant used (its operator said yes), if a contract asked for one.
    approval_id: str = ""
    # The degrade rule the caller applied before this reserve, if any.
    degraded_by: str = ""


class ReservationDenied(Event, frozen=True, tag="ReservationDenied"):
    decision_id: str
    key_id: str
    amount_micros: int
    vendor: str
    operation: str
    idempotency_key: str | None
    request_sha256: str
    code: str
    scope: str
    scope_id: str
    committed_micros: int
    reserved_micros: int
    cap_micros: int
    window_start_at_ms: int


class ReservationCommitted(Event, frozen=True, tag="ReservationCommitted"):
    reservation_id: str
    key_id: str
    reserved_micros: int
    actual_micros: int
    window_start_at_ms: int


class ReservationReleased(Event, frozen=True, tag="ReservationReleased"):
    reservation_id: str
    key_id: str
    reserved_micros: int
    reason: str


class ReservationOverrun(Event, frozen=True, tag="ReservationOverrun"):
    """A commit's actual cost exceeded its hold. It follows its ``ReservationCommitted``,
    which committed the full actual cost; this event records the excess on its own."""

    reservation_id: str
    key_id: str
    reserved_micros: int
    actual_micros: int
    overrun_micros: int
    # The budgets the hold counted against (the overrun is shown on each of them).
    budget_ids: list[str] = msgspec.field(default_factory=list)


class ReservationExpired(Event, frozen=True, tag="ReservationExpired"):
    """A hold past its ``expires_at_ms`` settled conservatively: spent at the reserved
    amount, because the call may have reached the vendor."""

    reservation_id: str
    key_id: str
    reserved_micros: int


class ReservationOutcomeUnknown(Event, frozen=True, tag="ReservationOutcomeUnknown"):
    """The call under this hold may or may not have reached the vendor (a timeout, a 5xx).

    The hold stays. A retry with the same idempotency key may resume it (and settle it);
    otherwise it expires and is counted as spent."""

    reservation_id: str
    key_id: str
    reason: str


class ReservationResumed(Event, frozen=True, tag="ReservationResumed"):
    """A retry with the same idempotency key took over a hold whose outcome was unknown."""

    reservation_id: str
    key_id: str


class ContractsSet(Event, frozen=True, tag="ContractsSet"):
    """A tenant's contract set was replaced (``rules`` empty: no contracts)."""

    tenant: str
    version: int
    rules: list[ContractRule]
    source_sha256: str


class ApprovalRequested(Event, frozen=True, tag="ApprovalRequested"):
    """A reserve matched a ``require_approval`` rule: it waits for an operator."""

    approval_id: str
    tenant: str
    key_id: str
    label: str
    amount_micros: int
    vendor: str
    operation: str
    model: str
    # The call's identity: its idempotency key, else ``sha256:<request fingerprint>``.
    request_identity: str
    request_sha256: str
    contract: str
    message: str
    expires_at_ms: int


class ApprovalDecided(Event, frozen=True, tag="ApprovalDecided"):
    approval_id: str
    tenant: str
    approved: bool
    by: str
    note: str


AnyEvent = (
    KeyIssued
    | KeyRevoked
    | BudgetCreated
    | BudgetUpdated
    | BudgetClosed
    | ReservationGranted
    | ReservationDenied
    | ReservationCommitted
    | ReservationReleased
    | ReservationOverrun
    | ReservationExpired
    | ReservationOutcomeUnknown
    | ReservationResumed
    | ContractsSet
    | ApprovalRequested
    | ApprovalDecided
)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)


def encode_event(event: AnyEvent) -> bytes:
    """Canonical bytes of ``event`` (compact JSON, fields in declaration order)."""
    return _encoder.encode(event)


def decode_event(body: bytes) -> AnyEvent:
    """Decode canonical bytes back into an event; raises ``msgspec.ValidationError``."""
    event: AnyEvent = _decoder.decode(body)
    return event
