"""Money: integers of micros (10^-6 of the major unit), ISO 4217 minor units, and rounding
of a total to the minor unit with the remainder carried forward (spec section 2, Amounts).

Rounding is floor: an owner is never charged a micro more than it owes; what is left below
one minor unit is carried into the next period, so ``minor * unit + carry_out`` always equals
``total + carry_in``: nothing is created or lost.
"""

from dataclasses import dataclass
from typing import Final

MICROS_PER_MAJOR: Final = 1_000_000

# ISO 4217 minor-unit exponents (digits after the decimal point).
MINOR_UNIT_EXPONENT: Final[dict[str, int]] = {
    "JPY": 0,
    "KRW": 0,
    "ISK": 0,
    "CLP": 0,
    "VND": 0,
    "USD": 2,
    "EUR": 2,
    "GBP": 2,
    "CNY": 2,
    "SGD": 2,
    "CHF": 2,
    "CAD": 2,
    "AUD": 2,
    "NZD": 2,
    "HKD": 2,
    "SEK": 2,
    "NOK": 2,
    "DKK": 2,
    "PLN": 2,
    "CZK": 2,
    "INR": 2,
    "BHD": 3,
    "KWD": 3,
    "OMR": 3,
    "JOD": 3,
    "TND": 3,
}


class UnknownCurrency(ValueError):
    pass


def exponent(currency: str) -> int:
    try:
        return MINOR_UNIT_EXPONENT[currency]
    except KeyError:
        raise UnknownCurrency(f"no minor unit known for currency {currency!r}") from None


def minor_unit_micros(currency: str) -> int:
    """How many micros one minor unit is (USD: 10,000; JPY: 1,000,000)."""
    micros: int = 10 ** (6 - exponent(currency))
    return micros


@dataclass(frozen=True, slots=True)
class Rounded:
    minor_units: int  # what is charged or paid, in the currency's minor unit
    carry_micros: int  # left over, 0 <= carry < one minor unit, carried to the next period

    def charged_micros(self, currency: str) -> int:
        return self.minor_units * minor_unit_micros(currency)


def round_to_minor(total_micros: int, carry_in_micros: int, currency: str) -> Rounded:
    """Round ``total + carry_in`` down to whole minor units; return them and the remainder."""
    assert type(total_micros) is int and type(carry_in_micros) is int
    unit = minor_unit_micros(currency)
    due = total_micros + carry_in_micros
    minor, carry = divmod(due, unit)
    assert minor * unit + carry == due and 0 <= carry < unit
    return Rounded(minor, carry)


def format_minor(minor_units: int, currency: str) -> str:
    """A decimal string of the major unit, exact, as rails want it ("12.34", "1200")."""
    exp = exponent(currency)
    sign = "-" if minor_units < 0 else ""
    whole, frac = divmod(abs(minor_units), 10**exp)
    return f"{sign}{whole}" if exp == 0 else f"{sign}{whole}.{frac:0{exp}d}"


def format_micros(micros: int, currency: str) -> str:
    """Exact decimal of a micros amount in the major unit, for display ("0.000125 EUR")."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_MAJOR)
    return f"{sign}{whole}.{frac:06d} {currency}"
