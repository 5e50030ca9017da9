"""SEPA rules the ISO 20022 schemas do not enforce (EPC rulebooks, EUR only).

The pain.008/pain.001 XSDs are looser than the rails: they take ``12.345`` EUR, names of 140
characters, any Unicode, an IBAN with a wrong checksum. A bank rejects such a file (or worse,
one transaction in it) days later, so every value is checked here, before it is written, and
each refusal names the field: ``SepaError("creditor.iban", "checksum ...")``.

Rules (EPC SDD Core / SCT rulebooks and implementation guidelines):

- text: the SEPA Latin set ``a-z A-Z 0-9 / - ? : ( ) . , ' +`` and space;
- identifiers (MsgId, PmtInfId, EndToEndId, MndtId): that set without space, 1..35
  characters, not starting or ending with ``/`` and without ``//``. Identifiers are refused,
  never rewritten: a rewritten id would no longer match the bank's answers.
- names: at most 70 characters (the XSD allows 140); remittance ``Ustrd``: at most 140.
  Names are transliterated (``transliterate``), since a bank-side name is informative.
- amounts: EUR, 0.01 .. 999 999 999.99, exactly two decimals;
- IBAN: country length table, ISO 13616 mod-97; BIC: ISO 9362 (8 or 11 characters);
- creditor identifier: ``CCkkBBBnnn...``, mod-97 over the national part (business code
  ``BBB`` excluded), as the EPC's "Creditor Identifier Overview" defines it.

Pure: no I/O, no clock.
"""

import re
import string
import unicodedata
import xml.etree.ElementTree as ET
from datetime import date
from typing import Final

from protocol.errors import FogpayError
from protocol.money import format_minor

SEPA_CURRENCY: Final = "EUR"
SEPA_ID_CHARS_MAX: Final = 35
SEPA_NAME_CHARS_MAX: Final = 70
SEPA_USTRD_CHARS_MAX: Final = 140
SEPA_AMOUNT_MINOR_MIN: Final = 1  # 0.01 EUR
SEPA_AMOUNT_MINOR_MAX: Final = 99_999_999_999  # 999 999 999.99 EUR
IBAN_CHARS_MAX: Final = 34
CREDITOR_ID_CHARS_MAX: Final = 35

SEPA_CHARS: Final = frozenset(string.ascii_letters + string.digits + "/-?:().,'+ ")
_ID_CHARS: Final = SEPA_CHARS - {" "}

# IBAN lengths of the countries and territories in the SEPA schemes' geographical scope
# (EPC409-09). French overseas departments and Monaco's neighbours use FR, the Crown
# dependencies use GB.
SEPA_IBAN_LENGTHS: Final[dict[str, int]] = {
    "AD": 24, "AL": 28, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24,
    "DE": 22, "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GI": 23,
    "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IS": 26, "IT": 27, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MT": 31, "NL": 18,
    "NO": 15, "PL": 28, "PT": 25, "RO": 24, "RS": 22, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "VA": 22,
}  # fmt: skip

_IBAN_SHAPE: Final = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{1,30}")
_BIC_SHAPE: Final = re.compile(r"[A-Z]{6}[A-Z2-9][A-NP-Z0-9]([A-Z0-9]{3})?")  # the XSD's
_CI_SHAPE: Final = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{3}[A-Z0-9]{1,28}")
_AMOUNT_TEXT: Final = re.compile(r"(0|[1-9][0-9]{0,8})\.[0-9]{2}")
_DATE_TEXT: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

# Latin letters NFKD does not decompose into a base letter, and punctuation with a
# customary SEPA stand-in. Anything else outside the set becomes a space.
_TRANSLIT: Final[dict[str, str]] = {
    "ß": "ss", "ẞ": "SS", "Æ": "AE", "æ": "ae", "Œ": "OE", "œ": "oe", "Ø": "O", "ø": "o",
    "Ł": "L", "ł": "l", "Đ": "D", "đ": "d", "Ð": "D", "ð": "d", "Þ": "TH", "þ": "th",
    "ı": "i", "Ħ": "H", "ħ": "h", "&": "+", "_": "-", '"': "'", "`": "'", "‘": "'",
    "’": "'", "“": "'", "”": "'", "–": "-", "—": "-", ";": ",", "!": ".",
}  # fmt: skip


