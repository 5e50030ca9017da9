"""Money: ISO 4217 minor units and rounding to them with the remainder carried: nothing is
created or lost, period after period."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import money
from tests.protocol.common import PROPERTY

# ISO 4217 minor-unit exponents (the standard's "minor unit" column).
ISO_4217 = {"JPY": 0, "KRW": 0, "USD": 2, "EUR": 2, "GBP": 2, "CNY": 2, "SGD": 2, "BHD": 3}
CURRENCIES = sorted(money.MINOR_UNIT_EXPONENT)


@pytest.mark.parametrize(("currency", "exp"), ISO_4217.items())
def test_exponents(currency: str, exp: int) -> None:
    assert money.exponent(currency) == exp
    assert money.minor_unit_micros(currency) == 10 ** (6 - exp)


def test_examples_of_the_spec() -> None:
    assert money.minor_unit_micros("JPY") == 1_000_000  # 1 JPY = 1,000,000 micros
    assert money.minor_unit_micros("USD") == 10_000  # 0.01 USD = 10,000 micros


def test_unknown_currency() -> None:
    with pytest.raises(money.UnknownCurrency):
        money.exponent("XXX")
    with pytest.raises(ValueError):
        money.round_to_minor(1, 0, "usd")


def test_rounding_is_floor_with_carry() -> None:
    r = money.round_to_minor(1_239_999, 0, "USD")
    assert (r.minor_units, r.carry_micros) == (123, 9_999)
    r2 = money.round_to_minor(1, r.carry_micros, "USD")
    assert (r2.minor_units, r2.carry_micros) == (1, 0)
    assert money.round_to_minor(999_999, 0, "JPY") == money.Rounded(0, 999_999)
    assert money.round_to_minor(125, 0, "BHD") == money.Rounded(0, 125)
    assert r.charged_micros("USD") == 1_230_000


@PROPERTY
@given(
    currency=st.sampled_from(CURRENCIES),
    total=st.integers(0, 2**63),
    carry_frac=st.integers(0, 999_999),
)
def test_nothing_created_or_lost(currency: str, total: int, carry_frac: int) -> None:
    unit = money.minor_unit_micros(currency)
    carry_in = carry_frac % unit
    r = money.round_to_minor(total, carry_in, currency)
    assert r.minor_units * unit + r.carry_micros == total + carry_in
    assert 0 <= r.carry_micros < unit
    assert r.charged_micros(currency) <= total + carry_in  # floor: never charge more


@PROPERTY
@given(
    currency=st.sampled_from(CURRENCIES),
    totals=st.lists(st.integers(0, 10**12), max_size=40),
)
def test_carry_over_many_periods_conserves_every_micro(currency: str, totals: list[int]) -> None:
    carry, charged = 0, 0
    for total in totals:
        r = money.round_to_minor(total, carry, currency)
        charged += r.charged_micros(currency)
        carry = r.carry_micros
    assert charged + carry == sum(totals)
    assert 0 <= carry < money.minor_unit_micros(currency)


@pytest.mark.parametrize(
    ("minor", "currency", "text"),
    [
        (1234, "USD", "12.34"),
        (5, "EUR", "0.05"),
        (-5, "EUR", "-0.05"),
        (1200, "JPY", "1200"),
        (1, "BHD", "0.001"),
        (0, "GBP", "0.00"),
    ],
)
def test_format_minor(minor: int, currency: str, text: str) -> None:
    assert money.format_minor(minor, currency) == text


def test_format_micros() -> None:
    assert money.format_micros(125, "EUR") == "0.000125 EUR"
    assert money.format_micros(-1_500_000, "USD") == "-1.500000 USD"
