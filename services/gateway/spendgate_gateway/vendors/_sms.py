"""How many SMS segments a message body takes (GSM 03.38 GSM-7, else UCS-2), as carriers bill.

A body made only of GSM-7 characters is sent in 7-bit septets: up to 160 in one
segment, else 153 per segment (a concatenated message spends 7 septets on its header).
The ten characters of the GSM-7 extension table (``^ { } \\ [ ~ ] | €`` and form feed)
take two septets (an escape and the character), and the pair is never split across
segments. Any other character sends the whole body as UCS-2 (UTF-16 code units): up
to 70 in one segment, else 67 per segment; a character outside the Basic Multilingual
Plane (most emoji) is two units, never split either.

The count is that of an unmodified body: Twilio's optional "smart encoding" (replacing
look-alike Unicode characters with GSM-7 ones) can only lower it.
"""

from __future__ import annotations

import enum

_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")
# 128 code points less the escape (0x1B), which is not a character of its own.
assert len(_GSM7_BASIC) == 127
assert not _GSM7_BASIC & _GSM7_EXTENSION

GSM7_SINGLE_SEPTETS = 160
GSM7_CONCATENATED_SEPTETS = 153
UCS2_SINGLE_UNITS = 70
UCS2_CONCATENATED_UNITS = 67


class Encoding(enum.Enum):
    GSM7 = "GSM-7"
    UCS2 = "UCS-2"


def encoding_of(text: str) -> Encoding:
    if all(char in _GSM7_BASIC or char in _GSM7_EXTENSION for char in text):
        return Encoding.GSM7
    return Encoding.UCS2


def units_of(text: str, encoding: Encoding) -> list[int]:
    """The size of each character of ``text`` in ``encoding`` (septets or UTF-16 units)."""
    if encoding is Encoding.GSM7:
        return [2 if char in _GSM7_EXTENSION else 1 for char in text]
    return [2 if ord(char) > 0xFFFF else 1 for char in text]


def segment_count(text: str) -> int:
    """Segments the body ``text`` is sent in (at least 1, also for an empty body)."""
    encoding = encoding_of(text)
    units = units_of(text, encoding)
    if encoding is Encoding.GSM7:
        single, per_segment = GSM7_SINGLE_SEPTETS, GSM7_CONCATENATED_SEPTETS
    else:
        single, per_segment = UCS2_SINGLE_UNITS, UCS2_CONCATENATED_UNITS
    if sum(units) <= single:
        return 1
    segments, used = 1, 0
    for size in units:
        # A two-unit character (escape pair, surrogate pair) is never split.
        if used + size > per_segment:
            segments += 1
            used = 0
        used += size
    return segments
