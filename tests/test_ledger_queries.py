"""The ledger's read-only queries (spendgate_ledger._queries), on the pure partition state:
pages of keys and budgets, and a run's spend. No I/O: the real stack is in
tests/test_control_plane.py."""

from __future__ import annotations

import sys

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendgate_common.ledger_v1 import (
    BudgetPage,
    CloseBudget,
    CreateBudget,
    Failed,
    Granted,
    KeyPage,
    ListBudgets,
    ListKeys,
    QueryRun,
    RunSpend,
)
from spendgate_common.limits import QUERY_PAGE_BYTES_MAX
from spendgate_ledger._queries import RUN_KEYS_MAX
from tests.test_ledger_state import (
    NEIGHBOUR_TENANT,
    TENANT,
    Ledger,
    commit,
    issue,
    reserve,
)

_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


def key_id(number: int) -> str:
    """A distinct key id (16 of a-z and 2-7) for each number."""
    digits = []
    for _ in range(16):
        number, digit = divmod(number, 32)
        digits.append(_BASE32[digit])
    return "".join(reversed(digits))


def list_keys(ledger: Ledger, **filters: object) -> tuple[list[tuple[str, str]], int]:
    """Every key of the listing, page by page; and the number of pages it took."""
    seen: list[tuple[str, str]] = []
    cursor: str | None = None
    for pages in range(1, 10_000):
        page = ledger.run(ListKeys(TENANT, cursor=cursor, **filters))  # type: ignore[arg-type]
        assert isinstance(page, KeyPage), page
        seen.extend((key.label, key.key_id) for key in page.keys)
        if page.next_cursor is None:
            return seen, pages
        cursor = page.next_cursor
    raise AssertionError("paging does not end")


def test_keys_are_paged_in_label_then_key_id_order_and_tenants_stay_apart() -> None:
    ledger = Ledger()
    labels = ["run-b", "run-a", "run-10", "run-1", "run-a", "run-1/x", "run-c"]
    for number, label in enumerate(labels):
        assert not isinstance(ledger.run(issue(key_id(number), label=label)), Failed)
    ledger.run(issue(key_id(99), label="run-a", tenant=NEIGHBOUR_TENANT))
    seq_before = ledger.state.last_seq

    everything, pages = list_keys(ledger, limit=3)
    expected = sorted((label, key_id(number)) for number, label in enumerate(labels))
    assert everything == expected
    assert pages == 3
    assert list_keys(ledger, label="run-1")[0] == [("run-1", key_id(3))]
    assert list_keys(ledger, label="run-a", limit=1)[0] == [
        ("run-a", key_id(1)),
        ("run-a", key_id(4)),
    ]
    assert [label for label, _ in list_keys(ledger, label_prefix="run-1")[0]] == [
        "run-1",
        "run-1/x",
        "run-10",
    ]
    assert list_keys(ledger, label="run")[0] == []
    # Queries write nothing.
    assert ledger.state.last_seq == seq_before


def test_a_cursor_stays_valid_while_keys_are_added() -> None:
    ledger = Ledger()
    for number, label in enumerate(["a", "c", "e"]):
        ledger.run(issue(key_id(number), label=label))
    first = ledger.run(ListKeys(TENANT, limit=2))
    assert isinstance(first, KeyPage)
    assert [key.label for key in first.keys] == ["a", "c"]
    ledger.run(issue(key_id(10), label="b"))  # before the cursor: not seen by this walk
    ledger.run(issue(key_id(11), label="d"))  # after it: seen
    rest = ledger.run(ListKeys(TENANT, limit=2, cursor=first.next_cursor))
    assert isinstance(rest, KeyPage)
    assert [key.label for key in rest.keys] == ["d", "e"]
    assert rest.next_cursor is None


def test_a_page_stops_before_its_byte_bound() -> None:
    ledger = Ledger()
    fleet_labels = [f"{index:02d}" + "f" * 126 for index in range(16)]
    for number in range(40):
        command = issue(key_id(number), label=f"run-{number:02d}")
        ledger.run(msgspec.structs.replace(command, fleet_labels=fleet_labels))
    page = ledger.run(ListKeys(TENANT, limit=200))
    assert isinstance(page, KeyPage)
    assert 0 < len(page.keys) < 40
    assert page.next_cursor is not None
    assert sum(len(msgspec.json.encode(key)) for key in page.keys) <= QUERY_PAGE_BYTES_MAX
    everything, pages = list_keys(ledger, limit=200)
    assert len(everything) == 40
    assert pages > 1


