"""The pure core of a partition: keys, budgets, holds, decisions, event application.

:meth:`PartitionState.decide` turns a command into a result and the events it causes;
:meth:`PartitionState.apply` is the only way state changes, and it takes events only.
Live processing is ``decide`` then ``apply``; recovery is ``apply`` over the log (after
a snapshot). So the recovered state equals the state before a crash by construction,
and the log is the single source of truth. Every retention (idempotency answers,
settled reservations) is pruned by event time inside ``apply``, so it replays exactly.

Scopes. A reserve is checked, atomically, against every cap that applies: the key's own
cap, the open fleet budgets whose ``match`` prefixes the key's label or one of its fleet
labels, the open vendor budgets for the call's vendor, and the open tenant budgets. Each
cap has its own window (total, daily, monthly in an IANA zone), held in a :class:`Meter`.

Invariant (asserted after every grant): for every meter the grant touched,
``committed + reserved <= cap`` in the meter's current window. Commits may push
``committed`` above the cap when the actual cost exceeds the hold (an overrun, recorded
as its own event and counted); the next reserve then sees no room.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import hmac
import re
from collections import deque
from dataclasses import dataclass, field

import msgspec

from spendgate_common.events_v1 import (
    AnyEvent,
    ApprovalDecided,
    ApprovalRequested,
    BudgetClosed,
    BudgetCreated,
    BudgetScope,
    BudgetUpdated,
    ContractRule,
    ContractsSet,
    KeyIssued,
    KeyRevoked,
    ReservationCommitted,
    ReservationDenied,
    ReservationExpired,
    ReservationGranted,
    ReservationOutcomeUnknown,
    ReservationOverrun,
    ReservationReleased,
    ReservationResumed,
    Window,
)
from spendgate_common.ledger_v1 import (
    AnyCommand,
    AnyResult,
    ApprovalInfo,
    ApprovalList,
    ApprovalPending,
    Approve,
    BudgetState,
    CloseBudget,
    Commit,
    ContractsState,
    CreateBudget,
    Degrade,
    Denied,
    Done,
    Failed,
    Granted,
    IssueKey,
    KeyCreated,
    KeyState,
    ListApprovals,
    ListBudgets,
    ListKeys,
    MarkUnknown,
    QueryBudget,
    QueryContracts,
    QueryKey,
    QueryRun,
    Reject,
    Release,
    Reserve,
    RevokeKey,
    SetContracts,
    Settled,
    UpdateBudget,
)
from spendgate_common.limits import (
    ALLOWED_VENDORS_PER_KEY_MAX,
    AMOUNT_MICROS_MAX,
    BUDGETS_PER_TENANT_MAX,
    FLEET_LABELS_PER_KEY_MAX,
    HOLD_MS_MAX,
    IDEMPOTENCY_KEY_CHARS_MAX,
    LABEL_CHARS_MAX,
    OPERATION_CHARS_MAX,
    PRICING_VERSION_CHARS_MAX,
    SWEEP_EVENTS_MAX,
)
from spendgate_common.money import format_usd
from spendgate_common.partitioning import partition_for_tenant
from spendgate_common.timezones import zone
from spendgate_common.vault_keys import KEY_ID_PATTERN, SECRET_SHA256_PATTERN
from spendgate_common.windows import window_bounds_ms
from spendgate_ledger._contracts import TenantContracts, compile_rules, evaluation_context
from spendgate_ledger._contracts import decide as decide_contracts
from spendgate_ledger._queries import answer_query
from spendgate_ledger._settled import SettledIds
from spendgate_ledger._sharded import ShardedDict

# Most approvals one ListApprovals answers.
APPROVALS_PAGE_MAX = 500
_WINDOWS: tuple[Window, ...] = ("total", "daily", "monthly")
_BUDGET_SCOPES: tuple[BudgetScope, ...] = ("fleet", "vendor", "tenant")
BUDGET_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
VENDOR_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


class Sweep(msgspec.Struct, frozen=True):
    """Internal command (never on the wire): settle holds past their expiry."""

    tenant: str = ""


# --------------------------------------------------------------------------- records


@dataclass(slots=True)
class Meter:
    """One cap's usage in its current window. ``window_end_at_ms`` is a cache."""

    cap_micros: int
    window: Window
    timezone: str
    window_start_at_ms: int = 0
    window_end_at_ms: int = field(default=0, compare=False)
    committed_micros: int = 0
    reserved_micros: int = 0
    overrun_micros: int = 0

    def window_start_for(self, at_ms: int) -> int:
        """The window containing ``at_ms``, never earlier than the current one."""
        if self.window_start_at_ms <= at_ms < self.window_end_at_ms:
            return self.window_start_at_ms
        start, _ = window_bounds_ms(self.window, self.timezone, at_ms)
        return max(start, self.window_start_at_ms)

    def committed_in(self, window_start: int) -> int:
        return self.committed_micros if window_start == self.window_start_at_ms else 0

    def usage_at(self, at_ms: int) -> tuple[int, int, int]:
        """``(window start, committed, overrun)`` as they stand at ``at_ms``: a newer window
        that no event has rolled into yet has spent nothing."""
        window_start = self.window_start_for(at_ms)
        if window_start != self.window_start_at_ms:
            return window_start, 0, 0
        return window_start, self.committed_micros, self.overrun_micros

    def roll_to(self, at_ms: int) -> None:
        """Move to the window containing ``at_ms`` when that is a newer one.

        Open holds carry over: a call reserved before midnight that settles after it
        counts in the new window, which errs on the side of the cap. A time before the
        current window (a clock behind) changes nothing.
        """
        if self.window_start_at_ms <= at_ms < self.window_end_at_ms:
            return
        start, end = window_bounds_ms(self.window, self.timezone, at_ms)
        if start < self.window_start_at_ms:
            return
        if start > self.window_start_at_ms:
            self.committed_micros = 0
            self.overrun_micros = 0
        self.window_start_at_ms, self.window_end_at_ms = start, end


@dataclass(slots=True)
class KeyRecord:
    key_id: str
    tenant: str
    label: str
    secret_sha256: str
    expires_at_ms: int
    meter: Meter
    allowed_vendors: frozenset[str] | None = None
    fleet_labels: tuple[str, ...] = ()
    revoked: bool = False
    # Cache of the open fleet budgets matching this key, valid for one budgets generation.
    fleet_budget_ids: tuple[str, ...] = field(default=(), compare=False)
    fleet_generation: int = field(default=-1, compare=False)


@dataclass(slots=True)
class BudgetRecord:
    budget_id: str
    tenant: str
    scope: BudgetScope
    match: str
    meter: Meter
    closed: bool = False


