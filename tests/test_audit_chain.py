"""Pure tests of the audit chain: the link formula, heads, batch planning and verification.

The known vector is computed here by hand from the formula documented in docs/audit.md
and also written out in hex, so the documentation, this test and the code must agree.
"""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from spendgate_auditor._chain import GENESIS_LINK, ChainHead, link
from spendgate_auditor._gaps import GapWatch
from spendgate_auditor._plan import (
    Delivery,
    Gap,
    conflicting_duplicates,
    links_needed,
    parse_deliveries,
    plan_batch,
)
from spendgate_auditor._verifier import HeadRow, PartitionVerifier, ProblemKind
from spendgate_common.event_messages_v2 import StreamedEvent, encode_events, message_headers
from spendgate_common.events_v1 import decode_event, encode_event
from spendgate_common.subjects import (
    HEADER_FIRST_SEQ,
    HEADER_LAST_SEQ,
    HEADER_PARTITION,
    HEADER_SEQ,
    HEADER_TRACEPARENT,
    events_subject,
    events_v1_subject,
)

# Canonical bytes of two ReservationReleased events (round-trip checked below).
BODY_1 = (
    b'{"type":"ReservationReleased","at_ms":1700000000000,"reservation_id":"r1",'
    b'"key_id":"k1","reserved_micros":180000,"reason":"vendor_error"}'
)
BODY_2 = (
    b'{"type":"ReservationReleased","at_ms":1700000000001,"reservation_id":"r2",'
    b'"key_id":"k1","reserved_micros":90000,"reason":"vendor_error"}'
)
# The vector of docs/audit.md: partition 7, seq 1 and 2.
LINK_1_HEX = "6a3f767b68ca664878538d60920c83db3c2049a7b3526ec41ba84ed540184fa0"
LINK_2_HEX = "21d387c79d6a6699720740a3244687d1e4146292486bf3dde014f3d09ca3d362"


def test_vector_bodies_are_canonical_event_bytes() -> None:
    assert encode_event(decode_event(BODY_1)) == BODY_1
    assert encode_event(decode_event(BODY_2)) == BODY_2


def test_link_matches_the_documented_formula_byte_for_byte() -> None:
    hashed_1 = (
        b"\x00" * 32  # previous link: genesis
        + b"\x00\x00\x00\x07"  # partition 7, 4 bytes big-endian
        + b"\x00\x00\x00\x00\x00\x00\x00\x01"  # seq 1, 8 bytes big-endian
        + BODY_1
    )
    expected_1 = hashlib.sha256(hashed_1).digest()
    assert expected_1.hex() == LINK_1_HEX
    assert link(GENESIS_LINK, 7, 1, BODY_1) == expected_1

    hashed_2 = expected_1 + (7).to_bytes(4, "big") + (2).to_bytes(8, "big") + BODY_2
    expected_2 = hashlib.sha256(hashed_2).digest()
    assert expected_2.hex() == LINK_2_HEX
    assert link(expected_1, 7, 2, BODY_2) == expected_2


def test_link_binds_partition_seq_and_previous() -> None:
    base = link(GENESIS_LINK, 7, 1, BODY_1)
    assert link(GENESIS_LINK, 8, 1, BODY_1) != base
    assert link(GENESIS_LINK, 7, 2, BODY_1) != base
    assert link(base, 7, 1, BODY_1) != base
    assert len(base) == 32


def test_link_refuses_values_outside_the_encoded_widths() -> None:
    with pytest.raises(AssertionError):
        link(GENESIS_LINK, 2**32, 1, BODY_1)
    with pytest.raises(AssertionError):
        link(GENESIS_LINK, 0, 0, BODY_1)
    with pytest.raises(AssertionError):
        link(b"short", 0, 1, BODY_1)


def test_extend_follows_the_formula() -> None:
    head = ChainHead.genesis(7).extend(1, BODY_1).extend(2, BODY_2)
    assert head == ChainHead(7, 2, bytes.fromhex(LINK_2_HEX))


@pytest.mark.parametrize("seq", [0, 1, 3])
def test_extend_asserts_the_next_seq(seq: int) -> None:
    head = ChainHead.genesis(7).extend(1, BODY_1)
    with pytest.raises(AssertionError):
        head.extend(seq, BODY_2)


def test_a_head_at_seq_zero_must_be_genesis() -> None:
    with pytest.raises(AssertionError):
        ChainHead(7, 0, bytes.fromhex(LINK_1_HEX))


