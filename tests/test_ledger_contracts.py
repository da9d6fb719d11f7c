"""Contracts and approvals in the ledger's pure state machine (issue 8).

Rules are CEL over ``request`` and ``budget``; the most restrictive match wins; an
approval lets exactly one call through, still under every cap; rejection and lapse are
clear denials; a bad rule refuses the whole set; everything survives a rebuild from the
log and a snapshot.
"""

from __future__ import annotations

import msgspec
import pytest

from spendgate_common.events_v1 import ContractRule
from spendgate_common.ledger_v1 import (
    ApprovalInfo,
    ApprovalList,
    ApprovalPending,
    Approve,
    ContractsState,
    Degrade,
    Denied,
    ListApprovals,
    QueryContracts,
    Reject,
    SetContracts,
)
from spendgate_ledger import PartitionState
from spendgate_ledger._snapshot import decode_snapshot, encode_snapshot
from tests.test_ledger_state import (
    HOLD_DEFAULT_MS,
    NOW_MS,
    PARTITION,
    PARTITION_COUNT,
    TENANT,
    Ledger,
    commit,
    failed,
    granted,
    issue,
    query,
    reserve,
)

BIG = ContractRule(
    name="big-calls",
    when="request.amount_usd >= 0.5",
    decision="require_approval",
    message="calls of $0.50 or more need a human",
    approval_ttl_seconds=600,
)
LOW = ContractRule(
    name="low-budget",
    when='request.vendor == "openai" && budget.percent_used >= 50.0',
    decision="degrade",
    degrade_model="gpt-4o-mini",
)
NO_EMBEDDINGS = ContractRule(
    name="no-embeddings",
    when='request.operation.endsWith("/embeddings")',
    decision="stop",
)


@pytest.fixture
def ledger() -> Ledger:
    ledger = Ledger()
    ledger.run(issue())
    return ledger


def set_rules(ledger: Ledger, *rules: ContractRule) -> ContractsState:
    result = ledger.run(SetContracts(tenant=TENANT, rules=list(rules), source_sha256="s"))
    assert isinstance(result, ContractsState), result
    return result


def approve(ledger: Ledger, approval_id: str, now_ms: int = NOW_MS) -> ApprovalInfo:
    result = ledger.run(Approve(tenant=TENANT, approval_id=approval_id, by="ops@acme"), now_ms)
    assert isinstance(result, ApprovalInfo), result
    return result


def pending(result: object) -> ApprovalPending:
    assert isinstance(result, ApprovalPending), result
    return result


def test_contract_sets_are_versioned(ledger: Ledger) -> None:
    assert ledger.run(QueryContracts(tenant=TENANT)) == ContractsState(TENANT, 0, [], "", 0)
    assert set_rules(ledger, BIG).version == 1
    assert set_rules(ledger, BIG, LOW).version == 2
    state = ledger.run(QueryContracts(tenant=TENANT))
    assert isinstance(state, ContractsState)
    assert (state.version, state.rules) == (2, [BIG, LOW])


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        (msgspec.structs.replace(BIG, when="request.amount_usd >="), "1:22"),
        (msgspec.structs.replace(BIG, when="secrets.key == 1"), "unknown variable"),
        (msgspec.structs.replace(BIG, when="request.amount_usd + 1.0"), "must be a bool"),
        (msgspec.structs.replace(BIG, when='request.amount_micros + "a" > 1'), "sample"),
        (msgspec.structs.replace(BIG, name="Bad Name"), "name must be"),
        (msgspec.structs.replace(BIG, approval_ttl_seconds=1), "approval_ttl_seconds"),
        (msgspec.structs.replace(BIG, degrade_model="x"), "degrade_model applies only"),
    ],
)
def test_a_bad_rule_refuses_the_whole_set(
    ledger: Ledger, rule: ContractRule, fragment: str
) -> None:
    last_seq = ledger.state.last_seq
    result = ledger.run(SetContracts(tenant=TENANT, rules=[LOW, rule]))
    refusal = failed(result, "invalid_contract")
    assert "rule 2" in refusal.message
    assert fragment in refusal.message
    assert ledger.state.last_seq == last_seq
    assert TENANT not in ledger.state.contracts


def test_stop_denies_before_any_cap(ledger: Ledger) -> None:
    set_rules(ledger, NO_EMBEDDINGS, LOW)
    denied = ledger.run(reserve(1_000, operation="POST /v1/embeddings"))
    assert isinstance(denied, Denied), denied
    assert (denied.code, denied.scope, denied.scope_id) == (
        "contract_stop",
        "contract",
        "no-embeddings",
    )
    granted(ledger.run(reserve(1_000)))


def test_degrade_asks_for_a_rewrite_then_grants(ledger: Ledger) -> None:
    set_rules(ledger, LOW)
    granted(ledger.run(reserve(400_000)))  # 40% of the $1 cap: no rule matches
    granted(ledger.run(reserve(200_000)))  # 60% afterwards, but decided at 40%
    degrade = ledger.run(reserve(100_000))
    assert isinstance(degrade, Degrade), degrade
    assert (degrade.contract, degrade.model, degrade.remaining_micros) == (
        "low-budget",
        "gpt-4o-mini",
        400_000,
    )
    # The caller rewrote the call: degrade rules do not apply to it again; caps still do.
    last = granted(ledger.run(msgspec.structs.replace(reserve(50_000), degraded_by="low-budget")))
    event = ledger.events()[-1]
    assert getattr(event, "degraded_by", None) == "low-budget"
    assert last.reserved_micros == 650_000