@dataclass(slots=True)
class Hold:
    reservation_id: str
    key_id: str
    amount_micros: int
    expires_at_ms: int
    budget_ids: tuple[str, ...]
    # A caller is making the call under this hold now (False once its outcome is unknown).
    in_flight: bool = True


@dataclass(slots=True)
class IdempotencyEntry:
    request_sha256: str
    result: Granted | Denied
    at_ms: int


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A contract's refusal: its stable code and the scope that refused."""

    code: str
    scope: str
    scope_id: str


@dataclass(slots=True)
class ApprovalRecord:
    request: ApprovalRequested
    # pending, approved, rejected or used (expired is computed from the clock).
    status: str = "pending"
    decided_by: str = ""
    note: str = ""

    def status_at(self, now_ms: int) -> str:
        if self.status == "pending" and now_ms >= self.request.expires_at_ms:
            return "expired"
        return self.status


class Decision(msgspec.Struct, frozen=True):
    """What a command produced: the reply and the events to append (maybe none).

    A msgspec Struct rather than a frozen dataclass: two are built per reserve+commit
    pair, and a frozen dataclass costs about a microsecond each to construct.
    """

    result: AnyResult
    events: tuple[AnyEvent, ...] = ()


# How many settled ids cost a snapshot what one other record costs (PartitionState.entries).
SETTLED_IDS_PER_RECORD = 10

# Fingerprints of recent (vendor, operation, amount) triples: a fleet repeats the same
# calls (a charge of one price, a message to one country), and hashing costs more than a
# lookup. Bounded: emptied when full.
_FINGERPRINTS: dict[tuple[str, str, int], str] = {}
_FINGERPRINTS_MAX = 4_096


def request_fingerprint(command: Reserve) -> str:
    """What makes two reserves "the same request" for idempotency."""
    triple = (command.vendor, command.operation, command.amount_micros)
    known = _FINGERPRINTS.get(triple)
    if known is not None:
        return known
    fingerprint = hashlib.sha256(msgspec.json.encode(list(triple))).hexdigest()
    if len(_FINGERPRINTS) >= _FINGERPRINTS_MAX:
        _FINGERPRINTS.clear()
    _FINGERPRINTS[triple] = fingerprint
    return fingerprint


# ----------------------------------------------------------------------------- state


