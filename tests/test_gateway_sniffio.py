"""The gateway tells sniffio its thread runs asyncio (anyio under Starlette and FastAPI
would otherwise ask ``asyncio.current_task()`` each time), and only for its lifespan."""

from __future__ import annotations

import pytest
import sniffio

from spendgate_gateway._app import sniffio_knows_asyncio


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
