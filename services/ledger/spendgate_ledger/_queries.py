"""Read-only queries of a partition: pages of keys and budgets, and the spend of a run.

A tenant lives wholly in one partition, so every tenant-wide question is answered by one
partition from memory, in its queue order like any command, and writes no event.

Order and cursors. Keys are listed in ``(label, key id)`` order and budgets in budget id
order, per tenant. A cursor names the last entry a page looked at, and the next page
starts right after it; keys and budgets are never removed (a key is revoked or expires,
a budget is closed), so a cursor stays valid forever, and entries added meanwhile appear
in their place in the order. Cursors are opaque to callers (base64url of a small JSON
array that says which listing it belongs to).

Indexes. Each tenant's ``(label, key id)`` pairs and budget ids are kept sorted in a
:class:`QueryIndexes` hung on the state (a cache, not compared and not in snapshots),
built on the first query and extended by what was added since: ``keys`` and ``budgets``
only grow and keep insertion order, so the entries past the count already indexed are
exactly the new ones. A partition that is never queried never builds them.

Bounds. A page holds at most ``limit`` items (1 to ``QUERY_PAGE_ITEMS_MAX``) and stops
before its JSON passes ``QUERY_PAGE_BYTES_MAX`` (one item at least, so paging always
moves on); a filtered budget page looks at most ``SCAN_ENTRIES_MAX`` entries. So a page
may be short, even empty, while ``next_cursor`` is set. A run's totals visit all its
keys, at most ``RUN_KEYS_MAX``.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, TypeVar

import msgspec

from spendgate_common.ledger_v1 import (
    AnyResult,
    BudgetPage,
    BudgetState,
    Failed,
    KeyPage,
    KeyState,
    ListBudgets,
    ListKeys,
    QueryBudget,
    QueryKey,
    QueryRun,
    RunSpend,
)
from spendgate_common.limits import (
    LABEL_CHARS_MAX,
    QUERY_CURSOR_CHARS_MAX,
    QUERY_PAGE_BYTES_MAX,
    QUERY_PAGE_ITEMS_MAX,
)

if TYPE_CHECKING:
    from spendgate_ledger._state import PartitionState

# Most keys one run may have for GET /v1/runs/{label}/spend (its totals visit them all);
# a label shared by more keys is a fleet, listed with ListKeys instead.
RUN_KEYS_MAX = 1_000
# Most index entries one filtered page looks at (closed budgets skipped, another scope).
SCAN_ENTRIES_MAX = 10_000
BUDGET_SCOPES = ("fleet", "vendor", "tenant")
# Up to this many new entries are inserted one by one into a tenant's index, more are
# appended and the whole list sorted.
INSERTIONS_MAX = 64

_KEYS_CURSOR = "k"
_BUDGETS_CURSOR = "b"
_Item = TypeVar("_Item", KeyState, BudgetState)
_Entry = TypeVar("_Entry", tuple[str, str], str)
_encoder = msgspec.json.Encoder()
_cursor_decoder = msgspec.json.Decoder(list[str])


@dataclass(slots=True)
class QueryIndexes:
    """Per tenant, sorted: ``(label, key id)`` of every key and the id of every budget."""

    keys_indexed: int = 0
    keys: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    budgets_indexed: int = 0
    budgets: dict[str, list[str]] = field(default_factory=dict)

    def catch_up(self, state: PartitionState) -> None:
        """Index the keys and budgets added since the last call."""
        if len(state.keys) > self.keys_indexed:
            new_keys: dict[str, list[tuple[str, str]]] = {}
            for key in islice(state.keys.values(), self.keys_indexed, None):
                new_keys.setdefault(key.tenant, []).append((key.label, key.key_id))
            for tenant, entries in new_keys.items():
                _merge(self.keys.setdefault(tenant, []), entries)
            self.keys_indexed = len(state.keys)
        if len(state.budgets) > self.budgets_indexed:
            new_budgets: dict[str, list[str]] = {}
            for tenant, budget_id in islice(state.budgets, self.budgets_indexed, None):
                new_budgets.setdefault(tenant, []).append(budget_id)
            for tenant, budget_ids in new_budgets.items():
                _merge(self.budgets.setdefault(tenant, []), budget_ids)
            self.budgets_indexed = len(state.budgets)


def _merge(index: list[_Entry], new: list[_Entry]) -> None:
    """Add ``new`` to the sorted ``index``: a few by binary insertion (a search and a
    memmove each), many by appending and sorting (about linear: Timsort merges runs)."""
    if len(new) <= INSERTIONS_MAX:
        for entry in new:
            bisect.insort(index, entry)
    else:
        index.extend(new)
        index.sort()


def indexes(state: PartitionState) -> QueryIndexes:
    """The state's query indexes, up to date (built on first use)."""
    current = state.query_indexes
    # Fewer entries than indexed would mean something was removed: start again.
    if (
        not isinstance(current, QueryIndexes)
        or len(state.keys) < current.keys_indexed
        or len(state.budgets) < current.budgets_indexed
    ):
        current = QueryIndexes()
        state.query_indexes = current
    current.catch_up(state)
    return current