def test_budgets_are_paged_by_id_with_scope_and_closed_filters() -> None:
    ledger = Ledger()
    budgets = [
        ("fleet-b", "fleet", "run-"),
        ("fleet-a", "fleet", "run-"),
        ("stripe-daily", "vendor", "stripe"),
        ("tenant-total", "tenant", ""),
    ]
    for budget_id, scope, match in budgets:
        created = ledger.run(
            CreateBudget(TENANT, budget_id, scope, match, 1_000_000, "total")  # type: ignore[arg-type]
        )
        assert not isinstance(created, Failed), created
    ledger.run(CreateBudget(NEIGHBOUR_TENANT, "fleet-x", "fleet", "a", 1_000_000, "total"))
    ledger.run(CloseBudget(TENANT, "fleet-b"))

    def listed(**filters: object) -> list[str]:
        ids: list[str] = []
        cursor: str | None = None
        while True:
            page = ledger.run(ListBudgets(TENANT, limit=1, cursor=cursor, **filters))  # type: ignore[arg-type]
            assert isinstance(page, BudgetPage), page
            ids.extend(budget.budget_id for budget in page.budgets)
            if page.next_cursor is None:
                return ids
            cursor = page.next_cursor

    assert listed() == ["fleet-a", "stripe-daily", "tenant-total"]
    assert listed(include_closed=True) == ["fleet-a", "fleet-b", "stripe-daily", "tenant-total"]
    assert listed(scope="fleet", include_closed=True) == ["fleet-a", "fleet-b"]
    assert listed(scope="vendor") == ["stripe-daily"]
    page = ledger.run(ListBudgets(TENANT, include_closed=True))
    assert isinstance(page, BudgetPage)
    assert [budget.closed for budget in page.budgets] == [False, True, False, False]


def test_a_run_sums_its_keys_each_against_its_own_cap() -> None:
    ledger = Ledger()
    ledger.run(issue(key_id(1), label="run-7", cap=1_000_000))
    ledger.run(issue(key_id(2), label="run-7", cap=500_000))
    ledger.run(issue(key_id(3), label="run-70", cap=9_000_000))
    granted = ledger.run(reserve(300_000, key_id=key_id(1)))
    assert isinstance(granted, Granted)
    # An overrun on key 1 (actual above the hold and above its cap) ...
    ledger.run(commit(granted.reservation_id, 1_200_000, key_id=key_id(1)))
    ledger.run(reserve(200_000, key_id=key_id(2)))

    spend = ledger.run(QueryRun(TENANT, "run-7"))
    assert isinstance(spend, RunSpend), spend
    assert spend.key_count == 2
    assert (spend.cap_micros, spend.committed_micros, spend.reserved_micros) == (
        1_500_000,
        1_200_000,
        200_000,
    )
    assert spend.overrun_micros == 900_000
    # ... does not eat key 2's room: remaining is 0 + 300_000, not 1_500_000 - 1_400_000.
    assert spend.remaining_micros == 300_000
    assert [key.key_id for key in spend.keys] == [key_id(1), key_id(2)]

    paged = ledger.run(QueryRun(TENANT, "run-7", limit=1))
    assert isinstance(paged, RunSpend)
    assert [key.key_id for key in paged.keys] == [key_id(1)]
    rest = ledger.run(QueryRun(TENANT, "run-7", limit=1, cursor=paged.next_cursor))
    assert isinstance(rest, RunSpend)
    assert [key.key_id for key in rest.keys] == [key_id(2)]
    assert rest.next_cursor is None
    assert rest.committed_micros == spend.committed_micros

    missing = ledger.run(QueryRun(TENANT, "run-8"))
    assert isinstance(missing, Failed)
    assert missing.code == "run_not_found"
    other_tenant = ledger.run(QueryRun(NEIGHBOUR_TENANT, "run-7"))
    assert isinstance(other_tenant, Failed)
    assert other_tenant.code == "run_not_found"