class SepaError(FogpayError):
    """A value the SEPA rails would refuse; ``field`` names it (e.g. ``creditor.iban``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def check_sepa_text(s: str, *, max_len: int, field: str = "text") -> str:
    """Return ``s`` if it is 1..max_len characters of the SEPA set, else raise."""
    if not 1 <= len(s) <= max_len:
        raise SepaError(field, f"length {len(s)} outside 1..{max_len}")
    bad = sorted(set(s) - SEPA_CHARS)
    if bad:
        raise SepaError(field, f"characters outside the SEPA set: {''.join(bad)!r}")
    return s


def check_sepa_id(s: str, *, field: str = "id", max_len: int = SEPA_ID_CHARS_MAX) -> str:
    """Return ``s`` if it is a valid SEPA identifier (no space, no edge or double ``/``)."""
    check_sepa_text(s, max_len=max_len, field=field)
    if " " in s:
        raise SepaError(field, "spaces are not allowed in an identifier")
    if s.startswith("/") or s.endswith("/") or "//" in s:
        raise SepaError(field, "an identifier may not start or end with '/' or hold '//'")
    assert set(s) <= _ID_CHARS
    return s


_MOD97_DIGITS: Final = {c: str(int(c, 36)) for c in string.digits + string.ascii_uppercase}


def _mod97(alnum: str) -> int:
    """ISO 7064 MOD 97-10 of a string of digits and capital letters (A=10 .. Z=35)."""
    return int("".join(map(_MOD97_DIGITS.__getitem__, alnum))) % 97


def check_iban(iban: str, *, field: str = "iban") -> str:
    """Return ``iban`` (electronic format: capitals, no spaces) if valid for SEPA."""
    if not (len(iban) <= IBAN_CHARS_MAX and _IBAN_SHAPE.fullmatch(iban)):
        raise SepaError(field, "not an IBAN in electronic format (capitals, no spaces)")
    country = iban[:2]
    length = SEPA_IBAN_LENGTHS.get(country)
    if length is None:
        raise SepaError(field, f"country {country} is not in the SEPA scope")
    if len(iban) != length:
        raise SepaError(field, f"a {country} IBAN has {length} characters, not {len(iban)}")
    if _mod97(iban[4:] + iban[:4]) != 1:
        raise SepaError(field, "IBAN checksum (mod 97) does not match")
    return iban


def check_bic(bic: str, *, field: str = "bic") -> str:
    """Return ``bic`` if it is an ISO 9362 BIC of 8 or 11 characters."""
    if not _BIC_SHAPE.fullmatch(bic):
        raise SepaError(field, "not a BIC (8 or 11 capitals and digits)")
    return bic


def check_creditor_id(ci: str, *, field: str = "creditor_id") -> str:
    """Return ``ci`` if it is a SEPA creditor identifier with a matching checksum."""
    if not (len(ci) <= CREDITOR_ID_CHARS_MAX and _CI_SHAPE.fullmatch(ci)):
        raise SepaError(field, "not a SEPA creditor identifier (CCkkBBB + national id)")
    if _mod97(ci[7:] + ci[:4]) != 1:
        raise SepaError(field, "creditor identifier checksum (mod 97) does not match")
    return ci


def check_amount(minor_units: int, currency: str, *, field: str = "amount") -> str:
    """Return the rails' decimal text of ``minor_units`` cents, if SEPA may carry it."""
    assert type(minor_units) is int
    if currency != SEPA_CURRENCY:
        raise SepaError(field, f"SEPA carries {SEPA_CURRENCY} only, not {currency}")
    if not SEPA_AMOUNT_MINOR_MIN <= minor_units <= SEPA_AMOUNT_MINOR_MAX:
        raise SepaError(field, f"{minor_units} cents outside 0.01 .. 999999999.99")
    text = format_minor(minor_units, currency)
    assert check_amount_text(text, currency, field=field) == minor_units
    return text


def check_amount_text(text: str, currency: str, *, field: str = "amount") -> int:
    """Parse an amount as written in a file; return cents. Exactly two decimals."""
    if currency != SEPA_CURRENCY:
        raise SepaError(field, f"SEPA carries {SEPA_CURRENCY} only, not {currency}")
    if not _AMOUNT_TEXT.fullmatch(text):
        raise SepaError(field, f"{text!r} is not EUR with exactly two decimals")
    whole, cents = text.split(".")
    minor = int(whole) * 100 + int(cents)
    if minor < SEPA_AMOUNT_MINOR_MIN:
        raise SepaError(field, "amount must be at least 0.01")
    return minor


def check_date(text: str, *, field: str = "date") -> date:
    """Parse an ISO date ``YYYY-MM-DD`` (the only form the rails take)."""
    try:
        if not _DATE_TEXT.fullmatch(text):
            raise ValueError(text)
        return date.fromisoformat(text)
    except ValueError:
        raise SepaError(field, f"{text!r} is not a date YYYY-MM-DD") from None


