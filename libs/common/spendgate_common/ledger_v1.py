"""Ledger protocol, version 1: commands in, results out, over NATS request-reply.

One request on ``spendgate.v1.ledger.<partition>.cmd`` carries a :class:`CommandBatch`
(many commands for one partition; the gateway coalesces concurrent calls) and is answered
by a :class:`ResultBatch` with one result per command, in the same order, sent only after
every event of those commands is durable in Postgres.

Secrets never travel: commands carry ``secret_sha256``, the hex SHA-256 of the vault key's
secret part, which the ledger compares in constant time with the stored hash.
"""

from __future__ import annotations

import msgspec

from spendgate_common.events_v1 import BudgetScope, ContractRule, Window
from spendgate_common.limits import QUERY_PAGE_ITEMS_DEFAULT


class Command(msgspec.Struct, frozen=True, tag_field="type", forbid_unknown_fields=True):
    """Base of all commands. ``tenant`` routes the command and is checked by the ledger."""

    tenant: str


class IssueKey(Command, frozen=True, tag="IssueKey"):
    key_id: str
    label: str
    secret_sha256: str
    cap_micros: int
    window: Window
    timezone: str
    expires_at_ms: int
    allowed_vendors: list[str] | None = None
    fleet_labels: list[str] = msgspec.field(default_factory=list)


class RevokeKey(Command, frozen=True, tag="RevokeKey"):
    """Admin: the key is refused from now on; its open holds still settle."""

    key_id: str
    reason: str = ""


class CreateBudget(Command, frozen=True, tag="CreateBudget"):
    """Admin: a cap on a fleet (key label prefix), a vendor, or the whole tenant."""

    budget_id: str
    scope: BudgetScope
    match: str
    cap_micros: int
    window: Window
    timezone: str = "UTC"


class UpdateBudget(Command, frozen=True, tag="UpdateBudget"):
    budget_id: str
    cap_micros: int


class CloseBudget(Command, frozen=True, tag="CloseBudget"):
    budget_id: str


class QueryBudget(Command, frozen=True, tag="QueryBudget"):
    budget_id: str


class Reserve(Command, frozen=True, tag="Reserve"):
    key_id: str
    secret_sha256: str
    amount_micros: int
    vendor: str
    operation: str
    idempotency_key: str | None = None
    hold_ms: int = 0  # 0: the ledger's default hold time
    # The version of the price data the estimate used ("" when the caller priced it).
    pricing_version: str = ""
    # The caller is about to make the call itself (the proxy): a retry with the same
    # idempotency key whose first attempt is still in flight is refused with
    # ``request_in_progress``, and one whose outcome was unknown resumes the hold.
    claim: bool = False
    # The LLM model the call asks for ("" when not an LLM call), seen by contracts.
    model: str = ""
    # The degrade rule the caller already applied (its rules are not applied twice).
    degraded_by: str = ""


class Commit(Command, frozen=True, tag="Commit"):
    key_id: str
    secret_sha256: str
    reservation_id: str
    actual_micros: int


class Release(Command, frozen=True, tag="Release"):
    key_id: str
    secret_sha256: str
    reservation_id: str
    reason: str


class MarkUnknown(Command, frozen=True, tag="MarkUnknown"):
    """The call under a claimed hold ended without a known cost: keep the hold, unclaimed,
    so that a retry with the same idempotency key can resume it."""

    key_id: str
    secret_sha256: str
    reservation_id: str
    reason: str


class SetContracts(Command, frozen=True, tag="SetContracts"):
    """Admin: replace the tenant's contract set (validated: a bad rule refuses them all)."""

    rules: list[ContractRule]
    source_sha256: str = ""


class QueryContracts(Command, frozen=True, tag="QueryContracts"):
    pass


class Approve(Command, frozen=True, tag="Approve"):
    approval_id: str
    by: str
    note: str = ""


class Reject(Command, frozen=True, tag="Reject"):
    approval_id: str
    by: str
    note: str = ""


