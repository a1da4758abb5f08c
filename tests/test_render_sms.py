"""SMS encoding and segment counting: the boundaries of 3GPP TS 23.038 concatenation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign_cli.render.sms import (
    GSM7,
    GSM7_BASIC,
    GSM7_EXTENSION,
    UCS2,
    sms_info,
    split_segments,
)

EMOJI = "\U0001f600"  # a surrogate pair in UTF-16


def septets(text: str) -> int:
    return sum(2 if c in GSM7_EXTENSION else 1 for c in text)


def units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", (GSM7, 1)),
        ("a", (GSM7, 1)),
        ("a" * 160, (GSM7, 1)),
        ("a" * 161, (GSM7, 2)),
        ("a" * 306, (GSM7, 2)),
        ("a" * 307, (GSM7, 3)),
        ("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà", (GSM7, 1)),
        ("é" * 160, (GSM7, 1)),
        ("é" * 161, (GSM7, 2)),
        ("€" * 80, (GSM7, 1)),  # 160 septets
        ("€" * 81, (GSM7, 2)),
        ("a" * 159 + "{", (GSM7, 2)),  # 161 septets
        ("a" * 158 + "}", (GSM7, 1)),
        ("a" * 70 + "`", (UCS2, 2)),  # the backtick is not GSM-7
        ("ā" * 70, (UCS2, 1)),
        ("ā" * 71, (UCS2, 2)),
        ("ā" * 134, (UCS2, 2)),
        ("ā" * 135, (UCS2, 3)),
        (EMOJI * 35, (UCS2, 1)),  # 70 code units
        ("a" * 69 + EMOJI, (UCS2, 2)),  # 71 code units
        ("ç", (UCS2, 1)),  # only capital Ç is in the basic set
        ("\t", (UCS2, 1)),
        ("line one\r\nline two", (GSM7, 1)),
    ],
)
def test_sms_info(text: str, expected: tuple[str, int]) -> None:
    assert sms_info(text) == expected
    assert len(split_segments(text)) == expected[1]
    assert "".join(split_segments(text)) == text


def test_plain_multipart_splits_at_153() -> None:
    parts = split_segments("a" * 307)
    assert [len(p) for p in parts] == [153, 153, 1]


def test_escape_pair_is_never_split() -> None:
    # 152 plain septets then "€" (2 septets) would straddle the 153 boundary: it moves on whole.
    text = "a" * 152 + "€" + "b" * 20
    parts = split_segments(text)
    assert parts == ["a" * 152, "€" + "b" * 20]
    assert sms_info(text) == (GSM7, 2)
    # One earlier it fits exactly.
    text = "a" * 151 + "€" + "b" * 20
    assert split_segments(text) == ["a" * 151 + "€", "b" * 20]


def test_escape_at_boundary_can_add_a_segment() -> None:
    # 2 x 153 = 306 septets would fit two segments, but the escape pairs cannot share a cut.
    text = "a" * 152 + "[" + "b" * 152
    assert septets(text) == 306
    assert sms_info(text) == (GSM7, 3)
    assert [septets(p) for p in split_segments(text)] == [152, 153, 1]


def test_surrogate_pair_is_never_split() -> None:
    text = "ā" * 66 + EMOJI + "ā" * 10
    parts = split_segments(text)
    assert parts == ["ā" * 66, EMOJI + "ā" * 10]
    assert sms_info(text) == (UCS2, 2)
    text = "ā" * 65 + EMOJI + "ā" * 10
    assert split_segments(text) == ["ā" * 65 + EMOJI, "ā" * 10]


def test_emoji_only_message() -> None:
    text = EMOJI * 34  # 68 units: one segment
    assert sms_info(text) == (UCS2, 1)
    text = EMOJI * 36  # 72 units: 67 is odd, so each segment holds 33 pairs (66 units)
    assert [len(p) for p in split_segments(text)] == [33, 3]
    assert sms_info(text) == (UCS2, 2)


_GSM_CHARS = sorted(GSM7_BASIC | GSM7_EXTENSION)
text_strategy = st.one_of(
    st.text(alphabet=st.sampled_from(_GSM_CHARS), max_size=700),
    st.text(alphabet=st.sampled_from(["a", "{", "€", "é"]), max_size=700),
    st.text(alphabet=st.sampled_from(["a", "ā", EMOJI, "€"]), max_size=400),
    st.text(max_size=400),
)


@settings(max_examples=400, deadline=None)
@given(text_strategy)
def test_split_round_trips_and_agrees_with_count(text: str) -> None:
    encoding, segments = sms_info(text)
    parts = split_segments(text)
    assert "".join(parts) == text
    assert len(parts) == segments
    assert all(parts) or text == ""
    if encoding == GSM7:
        assert all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text)
        assert (segments == 1) == (septets(text) <= 160)
        if segments == 1:
            assert septets(text) <= 160
        else:
            assert all(septets(p) <= 153 for p in parts)
            # greedy: each segment but the last is full up to at most one unfittable escape
            assert all(septets(p) >= 152 for p in parts[:-1])
    else:
        assert encoding == UCS2
        assert not all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text)
        assert (segments == 1) == (units(text) <= 70)
        if segments == 1:
            assert units(text) <= 70
        else:
            assert all(units(p) <= 67 for p in parts)
            assert all(units(p) >= 66 for p in parts[:-1])
        for p in parts:
            p.encode("utf-16-le")  # no lone surrogate: each part encodes on its own
