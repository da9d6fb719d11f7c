"""The pure core of a partition: budget state, decisions and event application. No I/O.

:meth:`PartitionState.decide` turns a command into a result and the events it causes,
without changing anything; :meth:`PartitionState.apply` is the only way state changes,
and it takes events only. Live processing is ``decide`` then ``apply``; recovery is
``apply`` over the log. So the state after replay equals the state before a crash by
construction, and the log is the single source of truth.

Invariant (checked by assertion after every applied event): for every key and its current
window, ``committed + reserved <= cap`` unless a commit's actual cost exceeded its hold
(an overrun, which is recorded, never dropped).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from spendgate_common.events_v1 import (
    AnyEvent,
    KeyIssued,
    ReservationCommitted,
    ReservationDenied,
    ReservationGranted,
    ReservationReleased,
    Window,
)
from spendgate_common.ledger_v1 import (
    AnyCommand,
    AnyResult,
    Commit,
    Denied,
    Failed,
    Granted,
    IssueKey,
    KeyCreated,
    KeyState,
    QueryKey,
    Release,
    Reserve,
    Settled,
)
from spendgate_common.limits import (
    AMOUNT_MICROS_MAX,
    HOLD_MS_MAX,
    IDEMPOTENCY_KEY_CHARS_MAX,
    LABEL_CHARS_MAX,
    OPERATION_CHARS_MAX,
    VENDOR_CHARS_MAX,
)
from spendgate_common.money import format_usd
from spendgate_common.partitioning import partition_for_tenant
from spendgate_common.timezones import zone
from spendgate_common.vault_keys import KEY_ID_PATTERN, SECRET_SHA256_PATTERN

_WINDOWS: tuple[Window, ...] = ("total", "daily")


@dataclass(slots=True)
class KeyRecord:
    key_id: str
    tenant: str
    label: str
    secret_sha256: str
    cap_micros: int
    window: Window
    timezone: str
    expires_at_ms: int
    window_start_at_ms: int = 0
    committed_micros: int = 0
    reserved_micros: int = 0


@dataclass(slots=True)
class Hold:
    reservation_id: str
    key_id: str
    amount_micros: int
    expires_at_ms: int


@dataclass(slots=True)
class IdempotencyEntry:
    request_sha256: str
    result: Granted | Denied


@dataclass(frozen=True, slots=True)
class Decision:
    """What a command produced: the reply and the events to append (maybe none)."""

    result: AnyResult
    events: tuple[AnyEvent, ...] = ()


def window_start_at_ms(window: Window, timezone: str, now_ms: int) -> int:
    """Start of the window containing ``now_ms``: 0 for ``total``, local midnight for ``daily``."""
    if window == "total":
        return 0
    tz = zone(timezone)
    assert tz is not None, timezone  # validated when the key was issued
    local = datetime.fromtimestamp(now_ms / 1000, tz=UTC).astimezone(tz)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return int(midnight.timestamp()) * 1000


def request_fingerprint(command: Reserve) -> str:
    """What makes two reserves "the same request" for idempotency."""
    canonical = msgspec.json.encode([command.vendor, command.operation, command.amount_micros])
    return hashlib.sha256(canonical).hexdigest()


@dataclass(slots=True)
class PartitionState:
    partition: int
    partition_count: int
    default_hold_ms: int
    last_seq: int = 0
    # Ledger clock of the last applied event; decisions never use an earlier time.
    last_at_ms: int = 0
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    settled: dict[str, str] = field(default_factory=dict)
    idempotency: dict[tuple[str, str], IdempotencyEntry] = field(default_factory=dict)

    # ----------------------------------------------------------------- decisions (pure)

    def decide(self, command: AnyCommand, now_ms: int) -> Decision:
        """Decide ``command`` against the current state. Changes nothing."""
        # Never decide "before" the last event: a takeover replica's clock may be behind,
        # and windows must not move backwards (a past window would look empty).
        now_ms = max(now_ms, self.last_at_ms)
        if partition_for_tenant(command.tenant, self.partition_count) != self.partition:
            return Decision(Failed("wrong_partition", "tenant does not belong to this partition"))
        match command:
            case Reserve():
                return self._decide_reserve(command, now_ms)
            case Commit() | Release():
                return self._decide_settle(command, now_ms)
            case IssueKey():
                return self._decide_issue_key(command, now_ms)
            case QueryKey():
                return self._decide_query(command, now_ms)
        raise AssertionError(f"unhandled command {command!r}")  # pragma: no cover

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}_{self.partition}_{self.last_seq + 1}"

    def _authenticate(
        self, tenant: str, key_id: str, secret_sha256: str, now_ms: int, *, for_reserve: bool
    ) -> KeyRecord | Failed:
        key = self.keys.get(key_id)
        # Unknown key, another tenant's key (tenants share partitions) and a wrong secret
        # look the same to the caller on purpose.
        if (
            key is None
            or key.tenant != tenant
            or not hmac.compare_digest(key.secret_sha256, secret_sha256)
        ):
            return Failed("invalid_key", "the vault key is not valid")
        # Expiry stops new reservations only: a call granted before the key expired must
        # still be committed at its real cost (or released).
        if for_reserve and now_ms >= key.expires_at_ms:
            return Failed("key_expired", "the vault key has expired")
        return key

    def _decide_reserve(self, command: Reserve, now_ms: int) -> Decision:
        key = self._authenticate(
            command.tenant, command.key_id, command.secret_sha256, now_ms, for_reserve=True
        )
        if isinstance(key, Failed):
            return Decision(key)
        problem = _reserve_problem(command)
        if problem is not None:
            return Decision(problem)
        fingerprint = request_fingerprint(command)
        if command.idempotency_key is not None:
            seen = self.idempotency.get((command.key_id, command.idempotency_key))
            if seen is not None:
                if seen.request_sha256 != fingerprint:
                    return Decision(
                        Failed(
                            "idempotency_conflict",
                            "this idempotency key was used with a different request",
                        )
                    )
                return Decision(msgspec.structs.replace(seen.result, replayed=True))
        window_start = _current_window_start(key, now_ms)
        committed = key.committed_micros if window_start == key.window_start_at_ms else 0
        if committed + key.reserved_micros + command.amount_micros > key.cap_micros:
            return self._deny(command, key, committed, window_start, fingerprint, now_ms)
        hold_ms = command.hold_ms if command.hold_ms > 0 else self.default_hold_ms
        reservation_id = self._next_id("rsv")
        granted = ReservationGranted(
            at_ms=now_ms,
            reservation_id=reservation_id,
            key_id=key.key_id,
            amount_micros=command.amount_micros,
            vendor=command.vendor,
            operation=command.operation,
            idempotency_key=command.idempotency_key,
            request_sha256=fingerprint,
            window_start_at_ms=window_start,
            expires_at_ms=now_ms + hold_ms,
        )
        result = Granted(
            reservation_id=reservation_id,
            amount_micros=command.amount_micros,
            expires_at_ms=granted.expires_at_ms,
            committed_micros=committed,
            reserved_micros=key.reserved_micros + command.amount_micros,
            cap_micros=key.cap_micros,
        )
        return Decision(result, (granted,))

    def _deny(
        self,
        command: Reserve,
        key: KeyRecord,
        committed: int,
        window_start: int,
        fingerprint: str,
        now_ms: int,
    ) -> Decision:
        decision_id = self._next_id("dcn")
        denied = ReservationDenied(
            at_ms=now_ms,
            decision_id=decision_id,
            key_id=key.key_id,
            amount_micros=command.amount_micros,
            vendor=command.vendor,
            operation=command.operation,
            idempotency_key=command.idempotency_key,
            request_sha256=fingerprint,
            code="cap_exhausted",
            scope="key",
            scope_id=key.key_id,
            committed_micros=committed,
            reserved_micros=key.reserved_micros,
            cap_micros=key.cap_micros,
            window_start_at_ms=window_start,
        )
        result = _denied_result(denied, key.label, key.window)
        return Decision(result, (denied,))

    def _decide_settle(self, command: Commit | Release, now_ms: int) -> Decision:
        key = self._authenticate(
            command.tenant, command.key_id, command.secret_sha256, now_ms, for_reserve=False
        )
        if isinstance(key, Failed):
            return Decision(key)
        hold = self.holds.get(command.reservation_id)
        if hold is None or hold.key_id != key.key_id:
            outcome = self.settled.get(command.reservation_id)
            if outcome is not None:
                return Decision(
                    Failed("already_settled", f"reservation was already settled ({outcome})")
                )
            return Decision(Failed("reservation_not_found", "no such open reservation"))
        if isinstance(command, Release):
            released = ReservationReleased(
                at_ms=now_ms,
                reservation_id=hold.reservation_id,
                key_id=key.key_id,
                reserved_micros=hold.amount_micros,
                reason=command.reason[:OPERATION_CHARS_MAX],
            )
            return Decision(Settled(hold.reservation_id, 0, hold.amount_micros), (released,))
        if not 0 <= command.actual_micros <= AMOUNT_MICROS_MAX:
            return Decision(Failed("invalid_amount", "actual amount out of range"))
        committed = ReservationCommitted(
            at_ms=now_ms,
            reservation_id=hold.reservation_id,
            key_id=key.key_id,
            reserved_micros=hold.amount_micros,
            actual_micros=command.actual_micros,
            window_start_at_ms=_current_window_start(key, now_ms),
        )
        released_micros = max(0, hold.amount_micros - command.actual_micros)
        result = Settled(hold.reservation_id, command.actual_micros, released_micros)
        return Decision(result, (committed,))

    def _decide_issue_key(self, command: IssueKey, now_ms: int) -> Decision:
        if not KEY_ID_PATTERN.fullmatch(command.key_id):
            return Decision(Failed("invalid_key_id", "key id must be 16 of a-z and 2-7"))
        if not SECRET_SHA256_PATTERN.fullmatch(command.secret_sha256):
            return Decision(Failed("invalid_secret_hash", "secret_sha256 must be 64 hex digits"))
        if command.key_id in self.keys:
            return Decision(Failed("key_exists", "a key with this id already exists"))
        if not 0 < command.cap_micros <= AMOUNT_MICROS_MAX:
            return Decision(Failed("invalid_amount", "cap out of range"))
        if command.window not in _WINDOWS:
            return Decision(Failed("invalid_window", f"window must be one of {_WINDOWS}"))
        if not 0 < len(command.label) <= LABEL_CHARS_MAX:
            return Decision(Failed("invalid_label", "label length out of range"))
        if command.expires_at_ms <= now_ms:
            return Decision(Failed("invalid_ttl", "the key would already be expired"))
        if zone(command.timezone) is None:
            return Decision(Failed("invalid_timezone", "not an IANA time zone"))
        issued = KeyIssued(
            at_ms=now_ms,
            key_id=command.key_id,
            tenant=command.tenant,
            label=command.label,
            secret_sha256=command.secret_sha256,
            cap_micros=command.cap_micros,
            window=command.window,
            timezone=command.timezone,
            expires_at_ms=command.expires_at_ms,
        )
        return Decision(KeyCreated(command.key_id, command.expires_at_ms), (issued,))

    def _decide_query(self, command: QueryKey, now_ms: int) -> Decision:
        key = self.keys.get(command.key_id)
        if key is None or key.tenant != command.tenant:
            return Decision(Failed("key_not_found", "no such key"))
        window_start = _current_window_start(key, now_ms)
        committed = key.committed_micros if window_start == key.window_start_at_ms else 0
        state = KeyState(
            key_id=key.key_id,
            tenant=key.tenant,
            label=key.label,
            cap_micros=key.cap_micros,
            window=key.window,
            timezone=key.timezone,
            window_start_at_ms=window_start,
            committed_micros=committed,
            reserved_micros=key.reserved_micros,
            expires_at_ms=key.expires_at_ms,
        )
        return Decision(state)

    # ------------------------------------------------------------- application (mutates)

    def apply(self, seq: int, event: AnyEvent) -> None:
        """Apply one event with sequence number ``seq`` (must be ``last_seq + 1``)."""
        assert seq == self.last_seq + 1, (
            f"partition {self.partition}: seq {seq} after {self.last_seq}"
        )
        match event:
            case ReservationGranted():
                key = self._key_in_window(event.key_id, event.window_start_at_ms)
                key.reserved_micros += event.amount_micros
                assert key.committed_micros + key.reserved_micros <= key.cap_micros, (
                    f"overspend granted on key {key.key_id} at seq {seq}"
                )
                self.holds[event.reservation_id] = Hold(
                    event.reservation_id, event.key_id, event.amount_micros, event.expires_at_ms
                )
                self._remember(event, _granted_result(event, key))
            case ReservationDenied():
                key = self._key_in_window(event.key_id, event.window_start_at_ms)
                self._remember(event, _denied_result(event, key.label, key.window))
            case ReservationCommitted():
                key = self._key_in_window(event.key_id, event.window_start_at_ms)
                hold = self.holds.pop(event.reservation_id)
                key.reserved_micros -= hold.amount_micros
                key.committed_micros += event.actual_micros
                self.settled[event.reservation_id] = "committed"
            case ReservationReleased():
                hold = self.holds.pop(event.reservation_id)
                self.keys[event.key_id].reserved_micros -= hold.amount_micros
                self.settled[event.reservation_id] = "released"
            case KeyIssued():
                self.keys[event.key_id] = KeyRecord(
                    key_id=event.key_id,
                    tenant=event.tenant,
                    label=event.label,
                    secret_sha256=event.secret_sha256,
                    cap_micros=event.cap_micros,
                    window=event.window,
                    timezone=event.timezone,
                    expires_at_ms=event.expires_at_ms,
                    window_start_at_ms=window_start_at_ms(
                        event.window, event.timezone, event.at_ms
                    ),
                )
        self.last_seq = seq
        self.last_at_ms = max(self.last_at_ms, event.at_ms)

    def _key_in_window(self, key_id: str, window_start: int) -> KeyRecord:
        """The key, rolled over to ``window_start`` when that is a newer window.

        Open holds carry over into the new window: a call reserved before midnight that
        settles after it counts in the new window, which errs on the side of the cap.
        """
        key = self.keys[key_id]
        if window_start > key.window_start_at_ms:
            key.window_start_at_ms = window_start
            key.committed_micros = 0
        return key

    def _remember(
        self, event: ReservationGranted | ReservationDenied, result: Granted | Denied
    ) -> None:
        if event.idempotency_key is not None:
            entry = IdempotencyEntry(event.request_sha256, result)
            self.idempotency[(event.key_id, event.idempotency_key)] = entry


def _granted_result(event: ReservationGranted, key: KeyRecord) -> Granted:
    """The reply to a grant, rebuilt from the event and the key right after applying it."""
    return Granted(
        reservation_id=event.reservation_id,
        amount_micros=event.amount_micros,
        expires_at_ms=event.expires_at_ms,
        committed_micros=key.committed_micros,
        reserved_micros=key.reserved_micros,
        cap_micros=key.cap_micros,
    )


def _denied_result(event: ReservationDenied, label: str, window: Window) -> Denied:
    remaining = max(0, event.cap_micros - event.committed_micros - event.reserved_micros)
    message = (
        f"Spendgate: cap exhausted for key '{label}': requested "
        f"${format_usd(event.amount_micros)}, remaining ${format_usd(remaining)} of "
        f"${format_usd(event.cap_micros)} ({window} window)"
    )
    return Denied(
        decision_id=event.decision_id,
        code=event.code,
        message=message,
        scope=event.scope,
        scope_id=event.scope_id,
        committed_micros=event.committed_micros,
        reserved_micros=event.reserved_micros,
        cap_micros=event.cap_micros,
        requested_micros=event.amount_micros,
    )


def _current_window_start(key: KeyRecord, now_ms: int) -> int:
    """The window containing ``now_ms``, never earlier than the key's latest window."""
    return max(window_start_at_ms(key.window, key.timezone, now_ms), key.window_start_at_ms)


def _reserve_problem(command: Reserve) -> Failed | None:
    if not 0 < command.amount_micros <= AMOUNT_MICROS_MAX:
        return Failed("invalid_amount", "amount must be positive and at most the maximum")
    if not 0 <= command.hold_ms <= HOLD_MS_MAX:
        return Failed("invalid_hold", f"hold_ms must be 0 (default) to {HOLD_MS_MAX}")
    if not 0 < len(command.vendor) <= VENDOR_CHARS_MAX:
        return Failed("invalid_vendor", "vendor name length out of range")
    if len(command.operation) > OPERATION_CHARS_MAX:
        return Failed("invalid_operation", "operation too long")
    if command.idempotency_key is not None and not (
        0 < len(command.idempotency_key) <= IDEMPOTENCY_KEY_CHARS_MAX
    ):
        return Failed("invalid_idempotency_key", "idempotency key length out of range")
    return None
