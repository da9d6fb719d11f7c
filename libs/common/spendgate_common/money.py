"""Money is an ``int`` of micro-USD (1 USD = 1_000_000 micros). Never a float.

Decimal input from the HTTP edge (a JSON number such as ``1.00``, a string such as
``"0.18"``) is parsed exactly with :class:`decimal.Decimal`; an amount that is not a whole
number of micros is refused rather than rounded, because a silently rounded cap is a cap
nobody set. Conversion back to a decimal string happens only at the HTTP edge.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from spendgate_common.errors import InvalidAmountError
from spendgate_common.limits import AMOUNT_MICROS_MAX

MICROS_PER_USD = 1_000_000
MICROS_PER_CENT = 10_000
_MICRO = Decimal("0.000001")
# ASCII decimal text: digits, one optional point, an optional exponent; the words for
# infinity and NaN pass here so that they get their own, clearer refusal below.
_DECIMAL_TEXT = re.compile(
    r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:inf|infinity|s?nan))"
)

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
    if isinstance(value, str) and not _DECIMAL_TEXT.fullmatch(value.strip()):
        # Decimal() alone would accept "1_5" and non-ASCII digits.
        raise InvalidAmountError(field, "is not a decimal number")
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
    # Exact at any precision: quantize to one micro and refuse if that changed the value.
    # (amount <= 1e9 here, so the quantized value has at most 16 digits.)
    whole_micros = amount.quantize(_MICRO)
    if whole_micros != amount:
        raise InvalidAmountError(field, "has more than six decimal places (1 micro-USD)")
    result = int(whole_micros.scaleb(6))
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