@dataclass(slots=True)
class PartitionState:
    partition: int
    partition_count: int
    default_hold_ms: int
    # How long idempotency answers are remembered.
    retention_ms: int = 86_400_000
    # How long settled reservation ids are remembered (to answer already_settled): far
    # shorter, as a duplicate settle comes right after the first and there is one per
    # reservation, idempotency key or not.
    settled_retention_ms: int = 3_600_000
    last_seq: int = 0
    # Ledger clock of the last applied event; decisions never use an earlier time.
    last_at_ms: int = 0
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    # Budget ids are chosen by users, so they are unique per tenant, not per partition.
    budgets: dict[tuple[str, str], BudgetRecord] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    # Millions of ids on a busy partition: compact, no object per id
    # (spendgate_ledger._settled).
    settled: SettledIds = field(init=False)
    # Sharded: millions of entries on a busy partition, and one CPython dict rebuilds
    # itself whole as it grows or churns (spendgate_ledger._sharded).
    idempotency: ShardedDict[tuple[str, str], IdempotencyEntry] = field(default_factory=ShardedDict)
    # Indexes, in apply order: derived from the fields above, but part of the state.
    _tenant_budgets: dict[str, list[str]] = field(default_factory=dict)
    _vendor_budgets: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    _fleet_budgets: dict[str, list[str]] = field(default_factory=dict)
    idempotency_order: deque[tuple[int, tuple[str, str]]] = field(default_factory=deque)
    # Caches: not compared (a recovered state may hold them in another shape).
    _budgets_generation: int = field(default=0, compare=False)
    # Open holds by the second they expire in (insertion-ordered), and those seconds as a
    # heap. Invariant: a second is in the heap exactly when it has a bucket; an emptied
    # bucket is deleted only once it reaches the heap's top, so it is never pushed twice.
    _expiry_buckets: dict[int, dict[str, None]] = field(default_factory=dict, compare=False)
    _expiry_seconds: list[int] = field(default_factory=list, compare=False)
    _tenant_of_partition: dict[str, bool] = field(default_factory=dict, compare=False)
    # Contract sets by tenant (compiled), approvals by id, and the approval of each call
    # identity ``(key_id, idempotency key or "sha256:<fingerprint>")``.
    contracts: dict[str, TenantContracts] = field(default_factory=dict)
    approvals: dict[str, ApprovalRecord] = field(default_factory=dict)
    approval_index: dict[tuple[str, str], str] = field(default_factory=dict)
    # The read-only queries' sorted indexes (spendgate_ledger._queries), built on first use.
    query_indexes: object = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.settled = SettledIds(self.partition)

    def entries(self) -> int:
        """How many records the state holds, as a snapshot's encoding cost counts them
        (what the snapshot interval grows with). A settled id counts a tenth: as column
        entries it costs about a fifth of a record to encode (188 vs 930 ns, measured over
        500,000), in a child on idle CPU, and a shorter replay after a takeover is worth
        more than that CPU."""
        return (
            len(self.keys)
            + len(self.budgets)
            + len(self.holds)
            + len(self.settled) // SETTLED_IDS_PER_RECORD
            + len(self.idempotency)
            + len(self.approvals)
        )

    # ----------------------------------------------------------------- decisions (pure)

    def decide(self, command: AnyCommand | Sweep, now_ms: int) -> Decision:
        """Decide ``command`` against the current state. Changes nothing logical (the
        expiry heap, a cache, may drop entries of holds that are already settled)."""
        # Never decide "before" the last event: a takeover replica's clock may be behind,
        # and windows must not move backwards (a past window would look empty).
        now_ms = max(now_ms, self.last_at_ms)
        if isinstance(command, Sweep):
            return self._decide_sweep(now_ms)
        if not self._owns_tenant(command.tenant):
            return Decision(Failed("wrong_partition", "tenant does not belong to this partition"))
        match command:
            case Reserve():
                return self._decide_reserve(command, now_ms)
            case Commit() | Release():
                return self._decide_settle(command, now_ms)
            case MarkUnknown():
                return self._decide_mark_unknown(command, now_ms)
            case SetContracts():
                return self._decide_set_contracts(command, now_ms)
            case QueryContracts():
                return Decision(self._contracts_state(command.tenant))
            case Approve() | Reject():
                return self._decide_approval(command, now_ms)
            case ListApprovals():
                return Decision(self._list_approvals(command, now_ms))
            case IssueKey():
                return self._decide_issue_key(command, now_ms)
            case RevokeKey():
                return self._decide_revoke_key(command, now_ms)
            case CreateBudget():
                return self._decide_create_budget(command, now_ms)
            case UpdateBudget() | CloseBudget():
                return self._decide_change_budget(command, now_ms)
            case QueryKey():
                return self._decide_query_key(command, now_ms)
            case QueryBudget():
                return self._decide_query_budget(command, now_ms)
            case ListKeys() | ListBudgets() | QueryRun():
                return Decision(answer_query(self, command, now_ms))
        raise AssertionError(f"unhandled command {command!r}")  # pragma: no cover

    def _owns_tenant(self, tenant: str) -> bool:
        owned = self._tenant_of_partition.get(tenant)
        if owned is None:
            owned = partition_for_tenant(tenant, self.partition_count) == self.partition
            if len(self._tenant_of_partition) < 100_000:
                self._tenant_of_partition[tenant] = owned
        return owned

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}_{self.partition}_{self.last_seq + 1}"

    def _authenticate(self, tenant: str, key_id: str, secret_sha256: str) -> KeyRecord | Failed:
        key = self.keys.get(key_id)
        # Unknown key, another tenant's key (tenants share partitions) and a wrong secret
        # look the same to the caller on purpose.
        if (
            key is None
            or key.tenant != tenant
            or not hmac.compare_digest(key.secret_sha256, secret_sha256)
        ):
            return Failed("invalid_key", "the vault key is not valid")
        return key

    def _decide_reserve(self, command: Reserve, now_ms: int) -> Decision:
        key = self._authenticate(command.tenant, command.key_id, command.secret_sha256)
        if isinstance(key, Failed):
            return Decision(key)
        # A revoked or expired key is refused before any budget is looked at.
        if key.revoked:
            return Decision(Failed("key_revoked", "the vault key has been revoked"))
        if now_ms >= key.expires_at_ms:
            return Decision(Failed("key_expired", "the vault key has expired"))
        if key.allowed_vendors is not None and command.vendor not in key.allowed_vendors:
            message = f"this vault key may not be used for {command.vendor!r}"
            return Decision(Failed("vendor_not_allowed", message))
        problem = _reserve_problem(command)
        if problem is not None:
            return Decision(problem)
        fingerprint = request_fingerprint(command)
        if command.idempotency_key is not None:
            seen = self.idempotency.get((command.key_id, command.idempotency_key))
            # Past the retention window the answer is forgotten, even before an event
            # prunes it: the key then names a new request.
            if seen is not None and seen.at_ms >= now_ms - self.retention_ms:
                if seen.request_sha256 != fingerprint:
                    message = "this idempotency key was used with a different request"
                    return Decision(Failed("idempotency_conflict", message))
                return self._replay(seen.result, command, now_ms)
        budgets = self._budgets_for(key, command.vendor)
        approval_id = ""
        contracts = self.contracts.get(key.tenant)
        if contracts is not None and contracts.rules:
            verdict = self._apply_contracts(contracts, key, budgets, command, fingerprint, now_ms)
            if isinstance(verdict, Decision):
                return verdict
            approval_id = verdict
        key_window = key.meter.window_start_for(now_ms)
        amount = command.amount_micros
        meter = key.meter
        if meter.committed_in(key_window) + meter.reserved_micros + amount > meter.cap_micros:
            refusal = _Refusal("cap_exhausted", "key", key.key_id)
            return self._denial(refusal, key, command, fingerprint, meter, now_ms)
        for budget in budgets:
            meter = budget.meter
            committed = meter.committed_in(meter.window_start_for(now_ms))
            if committed + meter.reserved_micros + amount > meter.cap_micros:
                refusal = _Refusal("cap_exhausted", budget.scope, budget.budget_id)
                return self._denial(refusal, key, command, fingerprint, meter, now_ms)
        hold_ms = command.hold_ms if command.hold_ms > 0 else self.default_hold_ms
        granted = ReservationGranted(
            at_ms=now_ms,
            reservation_id=self._next_id("rsv"),
            key_id=key.key_id,
            amount_micros=command.amount_micros,
            vendor=command.vendor,
            operation=command.operation,
            idempotency_key=command.idempotency_key,
            request_sha256=fingerprint,
            window_start_at_ms=key_window,
            expires_at_ms=now_ms + hold_ms,
            budget_ids=[budget.budget_id for budget in budgets],
            pricing_version=command.pricing_version,
            approval_id=approval_id,
            degraded_by=command.degraded_by,
        )
        result = Granted(
            reservation_id=granted.reservation_id,
            amount_micros=command.amount_micros,
            expires_at_ms=granted.expires_at_ms,
            committed_micros=key.meter.committed_in(key_window),
            reserved_micros=key.meter.reserved_micros + command.amount_micros,
            cap_micros=key.meter.cap_micros,
        )
        return Decision(result, (granted,))

    # ------------------------------------------------------------ contracts, approvals

    def _apply_contracts(
        self,
        contracts: TenantContracts,
        key: KeyRecord,
        budgets: list[BudgetRecord],
        command: Reserve,
        fingerprint: str,
        now_ms: int,
    ) -> Decision | str:
        """A decision that ends the reserve here, or the approval id it may proceed with
        ("" when no rule stands in the way)."""

        def remaining_in(meter: Meter) -> int:
            spent = meter.committed_in(meter.window_start_for(now_ms))
            return max(0, meter.cap_micros - spent - meter.reserved_micros)

        # The scope with the least left is the "budget" rules talk about.
        scope, scope_id, meter = min(self._scopes(key, budgets), key=lambda s: remaining_in(s[2]))
        context = evaluation_context(
            vendor=command.vendor,
            operation=command.operation,
            amount_micros=command.amount_micros,
            model=command.model,
            key_id=key.key_id,
            key_label=key.label,
            fleet_labels=key.fleet_labels,
            scope=scope,
            scope_id=scope_id,
            cap_micros=meter.cap_micros,
            spent_micros=meter.committed_in(meter.window_start_for(now_ms)),
            reserved_micros=meter.reserved_micros,
        )
        rules = contracts.rules
        if command.degraded_by:
            rules = tuple(r for r in rules if r.rule.decision != "degrade")
        rule = decide_contracts(rules, context)
        if rule is None:
            return ""
        message = rule.message or f"contract rule {rule.name!r} decided {rule.decision}"
        if rule.decision == "degrade":
            degrade = Degrade(
                contract=rule.name,
                message=message,
                model=rule.degrade_model,
                clamp_max_tokens=rule.degrade_clamp_max_tokens,
                remaining_micros=remaining_in(meter),
            )
            return Decision(degrade)
        if rule.decision == "stop":
            refusal = _Refusal("contract_stop", "contract", rule.name)
            return self._denial(refusal, key, command, fingerprint, meter, now_ms)
        return self._approval_gate(rule, key, command, fingerprint, meter, now_ms)

    def _approval_gate(
        self,
        rule: ContractRule,
        key: KeyRecord,
        command: Reserve,
        fingerprint: str,
        meter: Meter,
        now_ms: int,
    ) -> Decision | str:
        identity = command.idempotency_key or f"sha256:{fingerprint}"
        approval_id = self.approval_index.get((key.key_id, identity))
        record = self.approvals.get(approval_id) if approval_id is not None else None
        status = record.status_at(now_ms) if record is not None else "none"
        if record is not None and status == "approved":
            return record.request.approval_id
        if record is not None and status == "pending":
            request = record.request
            pending = ApprovalPending(
                request.approval_id,
                request.contract,
                request.message,
                request.expires_at_ms,
                replayed=True,
            )
            return Decision(pending)
        if record is not None and command.idempotency_key is not None:
            # The same call (same idempotency key) was rejected or its approval lapsed.
            code = "approval_rejected" if status == "rejected" else "approval_expired"
            refusal = _Refusal(code, "approval", record.request.approval_id)
            return self._denial(refusal, key, command, fingerprint, meter, now_ms)
        # No approval yet (or, for a call without an idempotency key, none usable).
        message = rule.message or f"contract rule {rule.name!r} requires an approval"
        requested = ApprovalRequested(
            at_ms=now_ms,
            approval_id=self._next_id("apr"),
            tenant=key.tenant,
            key_id=key.key_id,
            label=key.label,
            amount_micros=command.amount_micros,
            vendor=command.vendor,
            operation=command.operation,
            model=command.model,
            request_identity=identity,
            request_sha256=fingerprint,
            contract=rule.name,
            message=message,
            expires_at_ms=now_ms + rule.approval_ttl_seconds * 1000,
        )
        pending = ApprovalPending(
            requested.approval_id, rule.name, message, requested.expires_at_ms
        )
        return Decision(pending, (requested,))

    def _denial(
        self,
        refusal: _Refusal,
        key: KeyRecord,
        command: Reserve,
        fingerprint: str,
        meter: Meter,
        now_ms: int,
    ) -> Decision:
        """A refused reserve: its event (remembered for idempotency) and its answer."""
        window_start = meter.window_start_for(now_ms)
        denied = ReservationDenied(
            at_ms=now_ms,
            decision_id=self._next_id("dcn"),
            key_id=key.key_id,
            amount_micros=command.amount_micros,
            vendor=command.vendor,
            operation=command.operation,
            idempotency_key=command.idempotency_key,
            request_sha256=fingerprint,
            code=refusal.code,
            scope=refusal.scope,
            scope_id=refusal.scope_id,
            committed_micros=meter.committed_in(window_start),
            reserved_micros=meter.reserved_micros,
            cap_micros=meter.cap_micros,
            window_start_at_ms=window_start,
        )
        return Decision(self._denied_result(denied), (denied,))

    def _decide_set_contracts(self, command: SetContracts, now_ms: int) -> Decision:
        compiled = compile_rules(command.rules)
        if isinstance(compiled, Failed):
            return Decision(compiled)
        current = self.contracts.get(command.tenant)
        event = ContractsSet(
            at_ms=now_ms,
            tenant=command.tenant,
            version=(current.version if current is not None else 0) + 1,
            rules=list(command.rules),
            source_sha256=command.source_sha256,
        )
        state = ContractsState(
            command.tenant, event.version, event.rules, event.source_sha256, now_ms
        )
        return Decision(state, (event,))

    def _contracts_state(self, tenant: str) -> ContractsState:
        current = self.contracts.get(tenant)
        if current is None:
            return ContractsState(tenant, 0, [], "", 0)
        return ContractsState(
            tenant,
            current.version,
            [compiled.rule for compiled in current.rules],
            current.source_sha256,
            current.set_at_ms,
        )

    def _decide_approval(self, command: Approve | Reject, now_ms: int) -> Decision:
        record = self.approvals.get(command.approval_id)
        if record is None or record.request.tenant != command.tenant:
            return Decision(Failed("approval_not_found", "no such approval in this tenant"))
        status = record.status_at(now_ms)
        if status != "pending":
            return Decision(Failed("approval_not_pending", f"the approval is {status}"))
        if not 0 < len(command.by) <= LABEL_CHARS_MAX:
            return Decision(Failed("invalid_approver", "say who decides (1 to 128 characters)"))
        decided = ApprovalDecided(
            at_ms=now_ms,
            approval_id=record.request.approval_id,
            tenant=command.tenant,
            approved=isinstance(command, Approve),
            by=command.by,
            note=command.note[:OPERATION_CHARS_MAX],
        )
        info = msgspec.structs.replace(
            self._approval_info(record, now_ms),
            status="approved" if decided.approved else "rejected",
            decided_by=decided.by,
            note=decided.note,
        )
        return Decision(info, (decided,))

    def _approval_info(self, record: ApprovalRecord, now_ms: int) -> ApprovalInfo:
        request = record.request
        return ApprovalInfo(
            approval_id=request.approval_id,
            tenant=request.tenant,
            key_id=request.key_id,
            label=request.label,
            amount_micros=request.amount_micros,
            vendor=request.vendor,
            operation=request.operation,
            model=request.model,
            contract=request.contract,
            message=request.message,
            requested_at_ms=request.at_ms,
            expires_at_ms=request.expires_at_ms,
            status=record.status_at(now_ms),
            decided_by=record.decided_by,
            note=record.note,
        )

    def _list_approvals(self, command: ListApprovals, now_ms: int) -> ApprovalList | Failed:
        if not 0 < command.limit <= APPROVALS_PAGE_MAX:
            return Failed("invalid_limit", f"limit must be 1 to {APPROVALS_PAGE_MAX}")
        found: list[ApprovalInfo] = []
        for record in reversed(self.approvals.values()):
            if record.request.tenant != command.tenant:
                continue
            info = self._approval_info(record, now_ms)
            if command.status and info.status != command.status:
                continue
            found.append(info)
            if len(found) == command.limit:
                break
        return ApprovalList(found)

    def apply_contracts_set(self, event: ContractsSet) -> None:
        compiled = compile_rules(event.rules)
        # The log holds only sets that compiled when they were decided.
        assert not isinstance(compiled, Failed), compiled
        self.contracts[event.tenant] = TenantContracts(
            event.version, compiled, event.source_sha256, event.at_ms
        )

    def apply_approval_requested(self, event: ApprovalRequested) -> None:
        self.approvals[event.approval_id] = ApprovalRecord(event)
        self.approval_index[(event.key_id, event.request_identity)] = event.approval_id

    def _replay(self, original: Granted | Denied, command: Reserve, now_ms: int) -> Decision:
        """The original answer to a retry with the same idempotency key.

        A grant says whether its hold is settled. A caller that makes the call itself
        (``claim``) may not race its own first attempt: an in-flight hold answers
        ``request_in_progress``; a hold whose outcome was unknown is resumed by this retry.
        """
        if isinstance(original, Denied):
            return Decision(msgspec.structs.replace(original, replayed=True))
        hold = self.holds.get(original.reservation_id)
        if hold is None:
            return Decision(msgspec.structs.replace(original, replayed=True, settled=True))
        if not command.claim:
            return Decision(msgspec.structs.replace(original, replayed=True))
        if hold.in_flight:
            message = (
                "the first attempt with this idempotency key is still in flight; "
                "retry after it finished"
            )
            return Decision(Failed("request_in_progress", message))
        resumed = ReservationResumed(
            at_ms=now_ms, reservation_id=hold.reservation_id, key_id=hold.key_id
        )
        result = msgspec.structs.replace(original, replayed=True, resumed=True)
        return Decision(result, (resumed,))

    def _decide_mark_unknown(self, command: MarkUnknown, now_ms: int) -> Decision:
        key = self._authenticate(command.tenant, command.key_id, command.secret_sha256)
        if isinstance(key, Failed):
            return Decision(key)
        hold = self.holds.get(command.reservation_id)
        if hold is None or hold.key_id != key.key_id:
            return Decision(Failed("reservation_not_found", "no such open reservation"))
        if not hold.in_flight:
            return Decision(Done("the reservation's outcome was already unknown"))
        unknown = ReservationOutcomeUnknown(
            at_ms=now_ms,
            reservation_id=hold.reservation_id,
            key_id=key.key_id,
            reason=command.reason[:OPERATION_CHARS_MAX],
        )
        return Decision(Done("the hold stays until a retry resumes it or it expires"), (unknown,))

    def _scopes(self, key: KeyRecord, budgets: list[BudgetRecord]) -> list[tuple[str, str, Meter]]:
        """Every cap a reserve on ``key`` must fit, the key's own first."""
        scopes: list[tuple[str, str, Meter]] = [("key", key.key_id, key.meter)]
        scopes.extend((budget.scope, budget.budget_id, budget.meter) for budget in budgets)
        return scopes

    def _budgets_for(self, key: KeyRecord, vendor: str) -> list[BudgetRecord]:
        """The open budgets a reserve by ``key`` for ``vendor`` draws on: fleet, vendor, tenant."""
        if key.fleet_generation != self._budgets_generation:
            labels = (key.label, *key.fleet_labels)
            key.fleet_budget_ids = tuple(
                budget_id
                for budget_id in self._fleet_budgets.get(key.tenant, ())
                if any(
                    label.startswith(self.budgets[(key.tenant, budget_id)].match)
                    for label in labels
                )
            )
            key.fleet_generation = self._budgets_generation
        vendor_ids = self._vendor_budgets.get((key.tenant, vendor), ())
        tenant_ids = self._tenant_budgets.get(key.tenant, ())
        if not (key.fleet_budget_ids or vendor_ids or tenant_ids):
            return []  # The common case: only the key's own cap applies.
        budgets, tenant = self.budgets, key.tenant
        return [
            budgets[(tenant, budget_id)]
            for budget_id in (*key.fleet_budget_ids, *vendor_ids, *tenant_ids)
        ]

    def _denied_result(self, event: ReservationDenied) -> Denied:
        return Denied(
            decision_id=event.decision_id,
            code=event.code,
            message=self._denial_message(event),
            scope=event.scope,
            scope_id=event.scope_id,
            committed_micros=event.committed_micros,
            reserved_micros=event.reserved_micros,
            cap_micros=event.cap_micros,
            requested_micros=event.amount_micros,
        )

    def _denial_message(self, event: ReservationDenied) -> str:
        """Why a reserve was refused (rebuilt alike when replaying the log: the keys,
        budgets and contract rules at that point of the log are the ones that decided)."""
        if event.code == "contract_stop":
            tenant = self.keys[event.key_id].tenant
            contracts = self.contracts.get(tenant)
            rules = contracts.rules if contracts is not None else ()
            said = next((c.rule.message for c in rules if c.rule.name == event.scope_id), "")
            message = f"Spendgate: stopped by contract rule '{event.scope_id}'"
            return message + (f": {said}" if said else "")
        if event.code == "approval_rejected":
            return f"Spendgate: approval {event.scope_id} was rejected; the call is refused"
        if event.code == "approval_expired":
            return (
                f"Spendgate: approval {event.scope_id} lapsed before an operator decided; "
                "retry with a new idempotency key to ask again"
            )
        if event.scope == "key":
            key = self.keys[event.key_id]
            subject, window = f"key '{key.label}'", key.meter.window
        else:
            budget = self.budgets[(self.keys[event.key_id].tenant, event.scope_id)]
            subject, window = f"{budget.scope} budget '{budget.budget_id}'", budget.meter.window
        remaining = max(0, event.cap_micros - event.committed_micros - event.reserved_micros)
        return (
            f"Spendgate: cap exhausted for {subject}: requested "
            f"${format_usd(event.amount_micros)}, remaining ${format_usd(remaining)} of "
            f"${format_usd(event.cap_micros)} ({window} window)"
        )

    def _decide_settle(self, command: Commit | Release, now_ms: int) -> Decision:
        # Expiry and revocation stop new reservations only: a call granted before must
        # still be committed at its real cost (or released).
        key = self._authenticate(command.tenant, command.key_id, command.secret_sha256)
        if isinstance(key, Failed):
            return Decision(key)
        hold = self.holds.get(command.reservation_id)
        if hold is None or hold.key_id != key.key_id:
            outcome = self.settled.get(command.reservation_id)
            if outcome is not None:
                message = f"reservation was already settled ({outcome}); nothing changed"
                return Decision(Failed("already_settled", message))
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
            window_start_at_ms=key.meter.window_start_for(now_ms),
        )
        overrun = command.actual_micros - hold.amount_micros
        result = Settled(
            hold.reservation_id,
            command.actual_micros,
            max(0, -overrun),
            overrun_micros=max(0, overrun),
        )
        if overrun <= 0:
            return Decision(result, (committed,))
        overrun_event = ReservationOverrun(
            at_ms=now_ms,
            reservation_id=hold.reservation_id,
            key_id=key.key_id,
            reserved_micros=hold.amount_micros,
            actual_micros=command.actual_micros,
            overrun_micros=overrun,
            budget_ids=list(hold.budget_ids),
        )
        return Decision(result, (committed, overrun_event))

    def _decide_sweep(self, now_ms: int) -> Decision:
        expired: list[AnyEvent] = []
        for second in self._due_seconds(now_ms):
            # In expiry order; a stable sort keeps grant order for equal expiry times.
            due = sorted(
                (self.holds[reservation_id] for reservation_id in self._expiry_buckets[second]),
                key=lambda hold: hold.expires_at_ms,
            )
            for hold in due:
                if hold.expires_at_ms > now_ms or len(expired) == SWEEP_EVENTS_MAX:
                    break
                reservation_id = hold.reservation_id
                expired.append(
                    ReservationExpired(
                        at_ms=now_ms,
                        reservation_id=reservation_id,
                        key_id=hold.key_id,
                        reserved_micros=hold.amount_micros,
                    )
                )
        return Decision(Done(f"{len(expired)} reservations expired"), tuple(expired))

    def _due_seconds(self, now_ms: int) -> list[int]:
        """Expiry seconds at or before ``now_ms``, in order: a walk of the heap that visits
        only due entries (a heap's children are never earlier than their parent)."""
        heap = self._expiry_seconds
        due: list[int] = []
        stack = [0]
        while stack:
            index = stack.pop()
            if index < len(heap) and heap[index] * 1000 <= now_ms:
                due.append(heap[index])
                stack.extend((2 * index + 1, 2 * index + 2))
        return sorted(due)

    def _decide_issue_key(self, command: IssueKey, now_ms: int) -> Decision:
        problem = _issue_key_problem(command, now_ms)
        if problem is not None:
            return Decision(problem)
        if command.key_id in self.keys:
            return Decision(Failed("key_exists", "a key with this id already exists"))
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
            allowed_vendors=command.allowed_vendors,
            fleet_labels=command.fleet_labels,
        )
        return Decision(KeyCreated(command.key_id, command.expires_at_ms), (issued,))

    def _decide_revoke_key(self, command: RevokeKey, now_ms: int) -> Decision:
        key = self.keys.get(command.key_id)
        if key is None or key.tenant != command.tenant:
            return Decision(Failed("key_not_found", "no such key"))
        if key.revoked:
            return Decision(Failed("already_revoked", "the key was already revoked"))
        revoked = KeyRevoked(
            at_ms=now_ms, key_id=key.key_id, reason=command.reason[:OPERATION_CHARS_MAX]
        )
        return Decision(Done(f"key {key.key_id} revoked"), (revoked,))

    def _decide_create_budget(self, command: CreateBudget, now_ms: int) -> Decision:
        problem = _budget_problem(command)
        if problem is not None:
            return Decision(problem)
        if (command.tenant, command.budget_id) in self.budgets:
            return Decision(Failed("budget_exists", "a budget with this id already exists"))
        open_budgets = sum(
            len(index.get(command.tenant, ()))
            for index in (self._tenant_budgets, self._fleet_budgets)
        ) + sum(
            len(ids)
            for (tenant, _), ids in self._vendor_budgets.items()
            if tenant == command.tenant
        )
        if open_budgets >= BUDGETS_PER_TENANT_MAX:
            message = f"a tenant may have at most {BUDGETS_PER_TENANT_MAX} open budgets"
            return Decision(Failed("too_many_budgets", message))
        created = BudgetCreated(
            at_ms=now_ms,
            budget_id=command.budget_id,
            tenant=command.tenant,
            scope=command.scope,
            match=command.match,
            cap_micros=command.cap_micros,
            window=command.window,
            timezone=command.timezone,
        )
        meter = Meter(command.cap_micros, command.window, command.timezone)
        meter.roll_to(now_ms)
        record = BudgetRecord(
            command.budget_id, command.tenant, command.scope, command.match, meter
        )
        return Decision(_budget_state(record, now_ms), (created,))

    def _decide_change_budget(self, command: UpdateBudget | CloseBudget, now_ms: int) -> Decision:
        budget = self.budgets.get((command.tenant, command.budget_id))
        if budget is None:
            return Decision(Failed("budget_not_found", "no such budget"))
        if budget.closed:
            return Decision(Failed("budget_closed", "the budget is closed"))
        event: BudgetUpdated | BudgetClosed
        if isinstance(command, CloseBudget):
            event = BudgetClosed(at_ms=now_ms, tenant=budget.tenant, budget_id=budget.budget_id)
        else:
            if not 0 < command.cap_micros <= AMOUNT_MICROS_MAX:
                return Decision(Failed("invalid_amount", "cap out of range"))
            event = BudgetUpdated(
                at_ms=now_ms,
                tenant=budget.tenant,
                budget_id=budget.budget_id,
                previous_cap_micros=budget.meter.cap_micros,
                cap_micros=command.cap_micros,
            )
        # The budget as the event will leave it (apply makes the change itself).
        after = dataclasses.replace(budget, closed=isinstance(event, BudgetClosed))
        if isinstance(event, BudgetUpdated):
            after.meter = dataclasses.replace(budget.meter, cap_micros=event.cap_micros)
        return Decision(_budget_state(after, now_ms), (event,))

    def _decide_query_key(self, command: QueryKey, now_ms: int) -> Decision:
        key = self.keys.get(command.key_id)
        if key is None or key.tenant != command.tenant:
            return Decision(Failed("key_not_found", "no such key"))
        meter = key.meter
        window_start, committed, overrun = meter.usage_at(now_ms)
        return Decision(
            KeyState(
                key_id=key.key_id,
                tenant=key.tenant,
                label=key.label,
                cap_micros=meter.cap_micros,
                window=meter.window,
                timezone=meter.timezone,
                window_start_at_ms=window_start,
                committed_micros=committed,
                reserved_micros=meter.reserved_micros,
                expires_at_ms=key.expires_at_ms,
                overrun_micros=overrun,
                revoked=key.revoked,
                allowed_vendors=sorted(key.allowed_vendors)
                if key.allowed_vendors is not None
                else None,
                fleet_labels=list(key.fleet_labels),
                # No vendor is named here, so vendor budgets do not apply.
                budget_ids=[budget.budget_id for budget in self._budgets_for(key, "")],
            )
        )

    def _decide_query_budget(self, command: QueryBudget, now_ms: int) -> Decision:
        budget = self.budgets.get((command.tenant, command.budget_id))
        if budget is None:
            return Decision(Failed("budget_not_found", "no such budget"))
        return Decision(_budget_state(budget, now_ms))

    # ------------------------------------------------------------- application (mutates)

    def apply(self, seq: int, event: AnyEvent) -> None:
        """Apply one event with sequence number ``seq`` (must be ``last_seq + 1``)."""
        assert seq == self.last_seq + 1, f"p{self.partition}: seq {seq} after {self.last_seq}"
        at_ms = max(self.last_at_ms, event.at_ms)
        match event:
            case ReservationGranted():
                self._apply_granted(event, at_ms)
            case ReservationCommitted():
                hold = self._pop_hold(event.reservation_id)
                for meter in self._hold_meters(hold):
                    meter.roll_to(at_ms)
                    meter.reserved_micros -= hold.amount_micros
                    meter.committed_micros += event.actual_micros
                self._settle(event.reservation_id, "committed", at_ms)
            case ReservationOverrun():
                key = self.keys[event.key_id]
                meters = [key.meter]
                meters.extend(
                    self.budgets[(key.tenant, budget_id)].meter for budget_id in event.budget_ids
                )
                for meter in meters:
                    meter.overrun_micros += event.overrun_micros
            case ReservationReleased() | ReservationExpired():
                hold = self._pop_hold(event.reservation_id)
                expired = isinstance(event, ReservationExpired)
                for meter in self._hold_meters(hold):
                    meter.roll_to(at_ms)
                    meter.reserved_micros -= hold.amount_micros
                    if expired:
                        # Conservative: the call may have happened, count the full hold.
                        meter.committed_micros += hold.amount_micros
                self._settle(event.reservation_id, "expired" if expired else "released", at_ms)
            case ContractsSet():
                self.apply_contracts_set(event)
            case ApprovalRequested():
                self.apply_approval_requested(event)
            case ApprovalDecided():
                record = self.approvals[event.approval_id]
                record.status = "approved" if event.approved else "rejected"
                record.decided_by, record.note = event.by, event.note
            case ReservationOutcomeUnknown():
                self.holds[event.reservation_id].in_flight = False
            case ReservationResumed():
                self.holds[event.reservation_id].in_flight = True
            case ReservationDenied():
                self._remember(event, self._denied_result(event), at_ms)
            case KeyIssued():
                self._apply_key_issued(event, at_ms)
            case KeyRevoked():
                self.keys[event.key_id].revoked = True
            case BudgetCreated():
                self._apply_budget_created(event, at_ms)
            case BudgetUpdated():
                self.budgets[(event.tenant, event.budget_id)].meter.cap_micros = event.cap_micros
            case BudgetClosed():
                budget = self.budgets[(event.tenant, event.budget_id)]
                budget.closed = True
                self._index_of(budget).remove(budget.budget_id)
                self._budgets_generation += 1
        self.last_seq = seq
        self.last_at_ms = at_ms
        self._forget_before(at_ms)

    def _apply_granted(self, event: ReservationGranted, at_ms: int) -> None:
        key = self.keys[event.key_id]
        if event.approval_id:
            # An approval lets one call through: the next one asks again.
            record = self.approvals[event.approval_id]
            record.status = "used"
            del self.approval_index[(record.request.key_id, record.request.request_identity)]
        hold = Hold(
            event.reservation_id,
            event.key_id,
            event.amount_micros,
            event.expires_at_ms,
            tuple(event.budget_ids),
        )
        for meter in self._hold_meters(hold):
            meter.roll_to(at_ms)
            meter.reserved_micros += event.amount_micros
            assert meter.committed_micros + meter.reserved_micros <= meter.cap_micros, (
                f"overspend granted by {event.reservation_id}: {meter}"
            )
        self.holds[event.reservation_id] = hold
        self.track_hold(hold)
        if event.idempotency_key is not None:
            granted = Granted(
                reservation_id=event.reservation_id,
                amount_micros=event.amount_micros,
                expires_at_ms=event.expires_at_ms,
                committed_micros=key.meter.committed_micros,
                reserved_micros=key.meter.reserved_micros,
                cap_micros=key.meter.cap_micros,
            )
            self._remember(event, granted, at_ms)

    def _apply_key_issued(self, event: KeyIssued, at_ms: int) -> None:
        meter = Meter(event.cap_micros, event.window, event.timezone)
        meter.roll_to(at_ms)
        self.keys[event.key_id] = KeyRecord(
            key_id=event.key_id,
            tenant=event.tenant,
            label=event.label,
            secret_sha256=event.secret_sha256,
            expires_at_ms=event.expires_at_ms,
            meter=meter,
            allowed_vendors=frozenset(event.allowed_vendors)
            if event.allowed_vendors is not None
            else None,
            fleet_labels=tuple(event.fleet_labels),
        )

    def _apply_budget_created(self, event: BudgetCreated, at_ms: int) -> None:
        meter = Meter(event.cap_micros, event.window, event.timezone)
        meter.roll_to(at_ms)
        self.restore_budget(
            BudgetRecord(event.budget_id, event.tenant, event.scope, event.match, meter)
        )

    def restore_budget(self, budget: BudgetRecord) -> None:
        """Add a budget (created now, or restored from a snapshot in creation order)."""
        self.budgets[(budget.tenant, budget.budget_id)] = budget
        if not budget.closed:
            self._index_of(budget).append(budget.budget_id)
        self._budgets_generation += 1

    def _index_of(self, budget: BudgetRecord) -> list[str]:
        if budget.scope == "tenant":
            return self._tenant_budgets.setdefault(budget.tenant, [])
        if budget.scope == "fleet":
            return self._fleet_budgets.setdefault(budget.tenant, [])
        return self._vendor_budgets.setdefault((budget.tenant, budget.match), [])

    def track_hold(self, hold: Hold) -> None:
        """Add an open hold to the expiry buckets (also used when restoring a snapshot)."""
        second = hold.expires_at_ms // 1000
        bucket = self._expiry_buckets.get(second)
        if bucket is None:
            bucket = self._expiry_buckets[second] = {}
            heapq.heappush(self._expiry_seconds, second)
        bucket[hold.reservation_id] = None

    def _pop_hold(self, reservation_id: str) -> Hold:
        hold = self.holds.pop(reservation_id)
        del self._expiry_buckets[hold.expires_at_ms // 1000][reservation_id]
        heap = self._expiry_seconds
        while heap and not self._expiry_buckets[heap[0]]:
            del self._expiry_buckets[heapq.heappop(heap)]
        return hold

    def _hold_meters(self, hold: Hold) -> list[Meter]:
        key = self.keys[hold.key_id]
        if not hold.budget_ids:
            return [key.meter]
        budgets = self.budgets
        return [
            key.meter,
            *(budgets[(key.tenant, budget_id)].meter for budget_id in hold.budget_ids),
        ]

    def _remember(
        self, event: ReservationGranted | ReservationDenied, result: Granted | Denied, at_ms: int
    ) -> None:
        if event.idempotency_key is not None:
            entry_key = (event.key_id, event.idempotency_key)
            self.idempotency[entry_key] = IdempotencyEntry(event.request_sha256, result, at_ms)
            self.idempotency_order.append((at_ms, entry_key))

    def _settle(self, reservation_id: str, outcome: str, at_ms: int) -> None:
        self.settled.add(reservation_id, outcome, at_ms)

    def _forget_before(self, at_ms: int) -> None:
        """Drop idempotency answers and settled ids older than their retention windows."""
        cutoff_ms = at_ms - self.retention_ms
        while self.idempotency_order and self.idempotency_order[0][0] < cutoff_ms:
            _, entry_key = self.idempotency_order.popleft()
            self.idempotency.pop(entry_key, None)
        self.settled.forget_before(at_ms - self.settled_retention_ms)


# ------------------------------------------------------------------------- validation


# Vendor names already seen to match VENDOR_PATTERN (a handful in practice; bounded): a
# set lookup instead of a regular expression per reserve.
_VALID_VENDORS: set[str] = set()
_VALID_VENDORS_MAX = 1_024


def _valid_vendor(vendor: str) -> bool:
    if vendor in _VALID_VENDORS:
        return True
    if not VENDOR_PATTERN.fullmatch(vendor):
        return False
    if len(_VALID_VENDORS) >= _VALID_VENDORS_MAX:
        _VALID_VENDORS.clear()
    _VALID_VENDORS.add(vendor)
    return True


def _reserve_problem(command: Reserve) -> Failed | None:
    if not 0 < command.amount_micros <= AMOUNT_MICROS_MAX:
        return Failed("invalid_amount", "amount must be positive and at most the maximum")
    if not 0 <= command.hold_ms <= HOLD_MS_MAX:
        return Failed("invalid_hold", f"hold_ms must be 0 (default) to {HOLD_MS_MAX}")
    if not _valid_vendor(command.vendor):
        return Failed("invalid_vendor", "vendor must be 1 to 32 of a-z, 0-9 and '-'")
    if len(command.operation) > OPERATION_CHARS_MAX:
        return Failed("invalid_operation", "operation too long")
    if len(command.pricing_version) > PRICING_VERSION_CHARS_MAX:
        return Failed("invalid_pricing_version", "pricing version too long")
    if command.idempotency_key is not None and not (
        0 < len(command.idempotency_key) <= IDEMPOTENCY_KEY_CHARS_MAX
    ):
        return Failed("invalid_idempotency_key", "idempotency key length out of range")
    return None


def _window_problem(window: str, timezone: str) -> Failed | None:
    if window not in _WINDOWS:
        return Failed("invalid_window", f"window must be one of {', '.join(_WINDOWS)}")
    if zone(timezone) is None:
        return Failed("invalid_timezone", "not an IANA time zone")
    return None


def _issue_key_problem(command: IssueKey, now_ms: int) -> Failed | None:
    if not KEY_ID_PATTERN.fullmatch(command.key_id):
        return Failed("invalid_key_id", "key id must be 16 of a-z and 2-7")
    if not SECRET_SHA256_PATTERN.fullmatch(command.secret_sha256):
        return Failed("invalid_secret_hash", "secret_sha256 must be 64 hex digits")
    if not 0 < command.cap_micros <= AMOUNT_MICROS_MAX:
        return Failed("invalid_amount", "cap out of range")
    if not 0 < len(command.label) <= LABEL_CHARS_MAX:
        return Failed("invalid_label", f"label must be 1 to {LABEL_CHARS_MAX} characters")
    if command.expires_at_ms <= now_ms:
        return Failed("invalid_ttl", "the key would already be expired")
    if len(command.fleet_labels) > FLEET_LABELS_PER_KEY_MAX or not all(
        0 < len(label) <= LABEL_CHARS_MAX for label in command.fleet_labels
    ):
        message = f"at most {FLEET_LABELS_PER_KEY_MAX} fleet labels of 1 to {LABEL_CHARS_MAX}"
        return Failed("invalid_fleet_labels", message)
    if command.allowed_vendors is not None and (
        len(command.allowed_vendors) > ALLOWED_VENDORS_PER_KEY_MAX
        or not all(VENDOR_PATTERN.fullmatch(vendor) for vendor in command.allowed_vendors)
    ):
        message = f"at most {ALLOWED_VENDORS_PER_KEY_MAX} vendor names of a-z, 0-9 and '-'"
        return Failed("invalid_allowed_vendors", message)
    return _window_problem(command.window, command.timezone)


def _budget_problem(command: CreateBudget) -> Failed | None:
    if not BUDGET_ID_PATTERN.fullmatch(command.budget_id):
        message = "budget id must be 1 to 64 of a-z, 0-9, '.', '_' and '-'"
        return Failed("invalid_budget_id", message)
    if command.scope not in _BUDGET_SCOPES:
        return Failed("invalid_scope", f"scope must be one of {', '.join(_BUDGET_SCOPES)}")
    if command.scope == "fleet" and not 0 < len(command.match) <= LABEL_CHARS_MAX:
        return Failed("invalid_match", "a fleet budget matches a non-empty label prefix")
    if command.scope == "vendor" and not VENDOR_PATTERN.fullmatch(command.match):
        return Failed("invalid_match", "a vendor budget matches a vendor name")
    if command.scope == "tenant" and command.match:
        return Failed("invalid_match", "a tenant budget has an empty match")
    if not 0 < command.cap_micros <= AMOUNT_MICROS_MAX:
        return Failed("invalid_amount", "cap out of range")
    return _window_problem(command.window, command.timezone)


# ---------------------------------------------------------------------------- results


def _budget_state(budget: BudgetRecord, now_ms: int) -> BudgetState:
    meter = budget.meter
    window_start, committed, overrun = meter.usage_at(now_ms)
    return BudgetState(
        budget_id=budget.budget_id,
        tenant=budget.tenant,
        scope=budget.scope,
        match=budget.match,
        cap_micros=meter.cap_micros,
        window=meter.window,
        timezone=meter.timezone,
        window_start_at_ms=window_start,
        committed_micros=committed,
        reserved_micros=meter.reserved_micros,
        overrun_micros=overrun,
        closed=budget.closed,
    )