def answer_query(
    state: PartitionState, command: ListKeys | ListBudgets | QueryRun, now_ms: int
) -> AnyResult:
    """The answer to a read-only query (the caller checked the tenant's partition)."""
    problem = _page_problem(command.limit, command.cursor)
    if problem is not None:
        return problem
    if isinstance(command, ListKeys):
        return _list_keys(state, command, now_ms)
    if isinstance(command, ListBudgets):
        return _list_budgets(state, command, now_ms)
    return _query_run(state, command, now_ms)


# ------------------------------------------------------------------------------- keys


def _list_keys(state: PartitionState, command: ListKeys, now_ms: int) -> KeyPage | Failed:
    if command.label is not None and command.label_prefix is not None:
        return Failed("invalid_label", "give at most one of label and label_prefix")
    entries = indexes(state).keys.get(command.tenant, [])
    start, stop = 0, len(entries)
    if command.label is not None:
        if not 0 < len(command.label) <= LABEL_CHARS_MAX:
            return _label_failure("label")
        start, stop = _label_range(entries, command.label)
    elif command.label_prefix is not None:
        if not 0 < len(command.label_prefix) <= LABEL_CHARS_MAX:
            return _label_failure("label_prefix")
        start, stop = _prefix_range(entries, command.label_prefix)
    resume_at = _after_key_cursor(entries, start, stop, command.cursor)
    if isinstance(resume_at, Failed):
        return resume_at
    load = _key_loader(state, command, now_ms)
    keys, resume = _page(entries, resume_at, stop, command.limit, load)
    return KeyPage(keys, _key_cursor(entries, resume))


def _query_run(state: PartitionState, command: QueryRun, now_ms: int) -> RunSpend | Failed:
    if not 0 < len(command.label) <= LABEL_CHARS_MAX:
        return _label_failure("label")
    entries = indexes(state).keys.get(command.tenant, [])
    first, stop = _label_range(entries, command.label)
    if first == stop:
        return Failed("run_not_found", "no key of this tenant has this label")
    start = _after_key_cursor(entries, first, stop, command.cursor)
    if isinstance(start, Failed):
        return start
    if stop - first > RUN_KEYS_MAX:
        message = (
            f"{stop - first} keys have this label, more than a run may have "
            f"({RUN_KEYS_MAX}); list them with GET /v1/keys?label="
        )
        return Failed("run_too_large", message)
    cap = committed = reserved = overrun = remaining = 0
    for _, key_id in entries[first:stop]:
        meter = state.keys[key_id].meter
        _, key_committed, key_overrun = meter.usage_at(now_ms)
        cap += meter.cap_micros
        committed += key_committed
        reserved += meter.reserved_micros
        overrun += key_overrun
        # Per key: one key's overrun does not use up another key's room.
        remaining += max(0, meter.cap_micros - key_committed - meter.reserved_micros)
    keys, resume = _page(entries, start, stop, command.limit, _key_loader(state, command, now_ms))
    return RunSpend(
        label=command.label,
        tenant=command.tenant,
        key_count=stop - first,
        cap_micros=cap,
        committed_micros=committed,
        reserved_micros=reserved,
        overrun_micros=overrun,
        remaining_micros=remaining,
        keys=keys,
        next_cursor=_key_cursor(entries, resume),
    )


def _key_loader(
    state: PartitionState, command: ListKeys | QueryRun, now_ms: int
) -> Callable[[tuple[str, str]], KeyState | None]:
    def load(entry: tuple[str, str]) -> KeyState:
        # The one definition of a key's state is QueryKey's answer.
        result = state.decide(QueryKey(command.tenant, entry[1]), now_ms).result
        assert isinstance(result, KeyState), result
        return result

    return load


def _label_range(entries: Sequence[tuple[str, str]], label: str) -> tuple[int, int]:
    """Positions of the entries whose label is exactly ``label``. ``(label,)`` sorts before
    every ``(label, key id)``, and ``label + "\\0"`` after ``label`` and before any longer
    label that starts with it."""
    return bisect.bisect_left(entries, (label,)), bisect.bisect_left(entries, (label + "\0",))


