"""The rails' files of a settlement plan: ISO 20022 ``pain.008.001.02`` (SEPA Core or B2B
direct debits: the owners' charges), ``pain.001.001.03`` (SEPA credit transfers: the payees'
payouts) and a CSV of every line (the card PSP's input and the operator's view).

Only lines whose rail is ``sepa`` (EUR, valid account data: see ``cloud.settlement``) go into
the pain files; card and manual lines, and every non-EUR line, are in the CSV only. A plan
without such lines has no pain file: the functions return None.

Every value is checked against the SEPA rules (``cloud.sepa``) while the document is built, so
a file is either rails-valid or not written. Output is deterministic: the same plan and
arguments give the same bytes (lines come sorted from the plan; no clock, no random ids).
Identifiers: ``MsgId`` = ``message_id`` (default ``<period_id>-DD`` / ``-CT``), ``PmtInfId`` =
``<MsgId>-<SeqTp>`` (``-SCT`` for transfers), ``EndToEndId`` = the plan's line id, so the
bank's status reports (pain.002, camt.054) map back to a line.
"""

import csv
import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Final

from cloud.sepa import (
    SEPA_CURRENCY,
    SEPA_ID_CHARS_MAX,
    SEPA_NAME_CHARS_MAX,
    SEPA_USTRD_CHARS_MAX,
    SepaError,
    check_amount,
    check_bic,
    check_creditor_id,
    check_date,
    check_iban,
    check_sepa_id,
    check_sepa_text,
    transliterate,
)
from cloud.settlement import DD_SEQUENCES, Kind, Line, SepaAccount, SettlementPlan
from protocol.money import format_minor

PAIN008_NS: Final = "urn:iso:std:iso:20022:tech:xsd:pain.008.001.02"
PAIN001_NS: Final = "urn:iso:std:iso:20022:tech:xsd:pain.001.001.03"
MESSAGE_ID_CHARS_MAX: Final = SEPA_ID_CHARS_MAX - len("-RCUR")  # room for the PmtInfId suffix
COLLECTION_LEAD_DAYS: Final = 2  # default due date: creation date + 2 calendar days (D-1 rule)
LOCAL_INSTRUMENTS: Final = ("CORE", "B2B")
NOT_PROVIDED: Final = "NOTPROVIDED"  # EPC's agent id when the IBAN alone identifies the bank
_DATETIME_TEXT: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})?"
)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

