"""What the gateway answers, as typed values (money as integer micro-USD)."""

from __future__ import annotations

import msgspec


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    """A granted hold of ``amount_micros`` until ``expires_at``; commit or release it.
    ``replayed``: an earlier reserve with the same idempotency key got this grant."""

    reservation_id: str
    key_id: str
    vendor: str
    operation: str
    amount_micros: int
    expires_at: str
    committed_micros: int
    reserved_micros: int
    cap_micros: int
    remaining_micros: int
    replayed: bool = False
    settled: bool = False


class Settlement(msgspec.Struct, frozen=True, kw_only=True):
    """A commit or release: ``outcome`` is ``committed`` or ``released``."""

    reservation_id: str
    outcome: str
    actual_micros: int
    released_micros: int
    overrun_micros: int


class KeyState(msgspec.Struct, frozen=True, kw_only=True):
    """A vault key's use in its current window (``GET /v1/keys/{key_id}``)."""

    key_id: str
    label: str
    tenant: str
    cap_micros: int
    committed_micros: int
    reserved_micros: int
    remaining_micros: int
    overrun_micros: int
    expires_at: str
    revoked: bool