# ------------------------------------------------------------------- parse_deliveries

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _run_body(first_seq: int, bodies: list[bytes], traceparent: str | None = None) -> bytes:
    return encode_events(
        [
            StreamedEvent(first_seq + index, msgspec.Raw(body), traceparent if index else None)
            for index, body in enumerate(bodies)
        ]
    )


def test_parse_deliveries_reads_a_run_of_events_with_their_own_bytes() -> None:
    body = _run_body(41, [BODY_1, BODY_2], TRACEPARENT)
    deliveries = parse_deliveries(events_subject(3), message_headers(3, 41, 42), body, 5)
    assert deliveries == [
        Delivery(3, 41, BODY_1, 5),
        Delivery(3, 42, BODY_2, 5, TRACEPARENT),
    ]


def test_parse_deliveries_reads_version_1_messages() -> None:
    headers = {HEADER_PARTITION: "3", HEADER_SEQ: "42", HEADER_TRACEPARENT: TRACEPARENT}
    deliveries = parse_deliveries(events_v1_subject(3), headers, BODY_1, 5)
    assert deliveries == [Delivery(3, 42, BODY_1, 5, TRACEPARENT)]


def _v1_headers(partition: str, seq: str) -> dict[str, str]:
    return {HEADER_PARTITION: partition, HEADER_SEQ: seq}


def _v2_headers(partition: str, first: str, last: str) -> dict[str, str]:
    return {HEADER_PARTITION: partition, HEADER_FIRST_SEQ: first, HEADER_LAST_SEQ: last}


TWO = _run_body(1, [BODY_1, BODY_2])


@pytest.mark.parametrize(
    ("subject", "headers", "body"),
    [
        (events_v1_subject(3), None, BODY_1),
        (events_v1_subject(3), {HEADER_PARTITION: "3"}, BODY_1),
        (events_v1_subject(3), _v1_headers("3", "0"), BODY_1),
        (events_v1_subject(3), _v1_headers("3", "-1"), BODY_1),
        (events_v1_subject(3), _v1_headers("x", "1"), BODY_1),
        (events_v1_subject(3), _v1_headers("3", "9" * 30), BODY_1),
        (events_v1_subject(4), _v1_headers("3", "1"), BODY_1),  # header disagrees
        (events_v1_subject(99_999), _v1_headers("99999", "1"), BODY_1),  # beyond the bound
        (events_subject(3), None, TWO),
        (events_subject(3), _v2_headers("3", "1", ""), TWO),
        (events_subject(3), _v2_headers("3", "0", "1"), TWO),
        (events_subject(3), _v2_headers("3", "2", "1"), TWO),  # last before first
        (events_subject(3), _v2_headers("3", "1", "3"), TWO),  # a seq missing from the body
        (events_subject(3), _v2_headers("3", "2", "3"), TWO),  # body seqs are not these
        (events_subject(4), _v2_headers("3", "1", "2"), TWO),  # header disagrees
        (events_subject(3), _v2_headers("3", "1", "2"), BODY_1),  # not an array of events
        (events_subject(3), _v2_headers("3", "1", "2"), b"[1,2]"),
        (events_subject(3), _v2_headers("3", "1", "2"), b"not json"),
        (events_subject(3), _v2_headers("3", "1", "200"), _run_body(1, [BODY_1] * 200)),
        (f"{events_subject(3)}.x", _v2_headers("3", "1", "2"), TWO),
        ("elsewhere", _v2_headers("3", "1", "2"), TWO),
    ],
)
def test_parse_deliveries_refuses_malformed_messages(
    subject: str, headers: dict[str, str] | None, body: bytes
) -> None:
    assert parse_deliveries(subject, headers, body, 0) is None


# ------------------------------------------------------------------------- plan_batch


def _body(partition: int, seq: int) -> bytes:
    return f'{{"p":{partition},"s":{seq}}}'.encode()


def _deliveries(*keys: tuple[int, int]) -> list[Delivery]:
    return [Delivery(p, s, _body(p, s), token) for token, (p, s) in enumerate(keys)]


def _head(partition: int, seq: int) -> ChainHead:
    head = ChainHead.genesis(partition)
    for next_seq in range(1, seq + 1):
        head = head.extend(next_seq, _body(partition, next_seq))
    return head


