"""The ledger's compact store of settled reservation ids answers as a dict with a
retention queue would, for ids of every shape, and its snapshot columns restore it."""

from __future__ import annotations

import zlib
from array import array
from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate_ledger._settled import (
    BLOCK_ENTRIES,
    CHUNK_SIZE,
    OUTCOMES,
    SettledColumns,
    SettledIds,
)

PARTITION = 3


class _Model:
    """What the store replaced: a dict of outcomes and a queue by settle time."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}
        self.order: deque[tuple[int, str]] = deque()

    def add(self, reservation_id: str, outcome: str, at_ms: int) -> None:
        self.outcomes[reservation_id] = outcome
        self.order.append((at_ms, reservation_id))

    def forget_before(self, cutoff_ms: int) -> None:
        while self.order and self.order[0][0] < cutoff_ms:
            del self.outcomes[self.order.popleft()[1]]


def _restored(store: SettledIds) -> SettledIds:
    again = SettledIds(PARTITION)
    again.restore_compact(store.compact_columns())
    for at_ms, reservation_id, outcome in store.other_entries():
        again.add(reservation_id, outcome, at_ms)
    return again


# Compact ids across three chunks, and strings that are not this partition's compact
# spelling of a seq, yet look close to one: each must be its own id.
_COMPACT = st.integers(min_value=1, max_value=3 * CHUNK_SIZE).map(lambda n: f"rsv_{PARTITION}_{n}")
_LOOKALIKES = st.sampled_from(
    [
        f"rsv_{PARTITION}_0",
        f"rsv_{PARTITION}_07",
        f"rsv_{PARTITION}_7 ",
        f"rsv_{PARTITION}_+7",
        f"rsv_{PARTITION}_\u0667",  # an Arabic-Indic seven: isdigit(), not ASCII
        f"rsv_{PARTITION}_" + "9" * 19,
        f"rsv_{PARTITION}_",
        f"rsv_{PARTITION + 1}_7",
        f"rsv_{PARTITION}7",
        "apr_3_7",
        "",
    ]
)
_IDS = st.one_of(_COMPACT, _LOOKALIKES)
_OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"), _IDS, st.sampled_from(OUTCOMES), st.integers(min_value=0, max_value=5)
        ),
        st.tuples(st.just("forget"), st.integers(min_value=0, max_value=40)),
        st.tuples(st.just("get"), _IDS),
        st.tuples(st.just("snapshot")),
    ),
    max_size=150,
)


@given(_OPERATIONS)
def test_every_answer_matches_a_dict_with_a_retention_queue(
    operations: list[tuple[object, ...]],
) -> None:
    store, model = SettledIds(PARTITION), _Model()
    now_ms = 1_000
    for operation in operations:
        match operation:
            case ("add", str(reservation_id), str(outcome), int(step_ms)):
                now_ms += step_ms
                if reservation_id not in model.outcomes:  # an id is settled once
                    store.add(reservation_id, outcome, now_ms)
                    model.add(reservation_id, outcome, now_ms)
            case ("forget", int(back_ms)):
                store.forget_before(now_ms - back_ms)
                model.forget_before(now_ms - back_ms)
            case ("get", str(reservation_id)):
                assert store.get(reservation_id) == model.outcomes.get(reservation_id)
                assert (reservation_id in store) == (reservation_id in model.outcomes)
            case _:
                store = _restored(store)
        assert len(store) == len(model.outcomes)
    assert {rid: outcome for _, rid, outcome in store.entries()} == model.outcomes
    assert sorted((at, rid) for at, rid, _ in store.entries()) == sorted(model.order)
    assert _restored(store) == store
    store.forget_before(now_ms + 1)
    assert len(store) == 0
    assert store.footprint_bytes() == 0


def test_many_ids_across_blocks_and_chunks_are_forgotten_in_settle_order() -> None:
    store, model = SettledIds(PARTITION), _Model()
    count = 3 * BLOCK_ENTRIES + 17
    # Settled out of grant order (a long hold settles late), ten per millisecond.
    seqs = [seq for start in range(1, 11) for seq in range(start, 10 * count, 10)][:count]
    for index, seq in enumerate(seqs):
        outcome = OUTCOMES[seq % 3]
        store.add(f"rsv_{PARTITION}_{seq}", outcome, index // 10)
        model.add(f"rsv_{PARTITION}_{seq}", outcome, index // 10)
    full = store.footprint_bytes()
    for cutoff_ms in range(0, count // 10 + 2, 97):
        store.forget_before(cutoff_ms)
        model.forget_before(cutoff_ms)
        assert len(store) == len(model.outcomes)
        # Restored from a snapshot in the middle of a partly forgotten block.
        assert _restored(store) == store
    for reservation_id in [*list(model.outcomes)[:50], f"rsv_{PARTITION}_{seqs[0]}"]:
        assert store.get(reservation_id) == model.outcomes.get(reservation_id)
    assert store.footprint_bytes() < full
    store.forget_before(count)
    assert (len(store), store.footprint_bytes()) == (0, 0)
    # Empty again, it takes new ids as a fresh store does.
    store.add(f"rsv_{PARTITION}_{10 * count + 1}", "released", count)
    assert store.get(f"rsv_{PARTITION}_{10 * count + 1}") == "released"


def test_a_compact_id_costs_about_17_bytes() -> None:
    store = SettledIds(PARTITION)
    count = 100_000
    for seq in range(1, 2 * count, 2):  # a grant and its commit: every other seq
        store.add(f"rsv_{PARTITION}_{seq}", "committed", seq)
    # 16 bytes of queue, and two sequence numbers of chunk per id.
    assert store.footprint_bytes() <= count * 18 + 2 * CHUNK_SIZE


def test_columns_that_do_not_agree_are_refused() -> None:
    store = SettledIds(PARTITION)
    for seq in (5, 9, CHUNK_SIZE + 1):
        store.add(f"rsv_{PARTITION}_{seq}", "committed", seq)
    times, seqs, chunks = store.compact_columns()
    for bad, problem in (
        (SettledColumns(times[:-1], seqs, chunks), "times column is not whole"),
        (SettledColumns(times, seqs[:-8], chunks), "differ in length"),
        (SettledColumns(times[:-8], seqs[:-8], chunks), "disagree"),
        (SettledColumns(times, seqs, chunks[:1]), "disagree"),
        (SettledColumns(times, seqs, [(chunks[0][0], chunks[0][1][:-1])]), "bytes"),
    ):
        with pytest.raises(ValueError, match=problem):
            SettledIds(PARTITION).restore_compact(bad)


def test_columns_of_a_steady_stream_compress_to_almost_nothing() -> None:
    store = SettledIds(PARTITION)
    count = 100_000
    for index, seq in enumerate(range(1, 2 * count, 2)):  # ten settles a millisecond
        store.add(f"rsv_{PARTITION}_{seq}", "committed", 1_741_622_400_000 + index // 10)
    columns = store.compact_columns()
    stored = sum(len(zlib.compress(column, 1)) for column in (columns.times, columns.seqs))
    pairs = array("q")
    for block in store._blocks:
        pairs.extend(block)
    # As differences (mostly 0, 1 and 2): under a fifth of a byte an id, and a tenth of
    # what the same pairs take compressed as they are.
    assert stored < count // 5
    assert stored * 10 < len(zlib.compress(pairs.tobytes(), 1))
