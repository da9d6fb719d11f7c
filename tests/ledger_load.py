"""A load client for the ledger stress tests, run as its own process.

``python -m tests.ledger_load PLAN OUT`` reads a :class:`LoadPlan` (JSON) from ``PLAN``,
makes ``plan.calls`` reserve calls against the ledger over NATS with ``plan.concurrency``
calls in flight, settles most of what it is granted (commit at or below the reserved
amount, or release; some holds are left open), and appends one JSON line per decided
call or settlement to ``OUT`` (:data:`Record`), flushed as it goes so that the test can
watch the progress and so that nothing a client was told is lost if it dies.

It talks to the ledger exactly as the gateway does: a ``CommandBatch`` of up to
``plan.batch_calls_max`` commands for one partition, requested on
``spendgate.v1.ledger.<partition>.cmd``. Every reserve carries its own idempotency key, so
a retry after an ambiguous failure (a timeout, ``store_unavailable``) yields the original
decision when the first attempt was durable. Retries are bounded per call, in attempts
and in time; a call that runs out of both is recorded as ``gave_up``.

Exit status: 0 when every call was decided or given up and recorded, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from spendgate_common.ledger_v1 import (
    AnyCommand,
    AnyResult,
    CommandBatch,
    Commit,
    Denied,
    Failed,
    Granted,
    Release,
    Reserve,
    Settled,
    decode_result_batch,
    encode_batch,
)
from spendgate_common.subjects import ledger_command_subject

_log = logging.getLogger("ledger_load")

# Failed codes after which the same command is sent again: the partition moved, its
# database is away, or its queue was full. Nothing else is retried.
RETRYABLE_CODES = frozenset({"not_owner", "store_unavailable", "overloaded"})
# Failures after which the command may or may not have taken effect in the ledger.
AMBIGUOUS_CODES = frozenset({"timeout", "store_unavailable", "nats_error"})
# Bounds of the first NATS connection (later reconnects are unbounded in count; the
# per-call retry bounds end the load).
CONNECT_DEADLINE_S = 20.0
RECONNECT_WAIT_S = 0.1
# Backoff between attempts of one call: doubles from the first to the most, with jitter.
BACKOFF_FIRST_S = 0.02
BACKOFF_MOST_S = 0.4


class LoadKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A vault key the client spends from, and how much of the load goes to it."""

    tenant: str
    key_id: str
    secret_sha256: str
    partition: int
    weight: int
    amount_min_micros: int
    amount_max_micros: int


class LoadPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    client_id: str
    nats_url: str
    seed: int
    keys: list[LoadKey]
    # Reserve calls this client makes in total, and how many are in flight at once.
    calls: int
    concurrency: int
    # Most calls (reserves, or settlements) sent together in one message.
    batch_calls_max: int
    # Shares of granted calls that are committed and released, in percent (the rest
    # stays open); of the commits, the share charged exactly the reserved amount.
    commit_percent: int
    release_percent: int
    commit_full_percent: int
    # Share of decided reserves sent a second time (an idempotent retry), in percent.
    duplicate_percent: int
    # Most time between a grant and its settlement (the "vendor call").
    vendor_call_ms_max: int
    request_timeout_ms: int
    attempts_max: int
    call_deadline_ms: int
    # After this long no new call is started and no call is retried any more.
    load_deadline_ms: int


class Failure(msgspec.Struct, frozen=True, array_like=True):
    """A failed attempt: why, and when it was sent (ms since the epoch)."""

    code: str
    sent_at_ms: int


class ReserveRecord(msgspec.Struct, frozen=True, tag="reserve"):
    """What one reserve call came to. ``outcome`` ``refused``: a non-retryable Failed."""

    call_id: str
    key_id: str
    partition: int
    idempotency_key: str
    amount_micros: int
    outcome: Literal["granted", "denied", "refused", "gave_up"]
    reservation_id: str | None
    decision_id: str | None
    replayed: bool
    code: str | None
    attempts: int
    failures: list[Failure]
    decided_at_ms: int
    # The decision's second sending: "matched" (the same decision, replayed), "mismatched:
    # ..." or "unknown" (the second sending was not answered); None when not sent twice.
    duplicate: str | None = None


class SettleRecord(msgspec.Struct, frozen=True, tag="settle"):
    """What one settlement came to. ``already_settled``: an earlier attempt took effect."""

    call_id: str
    key_id: str
    partition: int
    reservation_id: str
    action: Literal["commit", "release"]
    actual_micros: int
    outcome: Literal["settled", "already_settled", "refused", "gave_up"]
    code: str | None
    attempts: int
    failures: list[Failure]
    decided_at_ms: int


class DoneRecord(msgspec.Struct, frozen=True, tag="done"):
    client_id: str
    calls: int


Record = ReserveRecord | SettleRecord | DoneRecord

_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(Record)
_plan_decoder = msgspec.json.Decoder(LoadPlan)


def encode_plan(plan: LoadPlan) -> bytes:
    return msgspec.json.encode(plan)


