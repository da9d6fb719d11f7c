"""The gateway's side of the ledger protocol: one command in, one result out, coalesced.

Calls for the same partition share NATS requests: up to ``inflight_max`` requests are in
flight per partition, and commands that arrive meanwhile wait and leave together in the
next request (up to COMMANDS_PER_REQUEST_MAX), as a database client batches. At low load
every call leaves at once; at high load per-message overhead is paid per batch.

Settles of proxied calls may *linger* (``execute(..., linger=True)``): nobody waits for
them, so instead of a request of their own they ride along with the next command for the
same partition, or leave after ``linger`` at the latest. On a busy budget (a fleet in one
tenant shares a partition) that halves the NATS requests and the ledger's transactions.

Retries: a request nobody answered (no responders: the partition is between owners) or
that the ledger refused without applying it (``not_owner``, ``overloaded``) is retried
until the deadline. A timeout is not retried (the command may have been applied); it
becomes :class:`LedgerUnavailableError`, and the gateway fails closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

import msgspec
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from spendgate_common.errors import LedgerUnavailableError
from spendgate_common.ledger_v1 import (
    AnyCommand,
    AnyResult,
    CommandBatch,
    Failed,
    decode_result_batch,
    encode_batch,
)
from spendgate_common.limits import COMMANDS_PER_REQUEST_MAX
from spendgate_common.partitioning import partition_for_tenant
from spendgate_common.subjects import (
    HEADER_TRACEPARENT,
    HEADER_TRACEPARENTS,
    ledger_command_subject,
)

# Failures the ledger answers without applying the command: safe to send again.
RETRYABLE_CODES = frozenset({"not_owner", "overloaded"})
RETRY_PAUSE = timedelta(milliseconds=50)
# Tenants whose partition the client remembers (all are forgotten when it is full).
PARTITIONS_REMEMBERED_MAX = 65_536

# A command, its caller's future, and the ``traceparent`` of its client span ("" untraced).
_Waiter = tuple[AnyCommand, "asyncio.Future[AnyResult]", str]


class CommandObserver(Protocol):
    """Telemetry around each command (spendgate_gateway._telemetry.LedgerObserver): calls
    ``send(command, traceparent)`` and returns its result. ``traces``: it makes spans, so
    requests may carry trace context."""

    traces: bool

    async def execute(
        self, command: AnyCommand, send: Callable[[AnyCommand, str], Awaitable[AnyResult]]
    ) -> AnyResult: ...


@dataclass(slots=True)
class _Channel:
    partition: int
    pending: list[_Waiter] = field(default_factory=list)
    inflight: int = 0
    # Commands waiting to ride along with the next one, and the timer that sends them.
    lingering: list[_Waiter] = field(default_factory=list)
    linger_timer: asyncio.TimerHandle | None = None


class LedgerClient:
    def __init__(
        self,
        nats: NatsClient,
        *,
        partition_count: int,
        timeout: timedelta,
        inflight_max: int,
        linger: timedelta = timedelta(0),
        observer: CommandObserver | None = None,
    ) -> None:
        self._nats = nats
        self._observer = observer
        self._traces = observer is not None and observer.traces
        self._partition_count = partition_count
        self._timeout_s = timeout.total_seconds()
        self._inflight_max = inflight_max
        self._linger_s = linger.total_seconds()
        self._channels = [_Channel(partition) for partition in range(partition_count)]
        # tenant -> partition (a SHA-256 per command otherwise).
        self._partitions: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def partition_of(self, tenant: str) -> int:
        partition = self._partitions.get(tenant)
        if partition is None:
            if len(self._partitions) >= PARTITIONS_REMEMBERED_MAX:
                self._partitions.clear()
            partition = self._partitions[tenant] = partition_for_tenant(
                tenant, self._partition_count
            )
        return partition

    async def execute(self, command: AnyCommand, *, linger: bool = False) -> AnyResult:
        """Send one command to its partition and return its result.

        ``linger``: the command may wait (up to the client's ``linger``) for another one
        to the same partition and leave with it; for commands nobody is waiting on.

        Raises :class:`LedgerUnavailableError` when no ledger answers within the deadline
        or NATS is down. Retryable refusals are retried inside the deadline.
        """
        if self._observer is not None:
            return await self._observer.execute(
                command, lambda command, traceparent: self._execute(command, traceparent, linger)
            )
        return await self._execute(command, "", linger)

    async def _execute(self, command: AnyCommand, traceparent: str, linger: bool) -> AnyResult:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._timeout_s
        while True:
            result = await self._submit(loop, command, traceparent, linger)
            if not (isinstance(result, Failed) and result.code in RETRYABLE_CODES):
                return result
            if loop.time() + RETRY_PAUSE.total_seconds() >= give_up_at:
                raise LedgerUnavailableError(f"ledger answered {result.code} until the deadline")
            await asyncio.sleep(RETRY_PAUSE.total_seconds())

    def _submit(
        self, loop: asyncio.AbstractEventLoop, command: AnyCommand, traceparent: str, linger: bool
    ) -> asyncio.Future[AnyResult]:
        """Queue ``command`` on its partition's channel; the future of its result. (A plain
        function returning the future, not a coroutine: one frame less per command, which
        a hot budget's load generator and gateway pay tens of thousands of times a second.)"""
        channel = self._channels[self.partition_of(command.tenant)]
        future: asyncio.Future[AnyResult] = loop.create_future()
        if linger and self._linger_s > 0:
            channel.lingering.append((command, future, traceparent))
            if channel.linger_timer is None:
                channel.linger_timer = loop.call_later(
                    self._linger_s, self._send_lingering, channel
                )
            return future
        # Lingering commands go first: a settle frees budget before the next reserve.
        self._take_lingering(channel)
        channel.pending.append((command, future, traceparent))
        self._start_sender(channel)
        return future

    def _send_lingering(self, channel: _Channel) -> None:
        self._take_lingering(channel)
        self._start_sender(channel)

    @staticmethod
    def _take_lingering(channel: _Channel) -> None:
        if channel.linger_timer is not None:
            channel.linger_timer.cancel()
            channel.linger_timer = None
        if channel.lingering:
            channel.pending.extend(channel.lingering)
            channel.lingering.clear()

    def _start_sender(self, channel: _Channel) -> None:
        if channel.pending and channel.inflight < self._inflight_max:
            channel.inflight += 1
            task = asyncio.create_task(self._send_while_pending(channel))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_while_pending(self, channel: _Channel) -> None:
        try:
            while channel.pending:
                waiters = channel.pending[:COMMANDS_PER_REQUEST_MAX]
                del channel.pending[:COMMANDS_PER_REQUEST_MAX]
                await self._send(channel.partition, waiters)
        finally:
            channel.inflight -= 1

    async def _send(self, partition: int, waiters: list[_Waiter]) -> None:
        payload = encode_batch(CommandBatch(partition, [command for command, _, _ in waiters]))
        headers = _trace_headers(waiters) if self._traces else None
        subject = ledger_command_subject(partition)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._timeout_s
        try:
            while True:
                remaining_s = give_up_at - loop.time()
                if remaining_s <= 0:
                    raise LedgerUnavailableError("no ledger answered before the deadline")
                try:
                    reply = await self._nats.request(
                        subject, payload, timeout=remaining_s, headers=headers
                    )
                    break
                except NoRespondersError:
                    # Nobody owns the partition right now (takeover): nothing was applied.
                    await asyncio.sleep(min(RETRY_PAUSE.total_seconds(), remaining_s))
            results = decode_result_batch(reply.data).results
            if len(results) != len(waiters):
                raise LedgerUnavailableError("ledger reply does not match the request")
        except (NatsTimeoutError, TimeoutError) as error:
            self._fail(waiters, LedgerUnavailableError(f"ledger request timed out: {error}"))
            return
        except (NatsError, OSError, msgspec.DecodeError, msgspec.ValidationError) as error:
            self._fail(waiters, LedgerUnavailableError(f"ledger request failed: {error}"))
            return
        except LedgerUnavailableError as error:
            self._fail(waiters, error)
            return
        for (_, future, _), result in zip(waiters, results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _fail(waiters: list[_Waiter], error: Exception) -> None:
        for _, future, _ in waiters:
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        for channel in self._channels:
            # Normally none: shutdown waits for the settles, which the timer sends.
            if channel.linger_timer is not None:
                channel.linger_timer.cancel()
                channel.linger_timer = None
            self._fail(channel.lingering, LedgerUnavailableError("the gateway is shutting down"))
            channel.lingering.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _trace_headers(waiters: list[_Waiter]) -> dict[str, str] | None:
    """Trace context of a request: ``traceparent`` of its first traced command, and with
    several commands one traceparent per command in order (the payload stays as it is)."""
    traceparents = [traceparent for _, _, traceparent in waiters]
    first = next((traceparent for traceparent in traceparents if traceparent), None)
    if first is None:
        return None
    if len(traceparents) == 1:
        return {HEADER_TRACEPARENT: first}
    return {HEADER_TRACEPARENT: first, HEADER_TRACEPARENTS: ",".join(traceparents)}
