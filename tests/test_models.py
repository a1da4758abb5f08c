"""Money as integer micro-units, and back as a plain decimal string."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from campaign_cli.models import from_micros, to_micros


def test_amounts_print_without_exponents_or_trailing_zeros() -> None:
    assert [str(from_micros(m)) for m in (7_900_000_000, 389_700, 0, 5_000_000, 1, 10_500_000)] \
        == ["7900", "0.3897", "0", "5", "0.000001", "10.5"]


@given(st.integers(min_value=0, max_value=10**15))
def test_micros_round_trip(micros: int) -> None:
    text = str(from_micros(micros))
    assert "E" not in text
    assert to_micros(Decimal(text)) == micros