class ListApprovals(Command, frozen=True, tag="ListApprovals"):
    """Admin: the tenant's approvals, newest first (``status`` "" = any)."""

    status: str = ""
    limit: int = 100


class QueryKey(Command, frozen=True, tag="QueryKey"):
    """Admin query of one key's state (no secret: only the admin API sends it)."""

    key_id: str


class ListKeys(Command, frozen=True, tag="ListKeys"):
    """Admin: one page of the tenant's keys in ``(label, key_id)`` order (read-only).

    At most one of ``label`` (exactly this label) and ``label_prefix`` (labels starting
    with it). ``cursor`` is the previous page's ``next_cursor``; ``limit`` is 1 to
    ``QUERY_PAGE_ITEMS_MAX``.
    """

    label: str | None = None
    label_prefix: str | None = None
    limit: int = QUERY_PAGE_ITEMS_DEFAULT
    cursor: str | None = None


class ListBudgets(Command, frozen=True, tag="ListBudgets"):
    """Admin: one page of the tenant's budgets in ``budget_id`` order (read-only).

    ``scope`` ("" for every scope) is checked by the ledger, not by the decoder, so that
    a wrong value fails this command alone and not the whole batch.
    """

    scope: str = ""
    include_closed: bool = False
    limit: int = QUERY_PAGE_ITEMS_DEFAULT
    cursor: str | None = None


class QueryRun(Command, frozen=True, tag="QueryRun"):
    """Admin: the spend of a run, the tenant's keys with exactly ``label`` (read-only);
    totals over all of them, and one page of the keys."""

    label: str
    limit: int = QUERY_PAGE_ITEMS_DEFAULT
    cursor: str | None = None


AnyCommand = (
    IssueKey
    | RevokeKey
    | CreateBudget
    | UpdateBudget
    | CloseBudget
    | QueryBudget
    | Reserve
    | Commit
    | Release
    | MarkUnknown
    | SetContracts
    | QueryContracts
    | Approve
    | Reject
    | ListApprovals
    | QueryKey
    | ListKeys
    | ListBudgets
    | QueryRun
)


class Result(msgspec.Struct, frozen=True, tag_field="type", forbid_unknown_fields=True):
    """Base of all results."""


class KeyCreated(Result, frozen=True, tag="KeyCreated"):
    key_id: str
    expires_at_ms: int


class Granted(Result, frozen=True, tag="Granted"):
    reservation_id: str
    amount_micros: int
    expires_at_ms: int
    committed_micros: int
    reserved_micros: int
    cap_micros: int
    replayed: bool = False  # True when an idempotent retry returned the original grant
    # On a replay: the reservation has been settled already (committed, released, expired).
    settled: bool = False
    # On a replay with ``claim``: the retry took over a hold whose outcome was unknown,
    # and must make the call and settle the hold itself.
    resumed: bool = False


class Denied(Result, frozen=True, tag="Denied"):
    decision_id: str
    code: str
    message: str
    scope: str
    scope_id: str
    committed_micros: int
    reserved_micros: int
    cap_micros: int
    requested_micros: int
    replayed: bool = False


class Settled(Result, frozen=True, tag="Settled"):
    """A commit or release took effect (``actual_micros`` is 0 for a release)."""

    reservation_id: str
    actual_micros: int
    released_micros: int
    # The part of ``actual_micros`` above the hold (recorded as ReservationOverrun).
    overrun_micros: int = 0


class KeyState(Result, frozen=True, tag="KeyState"):
    key_id: str
    tenant: str
    label: str
    cap_micros: int
    window: Window
    timezone: str
    window_start_at_ms: int
    committed_micros: int
    reserved_micros: int
    expires_at_ms: int
    overrun_micros: int = 0
    revoked: bool = False
    allowed_vendors: list[str] | None = None
    fleet_labels: list[str] = msgspec.field(default_factory=list)
    # Open budgets this key draws on (fleet budgets matching its labels, tenant budgets).
    budget_ids: list[str] = msgspec.field(default_factory=list)


