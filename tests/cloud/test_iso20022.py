"""The rails' files (cloud/iso20022.py): valid against the official ISO 20022 XSDs
(tests/cloud/data, see SOURCES.md), valid for the SEPA rails the XSDs do not encode,
deterministic, and a CSV that round-trips through the ``csv`` module."""

import csv
import io
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xmlschema

from cloud.iso20022 import (
    CSV_COLUMNS,
    CreditorConfig,
    DebtorConfig,
    iso_datetime,
    pain001,
    pain008,
    settlement_csv,
)
from cloud.sepa import SepaError, check_document
from cloud.settlement import Balance, Party, SettlementPlan, plan_period
from protocol.money import format_minor

DATA = Path(__file__).parent / "data"
NS8 = {"p": "urn:iso:std:iso:20022:tech:xsd:pain.008.001.02"}
NS1 = {"p": "urn:iso:std:iso:20022:tech:xsd:pain.001.001.03"}
CREATED = "2026-11-18T12:00:00"
UNTIL_MS = 1_795_000_000_000  # 2026-11-18 11:06:40 UTC
CREDITOR = CreditorConfig(
    name="fogpay Operator AG",
    iban="DE89370400440532013000",
    bic="COBADEFFXXX",
    creditor_id="DE98ZZZ09999999999",
)
DEBTOR = DebtorConfig(name="fogpay Operator AG", iban="DE89370400440532013000")


@pytest.fixture(scope="module")
def xsd008() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(DATA / "pain.008.001.02.xsd")


@pytest.fixture(scope="module")
def xsd001() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(DATA / "pain.001.001.03.xsd")


PARTIES = {
    p.owner_id: p
    for p in (
        Party(
            owner_id="alice",
            name="Zoë Straße & Söhne",
            currency="EUR",
            funding_ref="sepa:DE89370400440532013000:COBADEFFXXX:2024-01-15:MANDATE-alice/1",
        ),
        Party(
            owner_id="bob",
            name='Bob, "the" builder\nLtd',
            currency="EUR",
            funding_ref="sepa:NL91ABNA0417164300::2026-11-01:M:bob:1",
            dd_sequence="FRST",
        ),
        Party(
            owner_id="chen",
            name="陈伟",
            currency="EUR",
            funding_ref="sepa:FR1420041010050500013M02606:BNPAFRPP:2023-05-05:CHEN-2023",
        ),
        Party(owner_id="carl", name="Carl", currency="USD", funding_ref="card:tok_carl_4242"),
        Party(owner_id="dora", name="Dora", currency="EUR", funding_ref="sepa:BE68539007547034:"),
        Party(
            owner_id="shop-1",
            name="Ladestation Nord GmbH",
            currency="EUR",
            funding_ref="sepa:AT611904300234573201:BKAUATWW",
        ),
        Party(
            owner_id="shop-2",
            name="=cmd|' /C calc'!A0",
            currency="EUR",
            funding_ref="sepa:ES9121000418450200051332:",
        ),
    )
}


def _bal(owner: str, currency: str, debit: int, credit: int = 0, carry: int = 0) -> Balance:
    return Balance(
        owner_id=owner,
        currency=currency,
        debit_micros=debit,
        credit_micros=credit,
        carry_in_micros=carry,
        receipts=debit // 1_000,
        credit_receipts=credit // 1_000,
    )


BALANCES = (
    _bal("alice", "EUR", 12_345_678, carry=5_000),  # 12.35 RCUR, BIC
    _bal("bob", "EUR", 1_000_001),  # 1.00 FRST, no BIC
    _bal("chen", "EUR", 987_654_321),  # 987.65 RCUR, name transliterates to nothing
    _bal("carl", "USD", 2_000_000),  # card, CSV only
    _bal("dora", "EUR", 3_000_000),  # no mandate: manual, CSV only
    _bal("ghost", "EUR", 4_000_000),  # no party: manual, CSV only
    _bal("shop-1", "EUR", 0, credit=900_000_000),  # payout 900.00, BIC
    _bal("shop-2", "EUR", 0, credit=107_999_999),  # payout 107.99, no BIC
    _bal("shop-1", "USD", 0, credit=2_000_000),  # USD payout: CSV only
)