def test_approval_round_trip_grants_exactly_one_call(ledger: Ledger) -> None:
    set_rules(ledger, BIG)
    first = pending(ledger.run(reserve(600_000, idempotency_key="charge-1")))
    assert first.contract == "big-calls"
    # Asking again while pending: the same approval, no new event.
    last_seq = ledger.state.last_seq
    again = pending(ledger.run(reserve(600_000, idempotency_key="charge-1")))
    assert (again.approval_id, again.replayed) == (first.approval_id, True)
    assert ledger.state.last_seq == last_seq
    listed = ledger.run(ListApprovals(tenant=TENANT, status="pending"))
    assert isinstance(listed, ApprovalList)
    assert [a.approval_id for a in listed.approvals] == [first.approval_id]

    assert approve(ledger, first.approval_id).status == "approved"
    grant = granted(ledger.run(reserve(600_000, idempotency_key="charge-1")))
    assert getattr(ledger.events()[-1], "approval_id", None) == first.approval_id
    # The approval is used; the same idempotency key replays the grant.
    replay = granted(ledger.run(reserve(600_000, idempotency_key="charge-1")))
    assert replay.reservation_id == grant.reservation_id
    used = ledger.run(ListApprovals(tenant=TENANT))
    assert isinstance(used, ApprovalList)
    assert used.approvals[0].status == "used"
    failed(
        ledger.run(Approve(tenant=TENANT, approval_id=first.approval_id, by="x")),
        "approval_not_pending",
    )
    # A small call is not asked about.
    granted(ledger.run(reserve(100_000)))


def test_an_approved_call_is_still_subject_to_the_caps(ledger: Ledger) -> None:
    set_rules(ledger, BIG)
    approval = pending(ledger.run(reserve(600_000, idempotency_key="charge-1")))
    rid = granted(ledger.run(reserve(450_000))).reservation_id
    approve(ledger, approval.approval_id)
    denied = ledger.run(reserve(600_000, idempotency_key="charge-1"))
    assert isinstance(denied, Denied), denied
    assert denied.code == "cap_exhausted"
    ledger.run(commit(rid, 450_000))
    assert query(ledger=ledger).committed_micros == 450_000


def test_rejection_and_lapse_are_clear_denials(ledger: Ledger) -> None:
    set_rules(ledger, BIG)
    one = pending(ledger.run(reserve(600_000, idempotency_key="one")))
    rejected = ledger.run(
        Reject(tenant=TENANT, approval_id=one.approval_id, by="ops@acme", note="too much")
    )
    assert isinstance(rejected, ApprovalInfo)
    assert (rejected.status, rejected.note) == ("rejected", "too much")
    denied = ledger.run(reserve(600_000, idempotency_key="one"))
    assert isinstance(denied, Denied)
    assert (denied.code, denied.scope_id) == ("approval_rejected", one.approval_id)

    two = pending(ledger.run(reserve(600_000, idempotency_key="two")))
    later = two.expires_at_ms
    failed(
        ledger.run(Approve(tenant=TENANT, approval_id=two.approval_id, by="ops"), later),
        "approval_not_pending",
    )
    lapsed = ledger.run(reserve(600_000, idempotency_key="two"), later)
    assert isinstance(lapsed, Denied)
    assert lapsed.code == "approval_expired"
    # Without an idempotency key, a lapsed approval is simply asked for again.
    three = pending(ledger.run(reserve(600_000)))
    four = pending(ledger.run(reserve(600_000), three.expires_at_ms))
    assert four.approval_id != three.approval_id


def test_approvals_are_per_tenant(ledger: Ledger) -> None:
    set_rules(ledger, BIG)
    approval = pending(ledger.run(reserve(600_000, idempotency_key="one")))
    failed(
        ledger.run(Approve(tenant="globex", approval_id=approval.approval_id, by="x")),
        "wrong_partition",
    )


def test_contracts_and_approvals_survive_rebuild_and_snapshot(ledger: Ledger) -> None:
    set_rules(ledger, BIG, LOW, NO_EMBEDDINGS)
    used = pending(ledger.run(reserve(600_000, idempotency_key="one")))
    approve(ledger, used.approval_id)
    granted(ledger.run(reserve(600_000, idempotency_key="one")))
    waiting = pending(ledger.run(reserve(500_000, idempotency_key="two")))
    rebuilt = ledger.rebuilt()
    restored = decode_snapshot(
        encode_snapshot(ledger.state), PartitionState(PARTITION, PARTITION_COUNT, HOLD_DEFAULT_MS)
    )
    for state in (rebuilt, restored):
        assert state.approvals == ledger.state.approvals
        assert state.approval_index == ledger.state.approval_index
        assert [c.rule for c in state.contracts[TENANT].rules] == [BIG, LOW, NO_EMBEDDINGS]
        twin = Ledger(state, list(ledger.log))
        again = pending(twin.run(reserve(500_000, idempotency_key="two")))
        assert again.approval_id == waiting.approval_id


def test_a_failing_expression_fails_closed(ledger: Ledger) -> None:
    # fleet_labels[0] does not exist for this key: an evaluation error counts as a match.
    rule = ContractRule(name="first-fleet", when='request.fleet_labels[0] == "x"', decision="stop")
    set_rules(ledger, rule)
    denied = ledger.run(reserve(1_000))
    assert isinstance(denied, Denied)
    assert denied.code == "contract_stop"
