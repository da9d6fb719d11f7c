"""The asyncpg adapter: connecting with bounded retries and translating its errors.

This is the one place where asyncpg's exceptions become ours
(:class:`~spendgate_common.errors.StoreUnavailableError`). Constraint violations are not
translated: they mean a broken invariant (a duplicate ``(partition, seq)``) and must crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg

from spendgate_common.errors import StoreUnavailableError

_log = logging.getLogger(__name__)

# One connection attempt's timeout while create_pool retries within its deadline.
CONNECT_ATTEMPT_TIMEOUT_S = 5.0

# Errors that mean "Postgres is not reachable or not serving right now".
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.QueryCanceledError,
    asyncpg.TooManyConnectionsError,
    # Raised when the server ends a connection in the middle of an operation
    # (MagicStack/asyncpg#784): the same "not reachable right now" for us.
    asyncpg.InternalClientError,
)


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Pool release hook: nothing to reset. We never set session state (no LISTEN, no
    advisory session locks, no SET), and asyncpg's default reset costs four statements
    per release on the append hot path."""


@contextlib.asynccontextmanager
async def translate_errors(action: str) -> AsyncIterator[None]:
    """Run a block, turning "Postgres is unavailable" errors into StoreUnavailableError."""
    try:
        yield
    except UNAVAILABLE_ERRORS as error:
        raise StoreUnavailableError(f"{action}: {type(error).__name__}: {error}") from error


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    statement_timeout: timedelta,
    connect_deadline: timedelta,
) -> asyncpg.Pool:
    """A pool, retrying the first connection until ``connect_deadline`` has passed."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + connect_deadline.total_seconds()
    delay_s = 0.1
    while True:
        attempt_timeout_s = max(0.1, min(CONNECT_ATTEMPT_TIMEOUT_S, give_up_at - loop.time()))
        try:
            async with translate_errors("connect"):
                pool = await asyncpg.create_pool(
                    dsn,
                    min_size=min_size,
                    max_size=max_size,
                    command_timeout=statement_timeout.total_seconds(),
                    timeout=attempt_timeout_s,
                    reset=_keep_session,
                    # No idle timer: asyncpg arms one (call_later) on every release and
                    # cancels it on the next acquire, a cost per append on the ledger's
                    # hot path; the pools are small and their connections long-lived.
                    max_inactive_connection_lifetime=0,
                )
            assert pool is not None
            return pool
        except StoreUnavailableError:
            if loop.time() + delay_s > give_up_at:
                raise
            _log.warning("postgres not reachable yet, retrying in %.1f s", delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)