def make_plan(balances: tuple[Balance, ...] = BALANCES) -> SettlementPlan:
    return plan_period(
        period_id="2026-11-18", until_ms=UNTIL_MS, balances=balances, parties=PARTIES
    )


@pytest.fixture(scope="module")
def plan() -> SettlementPlan:
    return make_plan()


def test_pain008_of_a_multi_owner_period_is_valid(
    plan: SettlementPlan, xsd008: xmlschema.XMLSchema
) -> None:
    data = pain008(plan, creditor=CREDITOR, created_at=CREATED)
    assert data is not None
    xsd008.validate(data)
    check_document(data)
    doc = ET.fromstring(data)
    sepa = {x.line_id: x for x in plan.charges if x.rail == "sepa"}
    assert set(sepa) == {"2026-11-18-C000001", "2026-11-18-C000002", "2026-11-18-C000003"}
    infos = doc.findall("p:CstmrDrctDbtInitn/p:PmtInf", NS8)
    assert [i.findtext("p:PmtTpInf/p:SeqTp", namespaces=NS8) for i in infos] == ["FRST", "RCUR"]
    txs = doc.findall(".//p:DrctDbtTxInf", NS8)
    assert {tx.findtext("p:PmtId/p:EndToEndId", namespaces=NS8) for tx in txs} == set(sepa)
    for tx in txs:
        line = sepa[tx.findtext("p:PmtId/p:EndToEndId", namespaces=NS8) or ""]
        assert tx.findtext("p:InstdAmt", namespaces=NS8) == format_minor(line.minor_units, "EUR")
    assert doc.findtext(".//p:GrpHdr/p:NbOfTxs", namespaces=NS8) == "3"
    assert doc.findtext(".//p:GrpHdr/p:CtrlSum", namespaces=NS8) == "1001.00"  # 12.35+1+987.65
    names = [n.text for n in doc.findall(".//p:Dbtr/p:Nm", NS8)]
    assert names == ["Bob, 'the' builder Ltd", "Zoe Strasse + Sohne", "chen"]
    assert doc.findtext(".//p:ReqdColltnDt", namespaces=NS8) == "2026-11-20"


def test_pain001_of_a_multi_payee_period_is_valid(
    plan: SettlementPlan, xsd001: xmlschema.XMLSchema
) -> None:
    data = pain001(plan, debtor=DEBTOR, created_at=CREATED, message_id="FP-20261118-CT")
    assert data is not None
    xsd001.validate(data)
    check_document(data)
    doc = ET.fromstring(data)
    assert doc.findtext(".//p:GrpHdr/p:MsgId", namespaces=NS1) == "FP-20261118-CT"
    txs = doc.findall(".//p:CdtTrfTxInf", NS1)
    got = [
        (
            tx.findtext("p:PmtId/p:EndToEndId", namespaces=NS1),
            tx.findtext("p:Amt/p:InstdAmt", namespaces=NS1),
            tx.findtext("p:CdtrAgt/p:FinInstnId/p:BIC", namespaces=NS1),
        )
        for tx in txs
    ]
    assert got == [
        ("2026-11-18-P000001", "900.00", "BKAUATWW"),
        ("2026-11-18-P000002", "107.99", None),
    ]
    assert doc.findtext(".//p:PmtInf/p:CtrlSum", namespaces=NS1) == "1007.99"


def test_same_plan_same_bytes_whatever_the_balances_order(plan: SettlementPlan) -> None:
    first = (
        pain008(plan, creditor=CREDITOR, created_at=CREATED),
        pain001(plan, debtor=DEBTOR, created_at=CREATED),
    )
    for seed in range(3):
        shuffled = list(BALANCES)
        random.Random(seed).shuffle(shuffled)
        again = make_plan(tuple(shuffled))
        assert pain008(again, creditor=CREDITOR, created_at=CREATED) == first[0]
        assert pain001(again, debtor=DEBTOR, created_at=CREATED) == first[1]
        assert settlement_csv(again) == settlement_csv(plan)


def test_a_plan_without_sepa_lines_has_no_pain_file() -> None:
    only_card = make_plan((_bal("carl", "USD", 2_000_000), _bal("dora", "EUR", 5_000)))
    assert pain008(only_card, creditor=CREDITOR, created_at=CREATED) is None
    assert pain001(only_card, debtor=DEBTOR, created_at=CREATED) is None
    assert "carl" in settlement_csv(only_card)
    with pytest.raises(SepaError, match=r"creditor\.iban"):  # bad configuration: even then
        pain008(only_card, creditor=_creditor(iban="DE00"), created_at=CREATED)


