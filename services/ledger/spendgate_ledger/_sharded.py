"""A dict split into shards, so that no single insert rebuilds millions of entries.

A partition remembers every settled reservation id for an hour and every idempotency
answer for a day: millions of entries on a busy partition. CPython grows a dict by
rebuilding it whole, and a dict that keeps inserting and deleting (a retention window)
rebuilds itself whole each time its deleted slots run out. With 3 million entries one
rebuild took 650 ms on the 2-core benchmark machine, during which the partition loop
answers nothing. Split over :data:`SHARDS` dicts by the key's hash, a rebuild touches one
shard: a 256th of the entries.

Only membership and lookups use it; the order of entries (for retention and snapshots)
lives in the state's own deques.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import TypeVar, overload

# A power of two: the shard of a key is its hash's low bits.
SHARDS = 256
_MASK = SHARDS - 1

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")
_MISSING = object()


class ShardedDict(MutableMapping[K, V]):
    __slots__ = ("_count", "_shards")

    def __init__(self) -> None:
        self._shards: list[dict[K, V]] = [{} for _ in range(SHARDS)]
        self._count = 0

    def __getitem__(self, key: K) -> V:
        return self._shards[hash(key) & _MASK][key]

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | D, /) -> V | D: ...
    def get(self, key: K, default: object = None, /) -> object:
        return self._shards[hash(key) & _MASK].get(key, default)

    def __setitem__(self, key: K, value: V) -> None:
        shard = self._shards[hash(key) & _MASK]
        size = len(shard)
        shard[key] = value
        self._count += len(shard) - size

    @overload
    def pop(self, key: K, /) -> V: ...
    @overload
    def pop(self, key: K, default: V | D, /) -> V | D: ...
    def pop(self, key: K, default: object = _MISSING, /) -> object:
        shard = self._shards[hash(key) & _MASK]
        if key in shard:
            self._count -= 1
            return shard.pop(key)
        if default is _MISSING:
            raise KeyError(key)
        return default

    def __delitem__(self, key: K) -> None:
        del self._shards[hash(key) & _MASK][key]
        self._count -= 1

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) & _MASK]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[K]:
        for shard in self._shards:
            yield from shard

    def __repr__(self) -> str:
        return f"ShardedDict({dict(self.items())!r})"
