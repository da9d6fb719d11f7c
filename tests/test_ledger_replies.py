"""A reply that would not fit in one NATS message refuses its largest (query) answers."""

from __future__ import annotations

from spendgate_common.ledger_v1 import (
    AnyResult,
    Granted,
    KeyState,
    ResultBatch,
    decode_result_batch,
    encode_batch,
)
from spendgate_ledger._partition import REPLY_TOO_LARGE, fit_results

GRANT = Granted("rsv_0_1", 1_000, 2_000, 0, 1_000, 5_000)


def key_state(budget_count: int) -> KeyState:
    return KeyState(
        key_id="keyoneaaaaaaaaaa",
        tenant="acme",
        label="run",
        cap_micros=1,
        window="total",
        timezone="UTC",
        window_start_at_ms=0,
        committed_micros=0,
        reserved_micros=0,
        expires_at_ms=1,
        budget_ids=[f"budget-{index:05d}" for index in range(budget_count)],
    )


def test_results_that_fit_are_untouched() -> None:
    results: list[AnyResult] = [GRANT, key_state(3)]
    assert fit_results(results, 1_000_000) == results


def test_the_largest_answers_give_way_and_the_grants_stay() -> None:
    results: list[AnyResult] = [GRANT, key_state(2_000), key_state(10), key_state(1_500), GRANT]
    bytes_max = 20_000
    assert len(encode_batch(ResultBatch(results))) > bytes_max
    fitted = fit_results(results, bytes_max)
    assert fitted == [GRANT, REPLY_TOO_LARGE, key_state(10), REPLY_TOO_LARGE, GRANT]
    body = encode_batch(ResultBatch(fitted))
    assert len(body) <= bytes_max
    assert decode_result_batch(body).results == fitted