def test_the_csv_round_trips_through_the_csv_module(plan: SettlementPlan) -> None:
    rows = list(csv.DictReader(io.StringIO(settlement_csv(plan), newline="")))
    lines = plan.charges + plan.payouts
    assert len(rows) == len(lines) == 9
    for row, x in zip(rows, lines, strict=True):
        assert tuple(row) == CSV_COLUMNS
        assert row["period_id"] == plan.period_id
        assert (row["line_id"], row["kind"], row["owner_id"]) == (x.line_id, x.kind, x.owner_id)
        assert (row["name"], row["funding_ref"]) == (x.name, x.funding_ref)  # exact, unicode
        assert row["amount"] == format_minor(x.minor_units, x.currency)
        for col in ("minor_units", "micros", "booked_micros", "carry_in_micros"):
            assert int(row[col]) == getattr(x, col)
        assert int(row["carry_out_micros"]) == x.carry_out_micros
        assert (row["rail"], row["note"], row["detail"]) == (x.rail, x.note, x.detail)
    by_rail = {r["line_id"]: r["rail"] for r in rows}
    assert by_rail["2026-11-18-C000004"] == "manual"  # dora: no mandate
    assert by_rail["2026-11-18-C000005"] == "manual"  # ghost: no party
    assert by_rail["2026-11-18-C000006"] == "card"  # carl, USD
    assert sum(int(r["micros"]) for r in rows if r["kind"] == "charge") == sum(
        x.micros for x in plan.charges
    )


# --- what the XSD accepts and the rails refuse ---------------------------------------------


def _mutate(data: bytes, ns: dict[str, str], path: str, value: str) -> bytes:
    ET.register_namespace("", ns["p"])
    doc = ET.fromstring(data)
    el = doc.find(path, ns)
    assert el is not None, path
    el.text = value
    out: bytes = ET.tostring(doc, encoding="UTF-8", xml_declaration=True)
    return out


TX = ".//p:DrctDbtTxInf"
CASES008: list[tuple[str, str, str, str]] = [
    ("3-decimal EUR", f"{TX}/p:InstdAmt", "1.005", "InstdAmt"),
    ("bad IBAN checksum", f"{TX}/p:DbtrAcct/p:Id/p:IBAN", "NL92ABNA0417164300", "IBAN"),
    ("non-SEPA char in an id", f"{TX}/p:PmtId/p:EndToEndId", "2026_11_18_C1", "EndToEndId"),
    ("accented id", ".//p:DrctDbtTx/p:MndtRltdInf/p:MndtId", "MANDAT-Zoë", "MndtId"),
    ("space in an id", ".//p:GrpHdr/p:MsgId", "FP 2026", "MsgId"),
    ("71-char name", ".//p:Dbtr/p:Nm", "N" * 71, "Nm"),
    ("non-SEPA char in a name", ".//p:Dbtr/p:Nm", "Müller & Co", "Nm"),
    ("control sum off", ".//p:GrpHdr/p:CtrlSum", "1001.01", "CtrlSum"),
    ("count off", ".//p:PmtInf/p:NbOfTxs", "2", "NbOfTxs"),
    ("creditor id checksum", ".//p:CdtrSchmeId//p:Othr/p:Id", "DE97ZZZ09999999999", "Othr/Id"),
]


@pytest.mark.parametrize(("case", "path", "value", "where"), CASES008, ids=[c[0] for c in CASES008])
def test_rails_refuse_what_the_xsd_accepts_in_pain008(
    plan: SettlementPlan,
    xsd008: xmlschema.XMLSchema,
    case: str,
    path: str,
    value: str,
    where: str,
) -> None:
    good = pain008(plan, creditor=CREDITOR, created_at=CREATED)
    assert good is not None
    bad = _mutate(good, NS8, path, value)
    assert xsd008.is_valid(bad), case  # the schema is looser than the rails...
    with pytest.raises(SepaError) as err:  # ...and our checks are not
        check_document(bad)
    assert where in err.value.field