def read_records(path: Path) -> list[Record]:
    """Every complete line of a client's output (a line still being written is skipped)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    complete, _, _ = data.rpartition(b"\n")
    return [_record_decoder.decode(line) for line in complete.split(b"\n") if line]


def count_decided_reserves(path: Path) -> int:
    """How many reserve calls a client has recorded so far (cheap: counts lines)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    return data.count(b'{"type":"reserve"')


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _TransportError(Exception):
    """A request that got no result batch; ``code`` says why."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(slots=True)
class _Call:
    """One command and the history of its attempts."""

    call_id: str
    command: Reserve | Commit | Release
    attempts: int = 0
    failures: list[Failure] = field(default_factory=list)
    result: AnyResult | None = None


class LoadClient:
    def __init__(self, plan: LoadPlan, out: BinaryIO) -> None:
        self._plan = plan
        self._out = out
        self._rng = random.Random(plan.seed)
        self._weights = [key.weight for key in plan.keys]
        self._next_call = 0
        self._give_up_at = time.monotonic() + plan.load_deadline_ms / 1000
        self._nats: NatsClient | None = None

    async def run(self) -> None:
        self._nats = await self._connect()
        try:
            workers = [self._worker() for _ in range(self._plan.concurrency)]
            await asyncio.gather(*workers)
            self._write(DoneRecord(self._plan.client_id, self._next_call))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nats.close(), 5.0)

    async def _connect(self) -> NatsClient:
        give_up_at = time.monotonic() + CONNECT_DEADLINE_S
        while True:
            try:
                return await nats.connect(
                    self._plan.nats_url,
                    name=f"ledger-load-{self._plan.client_id}",
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=RECONNECT_WAIT_S,
                )
            except (nats.errors.Error, OSError, TimeoutError):
                if time.monotonic() > give_up_at:
                    raise
                await asyncio.sleep(0.1)

    def _write(self, record: Record) -> None:
        self._out.write(_record_encoder.encode(record) + b"\n")

    def _take_calls(self) -> int:
        """Claim up to ``batch_calls_max`` of the remaining calls (0 when all are taken)."""
        count = min(self._rng.randint(1, self._plan.batch_calls_max), self._remaining())
        self._next_call += count
        return count

    def _remaining(self) -> int:
        if time.monotonic() > self._give_up_at:
            return 0
        return self._plan.calls - self._next_call

    async def _worker(self) -> None:
        while (count := self._take_calls()) > 0:
            key = self._rng.choices(self._plan.keys, self._weights)[0]
            first = self._next_call - count
            calls = [self._reserve_call(key, first + index) for index in range(count)]
            await self._send_until_decided(key.partition, calls)
            settlements: list[_Call] = []
            for call in calls:
                duplicate = None
                if call.result is not None and self._chance(self._plan.duplicate_percent):
                    again = _Call(call.call_id, call.command)
                    await self._send_until_decided(key.partition, [again])
                    duplicate = _compare_duplicate(call.result, again.result)
                self._write(_reserve_record(key, call, duplicate))
                if isinstance(call.result, Granted):
                    settle = self._settlement(key, call.call_id, call.result)
                    if settle is not None:
                        settlements.append(settle)
            if settlements:
                pause_ms = self._rng.uniform(0, self._plan.vendor_call_ms_max)
                await asyncio.sleep(pause_ms / 1000)
                await self._send_until_decided(key.partition, settlements)
                for settle in settlements:
                    self._record_settle(key, settle)

    def _chance(self, percent: int) -> bool:
        return self._rng.randrange(100) < percent

    def _reserve_call(self, key: LoadKey, number: int) -> _Call:
        amount = self._rng.randint(key.amount_min_micros, key.amount_max_micros)
        call_id = f"{self._plan.client_id}-{number}"
        return _Call(
            call_id,
            Reserve(
                tenant=key.tenant,
                key_id=key.key_id,
                secret_sha256=key.secret_sha256,
                amount_micros=amount,
                vendor="openai",
                operation="POST /v1/chat/completions",
                idempotency_key=call_id,
            ),
        )

    def _settlement(self, key: LoadKey, call_id: str, grant: Granted) -> _Call | None:
        roll = self._rng.randrange(100)
        if roll < self._plan.commit_percent:
            full = self._chance(self._plan.commit_full_percent)
            actual = grant.amount_micros if full else self._rng.randint(0, grant.amount_micros)
            return _Call(
                call_id,
                Commit(
                    tenant=key.tenant,
                    key_id=key.key_id,
                    secret_sha256=key.secret_sha256,
                    reservation_id=grant.reservation_id,
                    actual_micros=actual,
                ),
            )
        if roll < self._plan.commit_percent + self._plan.release_percent:
            return _Call(
                call_id,
                Release(
                    tenant=key.tenant,
                    key_id=key.key_id,
                    secret_sha256=key.secret_sha256,
                    reservation_id=grant.reservation_id,
                    reason="vendor returned 400",
                ),
            )
        return None

    # ------------------------------------------------------------------ requests

    async def _request(self, partition: int, commands: Sequence[AnyCommand]) -> list[AnyResult]:
        assert self._nats is not None
        data = encode_batch(CommandBatch(partition=partition, commands=list(commands)))
        try:
            reply = await self._nats.request(
                ledger_command_subject(partition),
                data,
                timeout=self._plan.request_timeout_ms / 1000,
            )
        except nats.errors.NoRespondersError:
            raise _TransportError("no_responders") from None
        except (nats.errors.TimeoutError, TimeoutError):
            raise _TransportError("timeout") from None
        except (nats.errors.Error, OSError) as error:
            _log.warning("request failed: %r", error)
            raise _TransportError("nats_error") from None
        results = decode_result_batch(reply.data).results
        if len(results) != len(commands):
            raise _TransportError("wrong_result_count")
        return results

    async def _send_until_decided(self, partition: int, calls: Sequence[_Call]) -> None:
        """Send the calls (one message) until each has a non-retryable result, within bounds.

        A call left without a result ran out of attempts or time.
        """
        plan = self._plan
        give_up_at = min(time.monotonic() + plan.call_deadline_ms / 1000, self._give_up_at)
        backoff_s = BACKOFF_FIRST_S
        pending = list(calls)
        while pending and pending[0].attempts < plan.attempts_max:
            for call in pending:
                call.attempts += 1
            sent_at_ms = now_ms()
            try:
                results = await self._request(partition, [call.command for call in pending])
            except _TransportError as error:
                for call in pending:
                    call.failures.append(Failure(error.code, sent_at_ms))
            else:
                for call, result in zip(pending, results, strict=True):
                    if isinstance(result, Failed) and result.code in RETRYABLE_CODES:
                        call.failures.append(Failure(result.code, sent_at_ms))
                    else:
                        call.result = result
                pending = [call for call in pending if call.result is None]
            if not pending or time.monotonic() + backoff_s > give_up_at:
                return
            await asyncio.sleep(backoff_s * self._rng.uniform(0.5, 1.5))
            backoff_s = min(backoff_s * 2, BACKOFF_MOST_S)

    def _record_settle(self, key: LoadKey, call: _Call) -> None:
        command = call.command
        assert isinstance(command, Commit | Release)
        result = call.result
        outcome: Literal["settled", "already_settled", "refused", "gave_up"]
        code = None
        if result is None:
            outcome = "gave_up"
        elif isinstance(result, Settled):
            outcome = "settled"
        elif isinstance(result, Failed) and result.code == "already_settled":
            outcome, code = "already_settled", result.code
        else:
            outcome = "refused"
            code = result.code if isinstance(result, Failed) else type(result).__name__
        self._write(
            SettleRecord(
                call_id=call.call_id,
                key_id=key.key_id,
                partition=key.partition,
                reservation_id=command.reservation_id,
                action="commit" if isinstance(command, Commit) else "release",
                actual_micros=command.actual_micros if isinstance(command, Commit) else 0,
                outcome=outcome,
                code=code,
                attempts=call.attempts,
                failures=call.failures,
                decided_at_ms=now_ms(),
            )
        )


def _reserve_record(key: LoadKey, call: _Call, duplicate: str | None) -> ReserveRecord:
    command = call.command
    assert isinstance(command, Reserve)
    assert command.idempotency_key is not None
    result = call.result
    outcome: Literal["granted", "denied", "refused", "gave_up"]
    code = None
    match result:
        case None:
            outcome = "gave_up"
        case Granted():
            outcome = "granted"
        case Denied():
            outcome = "denied"
        case Failed():
            outcome, code = "refused", result.code
        case _:
            outcome, code = "refused", type(result).__name__
    return ReserveRecord(
        call_id=call.call_id,
        key_id=key.key_id,
        partition=key.partition,
        idempotency_key=command.idempotency_key,
        amount_micros=command.amount_micros,
        outcome=outcome,
        reservation_id=result.reservation_id if isinstance(result, Granted) else None,
        decision_id=result.decision_id if isinstance(result, Denied) else None,
        replayed=result.replayed if isinstance(result, Granted | Denied) else False,
        code=code,
        attempts=call.attempts,
        failures=call.failures,
        decided_at_ms=now_ms(),
        duplicate=duplicate,
    )


def _compare_duplicate(first: AnyResult | None, again: AnyResult | None) -> str:
    if again is None:
        return "unknown"
    match first, again:
        case Granted(), Granted() if (
            again.replayed
            and again.reservation_id == first.reservation_id
            and again.amount_micros == first.amount_micros
        ):
            return "matched"
        case Denied(), Denied() if again.replayed and again.decision_id == first.decision_id:
            return "matched"
    return f"mismatched: first {first!r}, again {again!r}"


async def _main(plan_path: Path, out_path: Path) -> None:
    plan = _plan_decoder.decode(plan_path.read_bytes())
    with out_path.open("ab", buffering=0) as out:
        await LoadClient(plan, out).run()


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if len(argv) != 2:
        print("usage: python -m tests.ledger_load PLAN OUT", file=sys.stderr)
        return 2
    asyncio.run(_main(Path(argv[0]), Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
