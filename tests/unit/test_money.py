import pytest
from hypothesis import given
from hypothesis import strategies as st

from openledger.money import MoneyError, to_base_units, to_decimal_string


def test_smallest_price_is_exact() -> None:
    assert to_base_units("0.000001", 18) == 10**12
    assert to_base_units("1", 18) == 10**18
    assert to_base_units("0.000000000000000001", 18) == 1


@pytest.mark.parametrize("bad", ["", "1.", ".5", "-1", "1e18", "0x10", "1.0000000000000000001", " 1", "NaN"])
def test_malformed_amount_names_the_field(bad: str) -> None:
    with pytest.raises(MoneyError, match=r"spec\.budget\.amount"):
        to_base_units(bad, 18, field="spec.budget.amount")


def test_more_places_than_the_token_has_is_rejected() -> None:
    with pytest.raises(MoneyError, match="more than 6 decimal places"):
        to_base_units("1.1234567", 6)


@given(st.integers(min_value=0, max_value=10**40), st.integers(min_value=0, max_value=18))
def test_round_trip(base_units: int, decimals: int) -> None:
    assert to_base_units(to_decimal_string(base_units, decimals), decimals) == base_units
