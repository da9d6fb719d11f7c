"""Money at the HTTP edge: exact decimal parsing into micro-USD and formatting back."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate_common.errors import InvalidAmountError, InvalidRequestError
from spendgate_common.limits import AMOUNT_MICROS_MAX
from spendgate_common.money import MICROS_PER_CENT, MICROS_PER_USD, format_usd, parse_usd


def test_units() -> None:
    assert MICROS_PER_USD == 1_000_000
    assert MICROS_PER_CENT == 10_000
    assert AMOUNT_MICROS_MAX == 10**15


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        (Decimal("0.18"), 180_000),
        (Decimal("1.00"), 1_000_000),
        (5, 5_000_000),
        ("0.18", 180_000),
        ("1.00", 1_000_000),
        ("  2.5 ", 2_500_000),
        ("0.000001", 1),
        (Decimal("0.000001"), 1),
        ("1.000000000", 1_000_000),  # trailing zeros beyond six places are still exact
        ("1E+2", 100_000_000),
        (Decimal("123456789.123456"), 123_456_789_123_456),
        ("1000000000", AMOUNT_MICROS_MAX),
        (1_000_000_000, AMOUNT_MICROS_MAX),
    ],
)
def test_parse_exact(value: object, micros: int) -> None:
    result = parse_usd(value, field="amount")
    assert result == micros
    assert type(result) is int


def test_zero_only_when_allowed() -> None:
    with pytest.raises(InvalidAmountError, match="greater than zero"):
        parse_usd(0, field="amount")
    with pytest.raises(InvalidAmountError, match="greater than zero"):
        parse_usd("0.000000", field="amount")
    assert parse_usd(0, field="amount", allow_zero=True) == 0
    assert parse_usd("0.00", field="amount", allow_zero=True) == 0
    assert parse_usd("-0", field="amount", allow_zero=True) == 0


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (0.18, "must be a number or a decimal string"),
        (1.0, "must be a number or a decimal string"),
        (True, "must be a number or a decimal string"),
        (False, "must be a number or a decimal string"),
        (None, "must be a number or a decimal string"),
        ([1], "must be a number or a decimal string"),
        (b"1.00", "must be a number or a decimal string"),
        ("NaN", "must be finite"),
        ("sNaN", "must be finite"),
        (Decimal("NaN"), "must be finite"),
        ("Infinity", "must be finite"),
        ("-inf", "must be finite"),
        (Decimal("Infinity"), "must be finite"),
        (-1, "must not be negative"),
        ("-0.01", "must not be negative"),
        (Decimal("-5"), "must not be negative"),
        ("0.0000001", "more than six decimal places"),
        ("1.1234567", "more than six decimal places"),
        (Decimal("0.18000001"), "more than six decimal places"),
        ("1E-400", "more than six decimal places"),
        ("1000000000.000001", "must be at most 1000000000.00 USD"),
        (1_000_000_001, "must be at most 1000000000.00 USD"),
        ("1E+400", "must be at most"),
        ("9" * 5000, "must be at most"),
        ("", "is not a decimal number"),
        ("   ", "is not a decimal number"),
        ("abc", "is not a decimal number"),
        ("1.2.3", "is not a decimal number"),
        ("$1.00", "is not a decimal number"),
        ("1,00", "is not a decimal number"),
        ("0x10", "is not a decimal number"),
        ("1.00 USD", "is not a decimal number"),
    ],
)
def test_parse_refusals(value: object, problem: str) -> None:
    with pytest.raises(InvalidAmountError) as caught:
        parse_usd(value, field="cap_usd")
    error = caught.value
    assert isinstance(error, InvalidRequestError)
    assert error.code == "invalid_amount"
    assert error.status == 400
    assert error.field == "cap_usd"
    assert error.message.startswith("cap_usd ")
    assert problem in error.message


def test_absurd_exponents_do_not_hang_or_build_huge_ints() -> None:
    started = time.perf_counter()
    for text in ("1E+400", "1E+999999999", "9.99E+999999999"):
        with pytest.raises(InvalidAmountError, match="at most"):
            parse_usd(text, field="amount")
    for text in ("1E-30", "7E-400"):
        with pytest.raises(InvalidAmountError, match="six decimal places"):
            parse_usd(text, field="amount")
    assert parse_usd("0E+999999999", field="amount", allow_zero=True) == 0
    assert parse_usd("1000E-3", field="amount") == 1_000_000
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    "text",
    [
        "0.1000000000000000000000000000001",  # 100000 micros plus 1e-25 of one
        "999999999.9999999999999999999999",  # rounds up to exactly AMOUNT_MICROS_MAX
        "1E-999999999",  # underflows to 0 when scaled, so it would be accepted as zero
    ],
)
def test_more_than_six_decimals_beyond_context_precision_are_refused(text: str) -> None:
    with pytest.raises(InvalidAmountError, match="six decimal places"):
        parse_usd(text, field="amount", allow_zero=True)


@pytest.mark.parametrize("text", ["1_5", "1_000.00", "\u0661", "\uff11.00"])
def test_only_ascii_decimal_strings_are_accepted(text: str) -> None:
    with pytest.raises(InvalidAmountError, match="is not a decimal number"):
        parse_usd(text, field="amount")


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "0.00"),
        (1, "0.000001"),
        (10_000, "0.01"),
        (180_000, "0.18"),
        (900_000, "0.90"),
        (1_000_000, "1.00"),
        (1_234_500, "1.2345"),
        (5_000_000, "5.00"),
        (AMOUNT_MICROS_MAX, "1000000000.00"),
        (-180_000, "-0.18"),
        (-1, "-0.000001"),
    ],
)
def test_format(micros: int, text: str) -> None:
    assert format_usd(micros) == text


@given(st.integers(min_value=1, max_value=AMOUNT_MICROS_MAX))
def test_format_parse_round_trip(micros: int) -> None:
    text = format_usd(micros)
    assert parse_usd(text, field="amount") == micros
    assert parse_usd(Decimal(text), field="amount") == micros


@given(st.integers(min_value=0, max_value=AMOUNT_MICROS_MAX))
def test_format_is_a_plain_decimal_with_two_to_six_places(micros: int) -> None:
    whole, _, fraction = format_usd(micros).partition(".")
    assert whole.isdigit()
    assert fraction.isdigit()
    assert 2 <= len(fraction) <= 6
    assert Decimal(format_usd(micros)) * MICROS_PER_USD == micros