def _prefix_range(entries: Sequence[tuple[str, str]], prefix: str) -> tuple[int, int]:
    """Positions of the entries whose label starts with ``prefix`` (contiguous when sorted):
    from ``prefix`` up to the first string after all of them, ``prefix`` with its last
    character incremented (trailing characters that cannot be are dropped first)."""
    start = bisect.bisect_left(entries, (prefix,))
    successor = prefix.rstrip(chr(sys.maxunicode))
    if not successor:
        return start, len(entries)
    successor = successor[:-1] + chr(ord(successor[-1]) + 1)
    return start, bisect.bisect_left(entries, (successor,), start)


def _after_key_cursor(
    entries: Sequence[tuple[str, str]], start: int, stop: int, cursor: str | None
) -> int | Failed:
    if cursor is None:
        return start
    parts = _decode_cursor(cursor, _KEYS_CURSOR, 2)
    if parts is None:
        return _cursor_failure()
    return max(start, min(stop, bisect.bisect_right(entries, (parts[0], parts[1]))))


def _key_cursor(entries: Sequence[tuple[str, str]], resume: int | None) -> str | None:
    if resume is None:
        return None
    label, key_id = entries[resume - 1]
    return _encode_cursor(_KEYS_CURSOR, label, key_id)


# ---------------------------------------------------------------------------- budgets


def _list_budgets(state: PartitionState, command: ListBudgets, now_ms: int) -> BudgetPage | Failed:
    if command.scope and command.scope not in BUDGET_SCOPES:
        return Failed("invalid_scope", f"scope must be one of {', '.join(BUDGET_SCOPES)}")
    entries = indexes(state).budgets.get(command.tenant, [])
    start = 0
    if command.cursor is not None:
        parts = _decode_cursor(command.cursor, _BUDGETS_CURSOR, 1)
        if parts is None:
            return _cursor_failure()
        start = bisect.bisect_right(entries, parts[0])

    def load(budget_id: str) -> BudgetState | None:
        budget = state.budgets[(command.tenant, budget_id)]
        if (budget.closed and not command.include_closed) or (
            command.scope and budget.scope != command.scope
        ):
            return None
        result = state.decide(QueryBudget(command.tenant, budget_id), now_ms).result
        assert isinstance(result, BudgetState), result
        return result

    budgets, resume = _page(entries, start, len(entries), command.limit, load)
    cursor = None if resume is None else _encode_cursor(_BUDGETS_CURSOR, entries[resume - 1])
    return BudgetPage(budgets, cursor)


# ------------------------------------------------------------------------------ pages


def _page(
    entries: Sequence[_Entry],
    start: int,
    stop: int,
    limit: int,
    load: Callable[[_Entry], _Item | None],
) -> tuple[list[_Item], int | None]:
    """Items of ``entries[start:stop]`` (``load`` gives None for one filtered out), bounded
    in count, bytes and entries looked at; and where the next page resumes, or None."""
    items: list[_Item] = []
    page_bytes = 0
    index = start
    while index < stop and len(items) < limit and index - start < SCAN_ENTRIES_MAX:
        item = load(entries[index])
        if item is not None:
            item_bytes = len(_encoder.encode(item))
            if items and page_bytes + item_bytes > QUERY_PAGE_BYTES_MAX:
                break
            items.append(item)
            page_bytes += item_bytes
        index += 1
    return items, (index if index < stop else None)


def _page_problem(limit: int, cursor: str | None) -> Failed | None:
    if not 0 < limit <= QUERY_PAGE_ITEMS_MAX:
        return Failed("invalid_limit", f"limit must be 1 to {QUERY_PAGE_ITEMS_MAX}")
    if cursor is not None and len(cursor) > QUERY_CURSOR_CHARS_MAX:
        return _cursor_failure()
    return None


def _encode_cursor(kind: str, *parts: str) -> str:
    raw = _encoder.encode([kind, *parts])
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_cursor(cursor: str, kind: str, parts_count: int) -> list[str] | None:
    """The parts of a cursor of ``kind``; None when it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        parts = _cursor_decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        return None
    if len(parts) != parts_count + 1 or parts[0] != kind:
        return None
    return parts[1:]


def _cursor_failure() -> Failed:
    return Failed("invalid_cursor", "cursor is not a next_cursor of this listing")


def _label_failure(name: str) -> Failed:
    return Failed("invalid_label", f"{name} must be 1 to {LABEL_CHARS_MAX} characters")
