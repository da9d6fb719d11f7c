"""Process-wide settings of the gateway for its lifespan: sniffio told the thread runs
asyncio (anyio under Starlette and FastAPI would otherwise ask ``asyncio.current_task()``
each time), and the objects alive after start-up frozen out of the garbage collector's
full collections."""

from __future__ import annotations

import gc
import weakref

import pytest
import sniffio

from spendgate_gateway._app import _startup_objects_frozen, sniffio_knows_asyncio


def _sniffio_name() -> str | None:
    """The async library sniffio was told runs in this thread (read afresh on every call)."""
    name: str | None = sniffio.thread_local.name
    return name


@pytest.mark.parametrize("previous", [None, "trio"])
def test_sniffio_knows_asyncio_inside_and_restores_the_previous_name(
    previous: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sniffio.thread_local, "name", previous)
    with sniffio_knows_asyncio():
        assert _sniffio_name() == "asyncio"
        assert sniffio.current_async_library() == "asyncio"
    assert _sniffio_name() == previous
    with pytest.raises(ValueError, match="inside"), sniffio_knows_asyncio():
        raise ValueError("inside")
    assert _sniffio_name() == previous
    if previous is None:
        # No loop runs in this (synchronous) test: sniffio must not claim one any more.
        with pytest.raises(sniffio.AsyncLibraryNotFoundError):
            sniffio.current_async_library()


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_start_up_objects_are_frozen_for_the_lifespan_after_a_collection() -> None:
    assert gc.get_freeze_count() == 0
    # Garbage in a cycle from start-up: collected before the freeze, not frozen with it.
    first, second = _Node(), _Node()
    first.other, second.other = second, first
    garbage = weakref.ref(first)
    del first, second
    with _startup_objects_frozen():
        assert garbage() is None
        frozen = gc.get_freeze_count()
        assert frozen > 1_000  # this test process's modules, at least
        # What comes later is collected as usual.
        later = _Node()
        later.other = later
        later_ref = weakref.ref(later)
        del later
        gc.collect()
        assert later_ref() is None
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0