CSV_COLUMNS: Final = (
    "period_id",
    "line_id",
    "kind",
    "owner_id",
    "name",
    "currency",
    "amount",
    "minor_units",
    "micros",
    "booked_micros",
    "carry_in_micros",
    "carry_out_micros",
    "receipts",
    "rail",
    "note",
    "detail",
    "funding_ref",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CreditorConfig:
    """The operator as collector of the owners' charges (pain.008)."""

    name: str
    iban: str
    bic: str | None = None
    creditor_id: str  # SEPA Creditor Identifier, e.g. DE98ZZZ09999999999
    local_instrument: str = "CORE"
    batch_booking: bool = True
    collection_lead_days: int = COLLECTION_LEAD_DAYS


@dataclass(frozen=True, slots=True, kw_only=True)
class DebtorConfig:
    """The operator as payer of the payees' payouts (pain.001)."""

    name: str
    iban: str
    bic: str | None = None
    batch_booking: bool = True


def iso_datetime(ms: int) -> str:
    """``CreDtTm`` text of a Unix time in ms, UTC, whole seconds: ``2026-11-27T05:00:00``."""
    return (_EPOCH + timedelta(milliseconds=ms)).strftime("%Y-%m-%dT%H:%M:%S")


def _check_datetime(text: str) -> date:
    try:
        if not _DATETIME_TEXT.fullmatch(text):
            raise ValueError(text)
        return datetime.fromisoformat(text.replace("Z", "+00:00")).date()
    except ValueError:
        raise SepaError("created_at", f"{text!r} is not YYYY-MM-DDThh:mm:ss[Z]") from None


def _sub(parent: ET.Element, path: str, text: str | None = None, **attrib: str) -> ET.Element:
    """Append the chain of elements ``A/B/C`` under ``parent``; set the last one's text."""
    el = parent
    for tag in path.split("/"):
        el = ET.SubElement(el, tag)
    el.attrib.update(attrib)
    if text is not None:
        el.text = text
    return el


def _agent(parent: ET.Element, tag: str, bic: str | None) -> None:
    if bic is None:
        _sub(parent, f"{tag}/FinInstnId/Othr/Id", NOT_PROVIDED)
    else:
        _sub(parent, f"{tag}/FinInstnId/BIC", bic)


def _name(text: str, *, fallback: str, field: str) -> str:
    return transliterate(text, max_len=SEPA_NAME_CHARS_MAX, fallback=fallback, field=field)


def _ustrd(plan: SettlementPlan, line: Line) -> str:
    end = (_EPOCH + timedelta(milliseconds=plan.until_ms)).strftime("%Y-%m-%d %H:%M")
    what = "payments" if line.kind == "charge" else "payments received"
    text = f"fogpay {plan.period_id}: {line.receipts} {what} until {end} UTC"
    return check_sepa_text(text, max_len=SEPA_USTRD_CHARS_MAX, field=f"{line.line_id}.ustrd")


def _amount_sum(lines: Iterable[Line]) -> str:
    return format_minor(sum(x.minor_units for x in lines), SEPA_CURRENCY)


def _message_id(given: str | None, default: str) -> str:
    msg_id = given if given is not None else default
    return check_sepa_id(msg_id, field="message_id", max_len=MESSAGE_ID_CHARS_MAX)


def _header(
    root: ET.Element, message_id: str, created_at: str, lines: list[Line], name: str
) -> None:
    head = _sub(root, "GrpHdr")
    _sub(head, "MsgId", message_id)
    _sub(head, "CreDtTm", created_at)
    _sub(head, "NbOfTxs", str(len(lines)))
    _sub(head, "CtrlSum", _amount_sum(lines))
    _sub(head, "InitgPty/Nm", name)


def _serialize(doc: ET.Element) -> bytes:
    ET.indent(doc, space="  ")
    # encoding="unicode" then one encode: ElementTree's own UTF-8 writer is ~3x slower
    body = ET.tostring(doc, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{body}\n'.encode()


def _sepa_lines(plan: SettlementPlan, kind: Kind) -> list[Line]:
    lines = [x for x in plan.lines(rail="sepa") if x.kind == kind]
    for x in lines:
        assert x.currency == SEPA_CURRENCY and isinstance(x.funding, SepaAccount), x.line_id
    return lines


def pain008(
    plan: SettlementPlan,
    *,
    creditor: CreditorConfig,
    created_at: str,
    message_id: str | None = None,
    collection_date: str | None = None,
) -> bytes | None:
    """The SEPA direct-debit initiation for the plan's charges on the sepa rail, one
    ``PmtInf`` per sequence type (FRST, RCUR, OOFF, FNAL); None if there are none.
    ``created_at``: ``YYYY-MM-DDThh:mm:ss[Z]``; ``collection_date`` (``ReqdColltnDt``)
    defaults to the creation date + ``creditor.collection_lead_days``."""
    created = _check_datetime(created_at)  # configuration first: a bad one fails every time
    cdtr = _creditor_checked(creditor)
    due = _due_date(created, creditor, collection_date)
    msg_id = _message_id(message_id, f"{plan.period_id}-DD")
    lines = _sepa_lines(plan, "charge")
    if not lines:
        return None
    doc = ET.Element("Document", xmlns=PAIN008_NS)
    root = _sub(doc, "CstmrDrctDbtInitn")
    _header(root, msg_id, created_at, lines, cdtr.name)
    for seq in DD_SEQUENCES:
        group = [x for x in lines if x.dd_sequence == seq]
        if group:
            info = _dd_info(root, f"{msg_id}-{seq}", seq, due, cdtr, group)
            for x in group:
                _dd_tx(info, plan, x, due)
    return _serialize(doc)


def _due_date(created: date, creditor: CreditorConfig, collection_date: str | None) -> date:
    if collection_date is None:
        return created + timedelta(days=creditor.collection_lead_days)
    due = check_date(collection_date, field="collection_date")
    if due < created:
        raise SepaError("collection_date", "before the file's creation date")
    return due


def _creditor_checked(c: CreditorConfig) -> CreditorConfig:
    if c.collection_lead_days < 0:
        raise SepaError("creditor.collection_lead_days", "must be >= 0")
    if c.local_instrument not in LOCAL_INSTRUMENTS:
        raise SepaError("creditor.local_instrument", f"want one of {LOCAL_INSTRUMENTS}")
    check_iban(c.iban, field="creditor.iban")
    if c.bic is not None:
        check_bic(c.bic, field="creditor.bic")
    check_creditor_id(c.creditor_id, field="creditor.creditor_id")
    name = _name(c.name, fallback="fogpay", field="creditor.name")
    return replace(c, name=name)


def _dd_info(
    root: ET.Element, pmt_id: str, seq: str, due: date, c: CreditorConfig, group: list[Line]
) -> ET.Element:
    info = _sub(root, "PmtInf")
    _sub(info, "PmtInfId", check_sepa_id(pmt_id, field="PmtInfId"))
    _sub(info, "PmtMtd", "DD")
    _sub(info, "BtchBookg", "true" if c.batch_booking else "false")
    _sub(info, "NbOfTxs", str(len(group)))
    _sub(info, "CtrlSum", _amount_sum(group))
    kind = _sub(info, "PmtTpInf")
    _sub(kind, "SvcLvl/Cd", "SEPA")
    _sub(kind, "LclInstrm/Cd", c.local_instrument)
    _sub(kind, "SeqTp", seq)
    _sub(info, "ReqdColltnDt", due.isoformat())
    _sub(info, "Cdtr/Nm", c.name)
    _sub(info, "CdtrAcct/Id/IBAN", c.iban)
    _agent(info, "CdtrAgt", c.bic)
    _sub(info, "ChrgBr", "SLEV")
    other = _sub(info, "CdtrSchmeId/Id/PrvtId/Othr")
    _sub(other, "Id", c.creditor_id)
    _sub(other, "SchmeNm/Prtry", "SEPA")
    return info


def _dd_tx(info: ET.Element, plan: SettlementPlan, x: Line, due: date) -> None:
    account = x.funding
    assert isinstance(account, SepaAccount)
    assert account.mandate_id is not None and account.mandate_signed is not None
    if check_date(account.mandate_signed) > due:
        raise SepaError(f"{x.line_id}.mandate_signed", "after the collection date")
    tx = _sub(info, "DrctDbtTxInf")
    _sub(tx, "PmtId/EndToEndId", check_sepa_id(x.line_id, field="EndToEndId"))
    amount = check_amount(x.minor_units, x.currency, field=f"{x.line_id}.amount")
    _sub(tx, "InstdAmt", amount, Ccy=x.currency)
    mandate = _sub(tx, "DrctDbtTx/MndtRltdInf")
    _sub(mandate, "MndtId", account.mandate_id)
    _sub(mandate, "DtOfSgntr", account.mandate_signed)
    _agent(tx, "DbtrAgt", account.bic)
    _sub(tx, "Dbtr/Nm", _name(x.name, fallback=x.owner_id, field=f"{x.line_id}.name"))
    _sub(tx, "DbtrAcct/Id/IBAN", account.iban)
    _sub(tx, "RmtInf/Ustrd", _ustrd(plan, x))


def pain001(
    plan: SettlementPlan,
    *,
    debtor: DebtorConfig,
    created_at: str,
    message_id: str | None = None,
    execution_date: str | None = None,
) -> bytes | None:
    """The SEPA credit-transfer initiation for the plan's payouts on the sepa rail, in one
    ``PmtInf``; None if there are none. ``execution_date`` (``ReqdExctnDt``) defaults to the
    creation date."""
    created = _check_datetime(created_at)  # configuration first: a bad one fails every time
    when = created if execution_date is None else check_date(execution_date, field="execution_date")
    if when < created:
        raise SepaError("execution_date", "before the file's creation date")
    msg_id = _message_id(message_id, f"{plan.period_id}-CT")
    check_iban(debtor.iban, field="debtor.iban")
    if debtor.bic is not None:
        check_bic(debtor.bic, field="debtor.bic")
    name = _name(debtor.name, fallback="fogpay", field="debtor.name")
    lines = _sepa_lines(plan, "payout")
    if not lines:
        return None
    doc = ET.Element("Document", xmlns=PAIN001_NS)
    root = _sub(doc, "CstmrCdtTrfInitn")
    _header(root, msg_id, created_at, lines, name)
    info = _sub(root, "PmtInf")
    _sub(info, "PmtInfId", check_sepa_id(f"{msg_id}-SCT", field="PmtInfId"))
    _sub(info, "PmtMtd", "TRF")
    _sub(info, "BtchBookg", "true" if debtor.batch_booking else "false")
    _sub(info, "NbOfTxs", str(len(lines)))
    _sub(info, "CtrlSum", _amount_sum(lines))
    _sub(info, "PmtTpInf/SvcLvl/Cd", "SEPA")
    _sub(info, "ReqdExctnDt", when.isoformat())
    _sub(info, "Dbtr/Nm", name)
    _sub(info, "DbtrAcct/Id/IBAN", debtor.iban)
    _agent(info, "DbtrAgt", debtor.bic)
    _sub(info, "ChrgBr", "SLEV")
    for x in lines:
        _ct_tx(info, plan, x)
    return _serialize(doc)


def _ct_tx(info: ET.Element, plan: SettlementPlan, x: Line) -> None:
    account = x.funding
    assert isinstance(account, SepaAccount)
    tx = _sub(info, "CdtTrfTxInf")
    _sub(tx, "PmtId/EndToEndId", check_sepa_id(x.line_id, field="EndToEndId"))
    amount = check_amount(x.minor_units, x.currency, field=f"{x.line_id}.amount")
    _sub(tx, "Amt/InstdAmt", amount, Ccy=x.currency)
    if account.bic is not None:  # optional in pain.001 when the IBAN is enough
        _sub(tx, "CdtrAgt/FinInstnId/BIC", account.bic)
    _sub(tx, "Cdtr/Nm", _name(x.name, fallback=x.owner_id, field=f"{x.line_id}.name"))
    _sub(tx, "CdtrAcct/Id/IBAN", account.iban)
    _sub(tx, "RmtInf/Ustrd", _ustrd(plan, x))


def settlement_csv(plan: SettlementPlan) -> str:
    """Every line of the plan, charges then payouts, as RFC 4180 CSV with a header row
    (``CSV_COLUMNS``). It carries funding references in full (the card PSP needs its
    tokens): treat the file like the pain files, not like a log."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\r\n")
    out.writerow(CSV_COLUMNS)
    for x in plan.charges + plan.payouts:
        out.writerow(
            (
                plan.period_id,
                x.line_id,
                x.kind,
                x.owner_id,
                x.name,
                x.currency,
                format_minor(x.minor_units, x.currency),
                x.minor_units,
                x.micros,
                x.booked_micros,
                x.carry_in_micros,
                x.carry_out_micros,
                x.receipts,
                x.rail,
                x.note,
                x.detail,
                x.funding_ref,
            )
        )
    return buf.getvalue()