def test_plan_chains_in_order_and_skips_duplicates() -> None:
    heads = {1: _head(1, 2), 2: _head(2, 0)}
    plan = plan_batch(heads, _deliveries((1, 2), (1, 3), (2, 1), (1, 1), (1, 4), (2, 2)))
    assert [(row.partition, row.seq) for row in plan.links] == [(1, 3), (1, 4), (2, 1), (2, 2)]
    assert plan.heads == {1: _head(1, 4), 2: _head(2, 2)}
    assert [(d.partition, d.seq) for d in plan.duplicates] == [(1, 1), (1, 2)]
    assert plan.held == []
    assert plan.gaps == []
    assert plan.settled_tokens() == [0, 1, 2, 3, 4, 5]


def test_plan_sorts_a_partition_that_arrived_out_of_order() -> None:
    plan = plan_batch({1: _head(1, 0)}, _deliveries((1, 2), (1, 1), (1, 3)))
    assert [row.seq for row in plan.links] == [1, 2, 3]
    assert plan.gaps == []


def test_plan_holds_a_gap_and_everything_after_it_in_that_partition_only() -> None:
    heads = {1: _head(1, 1), 2: _head(2, 0)}
    plan = plan_batch(heads, _deliveries((1, 2), (1, 4), (2, 1), (1, 5), (1, 1)))
    assert [(row.partition, row.seq) for row in plan.links] == [(1, 2), (2, 1)]
    assert [(d.partition, d.seq) for d in plan.held] == [(1, 4), (1, 5)]
    assert [(g.partition, g.expected_seq, g.received_seq) for g in plan.gaps] == [(1, 3, 4)]
    assert plan.settled_tokens() == [0, 2, 4]  # chained and duplicate, never held


def test_a_message_is_acked_only_when_none_of_its_events_is_held() -> None:
    # Message 0 carries seqs 2-3, message 1 seqs 5-6 (beyond a gap), message 2 carries 3
    # again (a redelivery) and 7: a message is settled or handed back whole.
    deliveries = [
        Delivery(1, 2, _body(1, 2), 0),
        Delivery(1, 3, _body(1, 3), 0),
        Delivery(1, 5, _body(1, 5), 1),
        Delivery(1, 6, _body(1, 6), 1),
        Delivery(1, 3, _body(1, 3), 2),
        Delivery(1, 7, _body(1, 7), 2),
    ]
    plan = plan_batch({1: _head(1, 1)}, deliveries)
    assert [row.seq for row in plan.links] == [2, 3]
    assert [d.seq for d in plan.duplicates] == [3]
    assert plan.settled_tokens() == [0]
    assert plan.held_tokens() == [1, 2]


def test_plan_never_moves_a_head_past_a_gap() -> None:
    plan = plan_batch({1: _head(1, 3)}, _deliveries((1, 5)))
    assert plan.links == []
    assert plan.heads == {}
    assert [d.seq for d in plan.held] == [5]


def test_a_duplicate_with_the_chained_bytes_is_no_conflict() -> None:
    head = _head(1, 3)
    plan = plan_batch({1: head}, _deliveries((1, 2), (1, 3), (1, 4)))
    assert links_needed(plan) == [(1, 1), (1, 2), (1, 3)]
    stored = {(1, seq): _head(1, seq).link for seq in (1, 2, 3)}
    assert conflicting_duplicates(plan, stored) == []


def test_a_duplicate_with_other_bytes_is_a_conflict() -> None:
    plan = plan_batch({1: _head(1, 2)}, [Delivery(1, 2, b"edited", 0)])
    stored = {(1, seq): _head(1, seq).link for seq in (1, 2)}
    assert [d.seq for d in conflicting_duplicates(plan, stored)] == [2]
    # A chained seq whose link is missing from the store is an alarm as well.
    assert [d.seq for d in conflicting_duplicates(plan, {})] == [2]


def test_a_duplicate_of_a_link_made_in_the_same_batch_is_checked_against_it() -> None:
    plan = plan_batch({1: _head(1, 0)}, _deliveries((1, 1), (1, 1)))
    assert links_needed(plan) == []
    assert conflicting_duplicates(plan, {}) == []


# --------------------------------------------------------------------------- GapWatch


def test_a_gap_is_an_alarm_only_after_the_threshold_and_then_once_per_threshold() -> None:
    watch = GapWatch(alarm_after_s=10)
    gap = Gap(1, expected_seq=3, received_seq=4)
    assert watch.seen(gap, 100) == ("new", 0.0)
    assert watch.seen(gap, 105) == ("open", 5.0)
    assert watch.seen(gap, 110) == ("alarm", 10.0)
    assert watch.seen(gap, 115) == ("open", 15.0)
    assert watch.seen(gap, 120) == ("alarm", 20.0)


