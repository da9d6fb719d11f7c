"""Ledger events, version 1: what happened, in the past tense.

Every command that changes state, and every denial, becomes one event in its partition's
ordered log (Postgres ``events``, primary key ``(partition, seq)``) and is then published
to the JetStream stream ``SPENDGATE_EVENTS``. The JSON encoding of an event by
:func:`encode_event` is its *canonical bytes*: they are stored verbatim in
``events.body``, published verbatim, and hashed into the audit chain (docs/audit.md).

Adding an optional field at the end of a struct is compatible; anything else is a new
version module. Amounts are ``int`` micro-USD, times are ``int`` milliseconds since the
Unix epoch (``*_at_ms``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

Window = Literal["total", "daily"]


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


AnyEvent = (
    KeyIssued | ReservationGranted | ReservationDenied | ReservationCommitted | ReservationReleased
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
