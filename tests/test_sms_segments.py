"""SMS segment counting (pure): GSM-7 vs UCS-2, extension characters, pairs never split."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate_gateway.vendors._sms import Encoding, encoding_of, segment_count, units_of

GSM7_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = "\f^{}\\[~]|€"
EMOJI = "\U0001f600"  # outside the Basic Multilingual Plane: two UTF-16 units


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("", 1),
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("é" * 161, 2),  # é is in GSM-7's basic table
        ("€" * 80, 1),  # 160 septets
        ("€" * 81, 2),  # 162 septets: 76 euros (152 septets) fit the first segment
        ("€" * 153, 3),  # 306 septets, but 76 + 76 + 1: pairs are never split
        ("a" * 152 + "€" + "a" * 8, 2),  # the euro moves to segment 2 whole
        ("ж" * 70, 1),
        ("ж" * 71, 2),
        ("ж" * 134, 2),
        ("ж" * 135, 3),
        ("a" * 159 + "ж", 3),  # one Cyrillic letter makes all 160 characters UCS-2
        (EMOJI * 35, 1),  # 70 units
        (EMOJI * 36, 2),  # 72 units: 33 emoji (66 units) per segment
        (EMOJI * 67, 3),  # 134 units, but 33 + 33 + 1
    ],
)
def test_known_segment_counts(text: str, segments: int) -> None:
    assert segment_count(text) == segments


def test_encodings() -> None:
    assert encoding_of(GSM7_BASIC + GSM7_EXTENSION) is Encoding.GSM7
    assert encoding_of("ê") is Encoding.UCS2  # not in GSM-7 (only é, è are)
    assert encoding_of("`") is Encoding.UCS2  # the backtick is not GSM-7 either
    assert units_of("a€", Encoding.GSM7) == [1, 2]
    assert units_of("a" + EMOJI, Encoding.UCS2) == [1, 2]


gsm7_basic_text = st.text(alphabet=GSM7_BASIC, max_size=1_000)
gsm7_text = st.text(alphabet=GSM7_BASIC + GSM7_EXTENSION, max_size=1_000)
# No lone surrogates (UTF-8 cannot encode them): every character here is one UTF-16 unit.
bmp_text = st.text(alphabet=st.characters(max_codepoint=0xFFFF, codec="utf-8"), max_size=600)
any_text = st.text(max_size=800)


@given(gsm7_basic_text)
def test_gsm7_single_septets_follow_the_closed_form(text: str) -> None:
    expected = 1 if len(text) <= 160 else math.ceil(len(text) / 153)
    assert segment_count(text) == expected


@given(bmp_text.filter(lambda text: encoding_of(text) is Encoding.UCS2))
def test_ucs2_without_pairs_follows_the_closed_form(text: str) -> None:
    expected = 1 if len(text) <= 70 else math.ceil(len(text) / 67)
    assert segment_count(text) == expected


@given(any_text)
def test_two_unit_characters_cost_at_most_one_unit_per_segment(text: str) -> None:
    encoding = encoding_of(text)
    total = sum(units_of(text, encoding))
    single, per_segment = (160, 153) if encoding is Encoding.GSM7 else (70, 67)
    count = segment_count(text)
    assert count >= 1
    if total <= single:
        assert count == 1
    else:
        # Never fewer than the units need; an unsplit pair wastes at most one unit.
        assert math.ceil(total / per_segment) <= count <= math.ceil(total / (per_segment - 1))


@given(gsm7_text, gsm7_text)
def test_appending_never_lowers_the_count(head: str, tail: str) -> None:
    assert segment_count(head + tail) >= segment_count(head)