class BudgetState(Result, frozen=True, tag="BudgetState"):
    budget_id: str
    tenant: str
    scope: BudgetScope
    match: str
    cap_micros: int
    window: Window
    timezone: str
    window_start_at_ms: int
    committed_micros: int
    reserved_micros: int
    # Part of committed_micros that exceeded holds in this window (already counted).
    overrun_micros: int
    closed: bool


class KeyPage(Result, frozen=True, tag="KeyPage"):
    """A page of keys; ``next_cursor`` is None on the last page. A page may hold fewer
    than ``limit`` keys while more follow (it is bounded in bytes too)."""

    keys: list[KeyState]
    next_cursor: str | None = None


class BudgetPage(Result, frozen=True, tag="BudgetPage"):
    """A page of budgets; may be short, even empty, while ``next_cursor`` is set."""

    budgets: list[BudgetState]
    next_cursor: str | None = None


class RunSpend(Result, frozen=True, tag="RunSpend"):
    """A run's totals over all its keys, each key in its own current window, and one page
    of those keys. ``remaining_micros`` sums each key's own remaining (never negative)."""

    label: str
    tenant: str
    key_count: int
    cap_micros: int
    committed_micros: int
    reserved_micros: int
    overrun_micros: int
    remaining_micros: int
    keys: list[KeyState]
    next_cursor: str | None = None


class ApprovalPending(Result, frozen=True, tag="ApprovalPending"):
    """The reserve waits for an operator's approval; retry the same call once approved."""

    approval_id: str
    contract: str
    message: str
    expires_at_ms: int
    replayed: bool = False


class Degrade(Result, frozen=True, tag="Degrade"):
    """Not granted yet: rewrite the call as the rule says, then reserve again with
    ``degraded_by`` set to ``contract``."""

    contract: str
    message: str
    model: str | None
    clamp_max_tokens: bool
    # What remains in the tightest scope: the rewritten call's estimate must fit in it.
    remaining_micros: int


class ContractsState(Result, frozen=True, tag="ContractsState"):
    tenant: str
    version: int
    rules: list[ContractRule]
    source_sha256: str
    set_at_ms: int


class ApprovalInfo(Result, frozen=True, tag="ApprovalInfo"):
    approval_id: str
    tenant: str
    key_id: str
    label: str
    amount_micros: int
    vendor: str
    operation: str
    model: str
    contract: str
    message: str
    requested_at_ms: int
    expires_at_ms: int
    # pending, approved, rejected, expired or used (an approved call was granted).
    status: str
    decided_by: str = ""
    note: str = ""


class ApprovalList(Result, frozen=True, tag="ApprovalList"):
    approvals: list[ApprovalInfo]


class Done(Result, frozen=True, tag="Done"):
    """A command with nothing else to report took effect (e.g. RevokeKey)."""

    message: str


class Failed(Result, frozen=True, tag="Failed"):
    """A command refused without changing state. ``code`` is stable (docs/api.md)."""

    code: str
    message: str


AnyResult = (
    KeyCreated
    | Granted
    | Denied
    | Settled
    | KeyState
    | BudgetState
    | KeyPage
    | BudgetPage
    | RunSpend
    | ApprovalPending
    | Degrade
    | ContractsState
    | ApprovalInfo
    | ApprovalList
    | Done
    | Failed
)


class CommandBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    partition: int
    commands: list[AnyCommand]


class ResultBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    results: list[AnyResult]


_batch_encoder = msgspec.json.Encoder()
_command_batch_decoder = msgspec.json.Decoder(CommandBatch)
_result_batch_decoder = msgspec.json.Decoder(ResultBatch)


def encode_batch(batch: CommandBatch | ResultBatch) -> bytes:
    return _batch_encoder.encode(batch)


def decode_command_batch(data: bytes) -> CommandBatch:
    """Decode a request; raises ``msgspec.DecodeError`` / ``ValidationError`` when malformed."""
    return _command_batch_decoder.decode(data)


def decode_result_batch(data: bytes) -> ResultBatch:
    return _result_batch_decoder.decode(data)
