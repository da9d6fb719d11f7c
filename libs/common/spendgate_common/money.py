"""Money is an ``int`` of micro-USD (1 USD = 1_000_000 micros). Never a float.

Decimal input from the HTTP edge (a JSON number such as ``1.00``, a string such as
``"0.18"``) is parsed exactly with :class:`decimal.Decimal`; an amount that is not a whole
number of micros is refused rather than rounded, because a silently rounded cap is a cap
nobody set. Conversion back to a decimal string happens only at the HTTP edge.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from spendgate_common.errors import InvalidAmountError
from spendgate_common.limits import AMOUNT_MICROS_MAX

MICROS_PER_USD = 1_000_000
MICROS_PER_CENT = 10_000
_MICRO = Decimal("0.000001")

__all__ = [
    "MICROS_PER_CENT",
    "MICROS_PER_USD",
    "format_usd",
    "parse_usd",
]


def parse_usd(value: object, *, field: str, allow_zero: bool = False) -> int:
    """Parse a USD amount into micro-USD, exactly.

    Accepts ``int``, :class:`~decimal.Decimal` (what our JSON decoder yields for JSON
    numbers with a fraction) and decimal strings. Refuses ``bool``, ``float``, NaN,
    infinities, negative amounts, zero (unless ``allow_zero``), more than six decimal
    places and amounts above :data:`AMOUNT_MICROS_MAX`. Raises :class:`InvalidAmountError`
    naming ``field``.
    """
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise InvalidAmountError(field, "must be a number or a decimal string")
    try:
        amount = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except (InvalidOperation, ValueError):
        raise InvalidAmountError(field, "is not a decimal number") from None
    if not amount.is_finite():
        raise InvalidAmountError(field, "must be finite")
    if amount.is_signed() and amount != 0:
        raise InvalidAmountError(field, "must not be negative")
    # Compare before scaling so that an absurd exponent (1E+400) cannot build a huge int.
    if amount > Decimal(AMOUNT_MICROS_MAX) / MICROS_PER_USD:
        raise InvalidAmountError(field, f"must be at most {format_usd(AMOUNT_MICROS_MAX)} USD")
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise InvalidAmountError(field, "has more than six decimal places (1 micro-USD)")
    result = int(micros)
    if result == 0 and not allow_zero:
        raise InvalidAmountError(field, "must be greater than zero")
    return result


def format_usd(micros: int) -> str:
    """Format micro-USD as a decimal string with at least two decimals (``"0.90"``)."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_USD)
    digits = f"{fraction:06d}".rstrip("0")
    if len(digits) < 2:
        digits = digits.ljust(2, "0")
    return f"{sign}{whole}.{digits}"
