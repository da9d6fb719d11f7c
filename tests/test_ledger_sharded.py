"""The ledger's sharded dict (settled ids, idempotency answers) behaves as a dict."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate_ledger._sharded import SHARDS, ShardedDict

_KEYS = st.one_of(st.text(max_size=6), st.tuples(st.text(max_size=3), st.text(max_size=3)))
_OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["set", "pop", "pop_default", "del", "get"]), _KEYS, st.integers()),
    max_size=200,
)


@given(_OPERATIONS)
def test_every_operation_matches_a_plain_dict(operations: list[tuple[str, object, int]]) -> None:
    sharded: ShardedDict[object, int] = ShardedDict()
    plain: dict[object, int] = {}
    for operation, key, value in operations:
        if operation == "set":
            sharded[key] = value
            plain[key] = value
        elif operation == "pop_default":
            assert sharded.pop(key, -1) == plain.pop(key, -1)
        elif operation in ("pop", "del"):
            if key in plain:
                expected = plain.pop(key)
                if operation == "pop":
                    assert sharded.pop(key) == expected
                else:
                    del sharded[key]
            else:
                with pytest.raises(KeyError):
                    sharded.pop(key) if operation == "pop" else sharded.__delitem__(key)
        else:
            assert sharded.get(key) == plain.get(key)
            assert sharded.get(key, -1) == plain.get(key, -1)
        assert len(sharded) == len(plain)
        assert (key in sharded) == (key in plain)
    assert sharded == plain
    assert dict(sharded.items()) == plain
    assert sorted(map(repr, sharded)) == sorted(map(repr, plain))


def test_entries_spread_over_the_shards() -> None:
    sharded: ShardedDict[str, int] = ShardedDict()
    for index in range(SHARDS * 20):
        sharded[f"res_{index:08d}"] = index
    sizes = [len(shard) for shard in sharded._shards]
    # 20 per shard on average: no shard holds a large share (that would bring back the
    # whole-dict rebuilds the sharding exists to avoid).
    assert max(sizes) < 60, sizes
    assert sharded != {}
    assert ShardedDict() == {}