def test_a_gap_that_moved_or_closed_starts_over() -> None:
    watch = GapWatch(alarm_after_s=10)
    watch.seen(Gap(1, 3, 4), 100)
    assert watch.seen(Gap(1, 5, 7), 111) == ("new", 0.0)  # seq 3 arrived, now 5 is late
    watch.advanced([1])
    assert watch.seen(Gap(1, 5, 7), 125) == ("new", 0.0)
    assert watch.seen(Gap(2, 1, 2), 125) == ("new", 0.0)  # partitions are independent


# ----------------------------------------------------------------- PartitionVerifier


def _verify(
    events: dict[int, bytes], chain: dict[int, bytes], head: HeadRow | None, partition: int = 1
) -> PartitionVerifier:
    verifier = PartitionVerifier(partition)
    for seq in sorted(set(events) | set(chain)):
        verifier.observe(seq, events.get(seq), chain.get(seq))
    return verifier


def _log(count: int, partition: int = 1) -> tuple[dict[int, bytes], dict[int, bytes], HeadRow]:
    events = {seq: _body(partition, seq) for seq in range(1, count + 1)}
    chain = {seq: _head(partition, seq).link for seq in range(1, count + 1)}
    return events, chain, HeadRow(count, _head(partition, count).link)


def test_verifier_accepts_a_complete_chain() -> None:
    events, chain, head = _log(5)
    report = _verify(events, chain, head).finish(head)
    assert report.ok
    assert (report.events, report.verified, report.not_yet_audited) == (5, 5, 0)


def test_verifier_reports_lag_as_not_yet_audited() -> None:
    events, chain, _ = _log(5)
    for seq in (4, 5):
        del chain[seq]
    head = HeadRow(3, _head(1, 3).link)
    report = _verify(events, chain, head).finish(head)
    assert report.ok
    assert (report.verified, report.not_yet_audited) == (3, 2)


def test_verifier_accepts_an_empty_partition_with_a_genesis_head() -> None:
    report = PartitionVerifier(1).finish(HeadRow(0, GENESIS_LINK))
    assert report.ok


@pytest.mark.parametrize(
    ("tamper", "kind", "seq"),
    [
        ("edit", ProblemKind.LINK_MISMATCH, 3),
        ("swap", ProblemKind.LINK_MISMATCH, 2),
        ("delete_chained", ProblemKind.EVENT_DELETED, 3),
        ("delete_unchained", ProblemKind.EVENT_GAP, 5),
        ("truncate_tail", ProblemKind.TRUNCATED_TAIL, 5),
        ("delete_chain_row", ProblemKind.CHAIN_GAP, 2),
        ("truncate_chain_tail", ProblemKind.HEAD_MISMATCH, 6),
        ("edit_head", ProblemKind.HEAD_MISMATCH, 6),
        ("delete_head", ProblemKind.HEAD_MISMATCH, 6),
    ],
)
def test_verifier_reports_the_first_problem(tamper: str, kind: ProblemKind, seq: int) -> None:
    events, chain, head_row = _log(6)
    head: HeadRow | None = head_row
    if tamper == "edit":
        events[3] = b"edited"
    elif tamper == "swap":
        events[2], events[3] = events[3], events[2]
    elif tamper == "delete_chained":
        del events[3]
    elif tamper == "delete_unchained":
        for gone in (4, 5, 6):
            del chain[gone]
        del events[5]
        head = HeadRow(3, chain[3])
    elif tamper == "truncate_tail":
        del events[5], events[6]
    elif tamper == "delete_chain_row":
        del chain[2]
    elif tamper == "truncate_chain_tail":
        del chain[6]
    elif tamper == "edit_head":
        head = HeadRow(6, b"\x01" * 32)
    elif tamper == "delete_head":
        head = None
    report = _verify(events, chain, head).finish(head)
    assert report.problem is not None
    assert (report.problem.kind, report.problem.seq) == (kind, seq), report.problem.reason


def test_verifier_reports_a_chain_row_with_an_impossible_seq() -> None:
    events, chain, head = _log(3)
    chain[0] = GENESIS_LINK
    report = _verify(events, chain, head).finish(head)
    assert report.problem is not None
    assert (report.problem.kind, report.problem.seq) == (ProblemKind.INVALID_CHAIN_ROW, 0)


def test_verifier_reports_a_head_whose_chain_rows_are_all_gone() -> None:
    report = PartitionVerifier(1).finish(HeadRow(4, _head(1, 4).link))
    assert report.problem is not None
    assert report.problem.kind is ProblemKind.HEAD_MISMATCH