def test_usd_in_a_sepa_file_passes_the_xsd_but_not_the_rails(
    plan: SettlementPlan, xsd001: xmlschema.XMLSchema
) -> None:
    good = pain001(plan, debtor=DEBTOR, created_at=CREATED)
    assert good is not None
    bad = good.replace(b'Ccy="EUR">900.00', b'Ccy="USD">900.00', 1)
    assert bad != good and xsd001.is_valid(bad)
    with pytest.raises(SepaError, match="EUR only"):
        check_document(bad)


def test_a_36_char_end_to_end_id_is_refused_by_us_before_the_xsd_sees_it(
    xsd001: xmlschema.XMLSchema, plan: SettlementPlan
) -> None:
    good = pain001(plan, debtor=DEBTOR, created_at=CREATED)
    assert good is not None
    long_id = _mutate(good, NS1, ".//p:PmtId/p:EndToEndId", "E" * 36)
    assert not xsd001.is_valid(long_id)  # Max35Text: the XSD catches this one too
    with pytest.raises(SepaError, match="length 36"):
        check_document(long_id)
    with pytest.raises(SepaError) as err:  # and no plan can produce one
        plan_period(period_id="P" * 25, until_ms=UNTIL_MS, balances=BALANCES, parties=PARTIES)
    assert err.value.field == "period_id"


def _creditor(**changes: str) -> CreditorConfig:
    fields = {
        "name": CREDITOR.name,
        "iban": CREDITOR.iban,
        "bic": CREDITOR.bic,
        "creditor_id": CREDITOR.creditor_id,
    }
    return CreditorConfig(**(fields | changes))  # type: ignore[arg-type]


Make = Callable[..., bytes | None]
REFUSALS: list[tuple[str, Make, dict[str, Any], str]] = [
    ("creditor IBAN", pain008, {"creditor": _creditor(iban="DE89370400440532013001")}, "iban"),
    ("creditor BIC", pain008, {"creditor": _creditor(bic="cobadeff")}, "creditor.bic"),
    ("creditor id", pain008, {"creditor": _creditor(creditor_id="DE98ZZZ0999999999")}, "tor_id"),
    ("instrument", pain008, {"creditor": _creditor(local_instrument="COR1")}, "instrument"),
    ("message id 31", pain008, {"message_id": "M" * 31}, "message_id"),
    ("message id char", pain001, {"message_id": "M_1"}, "message_id"),
    ("created_at", pain008, {"created_at": "2026-11-18 12:00"}, "created_at"),
    ("collection date", pain008, {"collection_date": "2026-11-17"}, "collection_date"),
    ("mandate after due", pain008, {"created_at": "2026-10-01T00:00:00"}, "mandate_signed"),
    ("debtor IBAN", pain001, {"debtor": DebtorConfig(name="x", iban="DE89")}, "debtor.iban"),
    ("execution date", pain001, {"execution_date": "2026-11-17"}, "execution_date"),
]


@pytest.mark.parametrize(("case", "make", "args", "field"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_generation_refuses_bad_configuration_naming_the_field(
    plan: SettlementPlan, case: str, make: Make, args: dict[str, Any], field: str
) -> None:
    config: dict[str, Any] = {"creditor": CREDITOR} if make is pain008 else {"debtor": DEBTOR}
    with pytest.raises(SepaError) as err:
        make(plan, **(config | {"created_at": CREATED} | args))
    assert field in err.value.field, case


def test_created_at_helper_and_explicit_dates(
    plan: SettlementPlan, xsd008: xmlschema.XMLSchema
) -> None:
    assert iso_datetime(UNTIL_MS) == "2026-11-18T11:06:40"
    data = pain008(
        plan,
        creditor=_creditor(local_instrument="B2B"),
        created_at=iso_datetime(UNTIL_MS) + "Z",
        collection_date="2026-12-01",
    )
    assert data is not None
    xsd008.validate(data)
    doc = ET.fromstring(data)
    assert doc.findtext(".//p:ReqdColltnDt", namespaces=NS8) == "2026-12-01"
    assert doc.findtext(".//p:LclInstrm/p:Cd", namespaces=NS8) == "B2B"


def test_documents_that_are_not_pain_files_are_refused_not_crashed_on() -> None:
    for junk in (b"", b"<Document", b"<Document/>", b"<a>" * 40 + b"</a>" * 40):
        with pytest.raises(SepaError):
            check_document(junk)
