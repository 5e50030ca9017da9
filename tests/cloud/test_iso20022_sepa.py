"""SEPA field rules (cloud/sepa.py): the checks the ISO 20022 schemas do not make."""

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud import sepa
from cloud.sepa import SepaError

# Published example IBANs (ISO 13616 / national standards' examples), all valid.
VALID_IBANS = (
    "DE89370400440532013000",
    "GB29NWBK60161331926819",
    "FR1420041010050500013M02606",
    "NL91ABNA0417164300",
    "BE68539007547034",
    "AT611904300234573201",
    "CH9300762011623852957",
    "ES9121000418450200051332",
    "IT60X0542811101000000123456",
    "NO9386011117947",
    "MT84MALT011000012345MTLCAST001S",
)


@pytest.mark.parametrize("iban", VALID_IBANS)
def test_valid_ibans_pass(iban: str) -> None:
    assert sepa.check_iban(iban) == iban


@pytest.mark.parametrize(
    ("iban", "problem"),
    [
        ("DE89370400440532013001", "checksum"),  # last digit changed
        ("DE98370400440532013000", "checksum"),  # check digits swapped
        ("DE8937040044053201300", "22 characters"),  # one short
        ("BR1800360305000010009795493C1", "not in the SEPA scope"),  # valid IBAN, not SEPA
        ("de89370400440532013000", "electronic format"),
        ("DE89 3704 0044 0532 0130 00", "electronic format"),
        ("", "electronic format"),
    ],
)
def test_bad_ibans_are_refused_naming_the_field(iban: str, problem: str) -> None:
    with pytest.raises(SepaError) as err:
        sepa.check_iban(iban, field="debtor.iban")
    assert err.value.field == "debtor.iban"
    assert problem in str(err.value)


def _with_check_digits(country: str, bban: str) -> str:
    """Compute an IBAN's check digits the ISO 13616 way (independently of sepa._mod97)."""
    digits = "".join(
        str(string.digits.index(c)) if c.isdigit() else str(ord(c) - 55)
        for c in bban + country + "00"
    )
    return f"{country}{98 - int(digits) % 97:02d}{bban}"  # fmt: skip


@settings(deadline=None)  # no timing assertions: the CI machine is shared
@given(
    bban=st.text(alphabet=string.digits, min_size=18, max_size=18),  # a German BBAN: digits
    position=st.integers(min_value=2, max_value=21),
    replacement=st.sampled_from(string.digits),
)
def test_every_single_digit_substitution_breaks_the_checksum(
    bban: str, position: int, replacement: str
) -> None:
    """ISO 7064 MOD 97-10 catches every single substitution in a digit string."""
    iban = _with_check_digits("DE", bban)
    assert sepa.check_iban(iban) == iban
    broken = iban[:position] + replacement + iban[position + 1 :]
    if broken != iban:
        with pytest.raises(SepaError, match="checksum"):
            sepa.check_iban(broken)


@pytest.mark.parametrize("bic", ["COBADEFFXXX", "COBADEFF", "NWBKGB2L", "DEUTDEDB500"])
def test_valid_bics_pass(bic: str) -> None:
    assert sepa.check_bic(bic) == bic


@pytest.mark.parametrize("bic", ["cobadeffxxx", "COBADEF", "COBADEFFX", "COBADEFFXXXX", "COBA1EFF"])
def test_bad_bics_are_refused(bic: str) -> None:
    with pytest.raises(SepaError, match=r"creditor\.bic"):
        sepa.check_bic(bic, field="creditor.bic")


def test_creditor_identifier_checksum_skips_the_business_code() -> None:
    assert sepa.check_creditor_id("DE98ZZZ09999999999") == "DE98ZZZ09999999999"
    assert sepa.check_creditor_id("DE98ABC09999999999") == "DE98ABC09999999999"
    with pytest.raises(SepaError, match="checksum"):
        sepa.check_creditor_id("DE98ZZZ09999999998")
    with pytest.raises(SepaError, match="creditor identifier"):
        sepa.check_creditor_id("DE98ZZ")


@pytest.mark.parametrize(
    ("minor", "text"), [(1, "0.01"), (1234, "12.34"), (99_999_999_999, "999999999.99")]
)
def test_amounts_in_range_format_with_two_decimals(minor: int, text: str) -> None:
    assert sepa.check_amount(minor, "EUR") == text
    assert sepa.check_amount_text(text, "EUR") == minor


@pytest.mark.parametrize(
    ("minor", "currency", "problem"),
    [
        (0, "EUR", "outside"),
        (100_000_000_000, "EUR", "outside"),
        (100, "USD", "EUR only"),
    ],
)
def test_amounts_the_rails_refuse(minor: int, currency: str, problem: str) -> None:
    with pytest.raises(SepaError, match=problem):
        sepa.check_amount(minor, currency)


@pytest.mark.parametrize(
    "text", ["12.345", "12.3", "12", "012.34", "0.00", "1000000000.00", "-1.00", "1e2", " 1.00"]
)
def test_amount_texts_the_rails_refuse(text: str) -> None:
    with pytest.raises(SepaError):
        sepa.check_amount_text(text, "EUR")


@settings(deadline=None)  # no timing assertions: the CI machine is shared
@given(st.integers(min_value=1, max_value=sepa.SEPA_AMOUNT_MINOR_MAX))
def test_amount_text_round_trips(minor: int) -> None:
    assert sepa.check_amount_text(sepa.check_amount(minor, "EUR"), "EUR") == minor


def test_text_and_identifier_rules() -> None:
    assert sepa.check_sepa_text("Shop (Nord) 1/2, A.B. + C'd?", max_len=70) != ""
    for bad in ("Zoë", "a&b", "a_b", "a@b", "a;b", ""):
        with pytest.raises(SepaError):
            sepa.check_sepa_text(bad, max_len=70)
    with pytest.raises(SepaError, match="length 71"):
        sepa.check_sepa_text("a" * 71, max_len=70)
    assert sepa.check_sepa_id("A" * 35) == "A" * 35
    for bad in ("A" * 36, "a b", "/ab", "ab/", "a//b", "id_1", "ïd"):
        with pytest.raises(SepaError):
            sepa.check_sepa_id(bad, field="EndToEndId")


def test_dates_must_be_real_iso_dates() -> None:
    assert sepa.check_date("2026-11-27").isoformat() == "2026-11-27"
    for bad in ("2026-02-30", "20261127", "2026-11-27T00:00:00", "27.11.2026"):
        with pytest.raises(SepaError, match="collection_date"):
            sepa.check_date(bad, field="collection_date")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Zoë Straße & Søn", "Zoe Strasse + Son"),
        ("Łódź Œuvre_1 “quoted”", "Lodz OEuvre-1 'quoted'"),
        ("  many    spaces\tand\nlines ", "many spaces and lines"),
        ("東京電力", "owner-7"),  # nothing Latin left: the fallback
        ("Ελληνικά", "owner-7"),
    ],
)
def test_transliteration_of_names(name: str, expected: str) -> None:
    assert sepa.transliterate(name, max_len=70, fallback="owner-7") == expected


@settings(deadline=None)  # no timing assertions: the CI machine is shared
@given(st.text(max_size=200))
def test_transliteration_always_yields_rails_text(name: str) -> None:
    out = sepa.transliterate(name, max_len=sepa.SEPA_NAME_CHARS_MAX, fallback="fallback")
    assert sepa.check_sepa_text(out, max_len=sepa.SEPA_NAME_CHARS_MAX) == out
    assert out == out.strip() and "  " not in out