def transliterate(s: str, *, max_len: int, fallback: str, field: str = "name") -> str:
    """Map a free-text name onto the SEPA set: strip accents, spell out ligatures, replace
    the rest by spaces, collapse spaces, cut at ``max_len``. A name with nothing left (e.g.
    Greek or CJK script) becomes ``fallback`` (itself checked)."""
    out = []
    for ch in unicodedata.normalize("NFKD", s):
        if ch in SEPA_CHARS:
            out.append(ch)
        elif ch in _TRANSLIT:
            out.append(_TRANSLIT[ch])
        elif not unicodedata.combining(ch):
            out.append(" ")
    text = " ".join("".join(out).split())[:max_len].strip()
    if not any(c.isalnum() for c in text):
        text = fallback
    return check_sepa_text(text, max_len=max_len, field=field)


# --- whole documents --------------------------------------------------------------------

_ID_TAGS: Final = frozenset({"MsgId", "PmtInfId", "EndToEndId", "MndtId"})
_TX_TAGS: Final = frozenset({"DrctDbtTxInf", "CdtTrfTxInf"})
_REPEATED: Final = _TX_TAGS | {"PmtInf"}
DOCUMENT_DEPTH_MAX: Final = 16  # pain.008/pain.001 nest 9 deep; anything deeper is not ours


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def check_document(xml: bytes) -> None:
    """Check a pain.008.001.02 or pain.001.001.03 document against the SEPA rules the XSD
    leaves out: every id, name, remittance text, amount, IBAN, BIC and creditor identifier,
    and that ``NbOfTxs``/``CtrlSum`` match the transactions. Raises ``SepaError`` naming
    the element's path (``Document/.../DrctDbtTxInf[2]/InstdAmt``)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise SepaError("Document", f"not XML: {exc}") from None
    _walk(root, "Document")
    body = next(iter(root), None)
    if body is None:
        raise SepaError("Document", "empty document")
    infos = [el for el in body if _local(el.tag) == "PmtInf"]
    head = next((el for el in body if _local(el.tag) == "GrpHdr"), None)
    if head is None or not infos:
        raise SepaError("Document", "no GrpHdr or no PmtInf")
    _check_sums(head, [tx for info in infos for tx in _txs(info)], "GrpHdr")
    for n, info in enumerate(infos, 1):
        _check_sums(info, _txs(info), f"PmtInf[{n}]")


def _txs(info: ET.Element) -> list[ET.Element]:
    return [el for el in info if _local(el.tag) in _TX_TAGS]


def _text(el: ET.Element) -> str:
    return el.text or ""


def _check_element(el: ET.Element, name: str, path: str) -> None:
    if name in _ID_TAGS:
        check_sepa_id(_text(el), field=path)
    elif name == "Nm":
        check_sepa_text(_text(el), max_len=SEPA_NAME_CHARS_MAX, field=path)
    elif name == "Ustrd":
        check_sepa_text(_text(el), max_len=SEPA_USTRD_CHARS_MAX, field=path)
    elif name == "InstdAmt":
        check_amount_text(_text(el), el.get("Ccy", ""), field=path)
    elif name == "IBAN":
        check_iban(_text(el), field=path)
    elif name == "BIC":
        check_bic(_text(el), field=path)
    elif path.endswith("/CdtrSchmeId/Id/PrvtId/Othr/Id"):
        check_creditor_id(_text(el), field=path)


def _walk(el: ET.Element, path: str, depth: int = 1) -> None:
    if depth > DOCUMENT_DEPTH_MAX:
        raise SepaError(path, f"nested deeper than {DOCUMENT_DEPTH_MAX}")
    _check_element(el, path.rsplit("/", 1)[-1].split("[")[0], path)
    seen: dict[str, int] = {}
    for child in el:
        name = _local(child.tag)
        seen[name] = seen.get(name, 0) + 1
        child_path = f"{path}/{name}[{seen[name]}]" if name in _REPEATED else f"{path}/{name}"
        _walk(child, child_path, depth + 1)


def _check_sums(holder: ET.Element, txs: list[ET.Element], where: str) -> None:
    found = [a for tx in txs for a in tx.iter() if _local(a.tag) == "InstdAmt"]
    if len(found) != len(txs):
        raise SepaError(where, "a transaction without exactly one InstdAmt")
    amounts = [check_amount_text(_text(a), a.get("Ccy", ""), field=where) for a in found]
    fields = {_local(el.tag): _text(el) for el in holder}
    if fields.get("NbOfTxs") != str(len(txs)):
        raise SepaError(f"{where}/NbOfTxs", f"says {fields.get('NbOfTxs')}, holds {len(txs)}")
    if "CtrlSum" in fields:
        total = check_amount_text(fields["CtrlSum"], SEPA_CURRENCY, field=f"{where}/CtrlSum")
        if total != sum(amounts):
            raise SepaError(f"{where}/CtrlSum", "does not equal the sum of the amounts")