def test_a_label_shared_by_too_many_keys_is_not_a_run() -> None:
    ledger = Ledger()
    for number in range(RUN_KEYS_MAX + 1):
        ledger.run(issue(key_id(number), label="everything"))
    result = ledger.run(QueryRun(TENANT, "everything"))
    assert isinstance(result, Failed)
    assert result.code == "run_too_large"
    page = ledger.run(ListKeys(TENANT, label="everything", limit=200))
    assert isinstance(page, KeyPage)
    assert len(page.keys) == 200


@pytest.mark.parametrize(
    ("query", "code"),
    [
        (ListKeys(TENANT, limit=0), "invalid_limit"),
        (ListKeys(TENANT, limit=201), "invalid_limit"),
        (ListKeys(TENANT, cursor="not a cursor"), "invalid_cursor"),
        (ListKeys(TENANT, cursor="x" * 2_000), "invalid_cursor"),
        (ListKeys(TENANT, label="a", label_prefix="a"), "invalid_label"),
        (ListKeys(TENANT, label=""), "invalid_label"),
        (ListKeys(TENANT, label_prefix="x" * 129), "invalid_label"),
        (ListBudgets(TENANT, scope="galaxy"), "invalid_scope"),
        (QueryRun(TENANT, ""), "invalid_label"),
        (QueryRun("globex", "run-1"), "wrong_partition"),
    ],
)
def test_bad_queries_are_refused(query: ListKeys | ListBudgets | QueryRun, code: str) -> None:
    result = Ledger().run(query)
    assert isinstance(result, Failed)
    assert result.code == code


def test_a_cursor_of_another_listing_is_refused() -> None:
    ledger = Ledger()
    for number in range(3):
        ledger.run(issue(key_id(number), label=f"run-{number}"))
        ledger.run(CreateBudget(TENANT, f"b{number}", "tenant", "", 1_000_000, "total"))
    keys = ledger.run(ListKeys(TENANT, limit=1))
    budgets = ledger.run(ListBudgets(TENANT, limit=1))
    assert isinstance(keys, KeyPage)
    assert isinstance(budgets, BudgetPage)
    wrong = ledger.run(ListBudgets(TENANT, cursor=keys.next_cursor))
    assert isinstance(wrong, Failed)
    assert wrong.code == "invalid_cursor"
    wrong = ledger.run(ListKeys(TENANT, cursor=budgets.next_cursor))
    assert isinstance(wrong, Failed)
    assert wrong.code == "invalid_cursor"


def test_a_rebuilt_state_answers_the_same_pages() -> None:
    ledger = Ledger()
    for number in range(5):
        ledger.run(issue(key_id(number), label=f"run-{4 - number}"))
    before = ledger.run(ListKeys(TENANT, limit=2))
    rebuilt = Ledger(state=ledger.rebuilt())
    assert rebuilt.run(ListKeys(TENANT, limit=2)) == before


# Labels from a small alphabet (so prefixes collide), with the two edge characters of
# the range arithmetic: NUL and the largest code point.
_LABEL_CHARACTERS = st.sampled_from(["a", "b", "/", "\0", chr(sys.maxunicode)])
_LABELS = st.text(_LABEL_CHARACTERS, min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    labels=st.lists(_LABELS, max_size=25),
    limit=st.integers(1, 4),
    exact=st.one_of(st.none(), _LABELS),
    prefix=st.one_of(st.none(), _LABELS),
)
def test_paging_lists_exactly_the_matching_keys_once_in_order(
    labels: list[str], limit: int, exact: str | None, prefix: str | None
) -> None:
    ledger = Ledger()
    for number, label in enumerate(labels):
        ledger.run(issue(key_id(number), label=label))
    filters: dict[str, object] = {"limit": limit}
    if exact is not None:
        filters["label"] = exact
    elif prefix is not None:
        filters["label_prefix"] = prefix
    listed, _ = list_keys(ledger, **filters)
    expected = sorted(
        (label, key_id(number))
        for number, label in enumerate(labels)
        if (exact is None or label == exact)
        and (exact is not None or prefix is None or label.startswith(prefix))
    )
    assert listed == expected
