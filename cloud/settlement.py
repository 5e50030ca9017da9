"""Settlement planning: one period's charges and payouts, and the proof that they add up.

Between two settlements the ledger books every authorized intent as a debit of the paying
owner and a credit of the payee, in micros. Closing a period turns those thousands of
micro-payments into a few real money movements, as mass transit does with tap-ins: per owner
and currency one charge of everything booked and unsettled; per payee and currency one payout.

The rails move minor units (cents), the ledger moves micros. Each line is rounded DOWN to the
minor unit (``protocol.money.round_to_minor``) and the remainder, less than one minor unit, is
carried into the next period on the same side:

    charged + charge_carry_out == debits  + charge_carry_in     (per owner and currency)
    paid    + payout_carry_out == credits + payout_carry_in

so no micro is created or lost, no owner is charged a micro more than it owes and no payee is
paid a micro more than it earned. A line of zero minor units is omitted (its carry is kept).
The two sides are not netted: a party that both pays and is paid gets a charge and a payout,
because they travel on different rails (a mandate or card to debit, an account to credit).

Each line is routed to a rail by the party's ``funding_ref`` (grammar in ``parse_funding_ref``):
``sepa`` (EUR only: pain.008 for charges, which needs a mandate; pain.001 for payouts),
``card`` (any currency; the card PSP reads the CSV), or ``manual`` with a stable ``note`` code
saying why no rail can take it (no party, bad funding data, no mandate, a non-EUR line on a
SEPA account, an amount above the rail's maximum). A manual line is still settled: it is in the
CSV and the report for an operator to collect, and one owner's bad data never blocks the
period for everyone.

The caller (``fogpay cloud settle``, with either store) reads the balances, calls
``plan_period``, writes the files (``cloud.iso20022``), and in one transaction books the lines,
stores ``plan.carries`` as the next period's carry-in and frees ``plan.freed_credit()`` for
new leases. Nothing here reads a clock, a file or a database. Choices: docs/settlement.md.
"""

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal

from cloud.sepa import (
    SEPA_AMOUNT_MINOR_MAX,
    SEPA_CURRENCY,
    check_bic,
    check_date,
    check_iban,
    check_sepa_id,
)
from protocol.errors import FogpayError
from protocol.money import Rounded, UnknownCurrency, minor_unit_micros, round_to_minor

Kind = Literal["charge", "payout"]
Rail = Literal["sepa", "card", "manual"]
DD_SEQUENCES: Final = ("FRST", "RCUR", "OOFF", "FNAL")  # SEPA direct-debit sequence types
PERIOD_ID_CHARS_MAX: Final = 24  # leaves room for "-C000001" in a 35-char EndToEndId
PLAN_LINES_MAX: Final = 999_999  # per side: line ids carry six digits
CARD_TOKEN_CHARS_MAX: Final = 128
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class Note(enum.StrEnum):
    """Why a line is on the manual rail. Stable codes: the CSV and dashboards carry them."""

    NO_PARTY = "no_party"
    BAD_FUNDING = "bad_funding"
    NO_MANDATE = "no_mandate"
    NOT_SEPA_CURRENCY = "not_sepa_currency"
    OVER_RAIL_MAX = "over_rail_max"


class SettlementError(FogpayError):
    """A period cannot be planned (bad period id, a currency without a known minor unit)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SepaAccount:
    iban: str
    bic: str | None = None
    mandate_id: str | None = None  # needed to direct-debit the account
    mandate_signed: str | None = None  # YYYY-MM-DD


@dataclass(frozen=True, slots=True, kw_only=True)
class CardToken:
    token: str  # the card PSP's opaque token, never a card number


Funding = SepaAccount | CardToken


@dataclass(frozen=True, slots=True, kw_only=True)
class Party:
    """An owner or payee as the rails see it. ``currency`` is its account's currency (EUR
    for SEPA; a card PSP converts). ``funding_ref`` (see ``parse_funding_ref``) is never
    logged in full: use ``mask_funding_ref``."""

    owner_id: str
    name: str
    currency: str
    funding_ref: str
    dd_sequence: str = "RCUR"  # since the 2016 rulebook RCUR may also open a mandate

    def __post_init__(self) -> None:
        assert self.dd_sequence in DD_SEQUENCES, self.dd_sequence


@dataclass(frozen=True, slots=True, kw_only=True)
class Balance:
    """What the ledger says for one owner and currency in this period (micros)."""

    owner_id: str
    currency: str
    debit_micros: int  # booked payments the owner made, unsettled, up to the period's end
    credit_micros: int  # booked payments the owner received as payee
    carry_in_micros: int  # charge side, from the previous period's ``Carry.charge_micros``
    receipts: int  # booked intents the owner paid (each intent debits exactly one owner)
    credit_carry_in_micros: int = 0  # payout side, from ``Carry.payout_micros``
    credit_receipts: int = 0  # booked intents the owner received

    def __post_init__(self) -> None:
        for name in ("debit_micros", "credit_micros", "carry_in_micros", "receipts"):
            value = getattr(self, name)
            assert type(value) is int and value >= 0, (name, value)
        assert type(self.credit_carry_in_micros) is int and self.credit_carry_in_micros >= 0
        assert type(self.credit_receipts) is int and self.credit_receipts >= 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Line:
    """One charge or payout: ``minor_units`` of ``currency`` on ``rail``."""

    line_id: str  # "<period_id>-C000001" (charge) / "-P000001" (payout): the EndToEndId
    kind: Kind
    owner_id: str
    name: str
    currency: str
    minor_units: int
    micros: int  # minor_units in micros: what the line moves in the ledger
    booked_micros: int  # the period's debits (charge) or credits (payout)
    carry_in_micros: int
    carry_out_micros: int
    receipts: int
    rail: Rail
    note: str = ""  # a Note code when rail is manual
    detail: str = ""  # human detail of the note (names a field, never a secret)
    funding_ref: str = ""
    funding: Funding | None = None
    dd_sequence: str = "RCUR"

    def __post_init__(self) -> None:
        assert self.minor_units >= 1
        assert self.micros == self.minor_units * minor_unit_micros(self.currency)
        assert self.micros + self.carry_out_micros == self.booked_micros + self.carry_in_micros
        assert (self.rail == "manual") == bool(self.note)


@dataclass(frozen=True, slots=True, kw_only=True)
class Carry:
    """Micros below one minor unit left owed after this period: the next period's carry-in.
    There is one per balance, zero included, so a store may simply overwrite."""

    owner_id: str
    currency: str
    charge_micros: int
    payout_micros: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Totals:
    """One currency's sums over the period (micros), for the report and the CLI."""

    currency: str
    receipts: int
    debits_micros: int
    credits_micros: int
    charged_micros: int
    charge_lines: int
    charge_carry_in_micros: int
    charge_carry_out_micros: int
    paid_micros: int
    payout_lines: int
    payout_carry_in_micros: int
    payout_carry_out_micros: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SettlementPlan:
    period_id: str
    until_ms: int
    charges: tuple[Line, ...]
    payouts: tuple[Line, ...]
    carries: tuple[Carry, ...]
    totals: tuple[Totals, ...] = field(default=())

    def lines(self, *, kind: Kind | None = None, rail: Rail | None = None) -> tuple[Line, ...]:
        every = self.charges + self.payouts
        return tuple(
            x for x in every if (kind is None or x.kind == kind) and (rail in (None, x.rail))
        )

    def freed_credit(self) -> dict[tuple[str, str], int]:
        """Per (owner_id, currency), the credit settlement frees for new leases: what was
        charged. The carry stays owed, so it keeps counting against the credit limit."""
        return {(x.owner_id, x.currency): x.micros for x in self.charges}


def parse_funding_ref(ref: str) -> Funding:
    """Parse a party's funding reference. The grammar (docs/settlement.md):

    - ``card:TOKEN``: a card on file at the PSP (printable, no spaces, <= 128 characters);
    - ``sepa:IBAN:BIC``: an account that can receive credit transfers (BIC may be empty);
    - ``sepa:IBAN:BIC:YYYY-MM-DD:MANDATE``: plus a SEPA mandate signed on that date, so it
      can be direct-debited. The mandate id comes last: it may itself contain ``:``.

    IBAN and BIC are normalized (capitals, spaces removed), then checked for the rails."""
    scheme, _, rest = ref.partition(":")
    if scheme == "card":
        if not (1 <= len(rest) <= CARD_TOKEN_CHARS_MAX and rest.isprintable()) or " " in rest:
            raise SettlementError("funding.token: want 1..128 printable characters, no space")
        return CardToken(token=rest)
    if scheme != "sepa":
        raise SettlementError("funding_ref: unknown scheme (want sepa: or card:)")
    parts = rest.split(":", 3)
    if len(parts) not in (2, 4):
        raise SettlementError("funding_ref: want sepa:IBAN:BIC[:YYYY-MM-DD:MANDATE]")
    iban = check_iban(parts[0].replace(" ", "").upper(), field="funding.iban")
    bic = parts[1].replace(" ", "").upper() or None
    if bic is not None:
        check_bic(bic, field="funding.bic")
    if len(parts) == 2:
        return SepaAccount(iban=iban, bic=bic)
    check_date(parts[2], field="funding.mandate_signed")
    mandate = check_sepa_id(parts[3], field="funding.mandate_id")
    return SepaAccount(iban=iban, bic=bic, mandate_id=mandate, mandate_signed=parts[2])


def mask_funding_ref(ref: str) -> str:
    """What a log line may show of a funding reference: its scheme and last four characters
    of the account or token (``sepa:...3000``)."""
    scheme, _, rest = ref.partition(":")
    account = rest.split(":", 1)[0] if scheme == "sepa" else rest
    return f"{scheme}:...{account[-4:]}" if len(account) > 8 else f"{scheme}:..."


@dataclass(frozen=True, slots=True)
class _Route:
    rail: Rail
    note: str = ""
    detail: str = ""
    funding: Funding | None = None


def _route(party: Party | None, kind: Kind, currency: str, minor: int, end: date) -> _Route:
    """Choose the rail of one line (module docstring); never raises on the party's data."""
    if party is None:
        return _Route("manual", Note.NO_PARTY, "no party registered for this id")
    try:
        funding = parse_funding_ref(party.funding_ref)
    except FogpayError as exc:
        return _Route("manual", Note.BAD_FUNDING, str(exc))
    if isinstance(funding, CardToken):
        return _Route("card", funding=funding)
    if party.currency != SEPA_CURRENCY:
        return _Route("manual", Note.BAD_FUNDING, "a SEPA account's currency must be EUR")
    if currency != SEPA_CURRENCY:
        return _Route("manual", Note.NOT_SEPA_CURRENCY, f"SEPA carries EUR only, not {currency}")
    if minor > SEPA_AMOUNT_MINOR_MAX:
        return _Route("manual", Note.OVER_RAIL_MAX, "above 999999999.99 EUR")
    if kind == "charge":
        if funding.mandate_id is None or funding.mandate_signed is None:
            return _Route("manual", Note.NO_MANDATE, "the account has no SEPA mandate")
        if check_date(funding.mandate_signed) > end:
            return _Route("manual", Note.BAD_FUNDING, "mandate signed after the period's end")
    return _Route("sepa", funding=funding)


@dataclass(frozen=True, slots=True)
class _Side:
    """One side of a balance, rounded."""

    kind: Kind
    booked_micros: int
    carry_in_micros: int
    receipts: int
    rounded: Rounded


def _sides(b: Balance) -> tuple[_Side, _Side]:
    charge = round_to_minor(b.debit_micros, b.carry_in_micros, b.currency)
    payout = round_to_minor(b.credit_micros, b.credit_carry_in_micros, b.currency)
    return (
        _Side("charge", b.debit_micros, b.carry_in_micros, b.receipts, charge),
        _Side("payout", b.credit_micros, b.credit_carry_in_micros, b.credit_receipts, payout),
    )


def _line(
    b: Balance, side: _Side, number: int, *, period_id: str, party: Party | None, end: date
) -> Line | None:
    if side.rounded.minor_units == 0:
        return None
    route = _route(party, side.kind, b.currency, side.rounded.minor_units, end)
    return Line(
        line_id=f"{period_id}-{'C' if side.kind == 'charge' else 'P'}{number:06d}",
        kind=side.kind,
        owner_id=b.owner_id,
        name=party.name if party is not None else b.owner_id,
        currency=b.currency,
        minor_units=side.rounded.minor_units,
        micros=side.rounded.charged_micros(b.currency),
        booked_micros=side.booked_micros,
        carry_in_micros=side.carry_in_micros,
        carry_out_micros=side.rounded.carry_micros,
        receipts=side.receipts,
        rail=route.rail,
        note=route.note,
        detail=route.detail,
        funding_ref=party.funding_ref if party is not None else "",
        funding=route.funding,
        dd_sequence=party.dd_sequence if party is not None else "RCUR",
    )


def _check_inputs(period_id: str, until_ms: int, balances: Sequence[Balance]) -> None:
    check_sepa_id(period_id, field="period_id", max_len=PERIOD_ID_CHARS_MAX)
    assert type(until_ms) is int and until_ms >= 0
    keys = {(b.owner_id, b.currency) for b in balances}
    assert len(keys) == len(balances), "one balance per owner and currency"
    for currency in sorted({b.currency for b in balances}):
        try:
            minor_unit_micros(currency)
        except UnknownCurrency as exc:
            raise SettlementError(f"currency {currency}: no known minor unit") from exc
    if len(balances) > PLAN_LINES_MAX:
        raise SettlementError(f"more than {PLAN_LINES_MAX} balances in one period")


def plan_period(
    *,
    period_id: str,
    until_ms: int,
    balances: Sequence[Balance],
    parties: Mapping[str, Party],
) -> SettlementPlan:
    """Plan the period ending at ``until_ms``: one charge per owner and currency, one payout
    per payee and currency, each rounded down to the minor unit with the remainder carried;
    zero lines omitted; lines sorted by (currency, owner_id), so the same balances in any
    order give the same plan. ``period_id``: a SEPA identifier of at most 24 characters
    (letters, digits, ``/ - ? : ( ) . , ' +``), unique per period."""
    _check_inputs(period_id, until_ms, balances)
    end = (_EPOCH + timedelta(milliseconds=until_ms)).date()
    ordered = sorted(balances, key=lambda b: (b.currency, b.owner_id))
    charges: list[Line] = []
    payouts: list[Line] = []
    carries: list[Carry] = []
    for b in ordered:
        party = parties.get(b.owner_id)
        charge, payout = _sides(b)
        for side, out in ((charge, charges), (payout, payouts)):
            line = _line(b, side, len(out) + 1, period_id=period_id, party=party, end=end)
            if line is not None:
                out.append(line)
        carries.append(
            Carry(
                owner_id=b.owner_id,
                currency=b.currency,
                charge_micros=charge.rounded.carry_micros,
                payout_micros=payout.rounded.carry_micros,
            )
        )
    return SettlementPlan(
        period_id=period_id,
        until_ms=until_ms,
        charges=tuple(charges),
        payouts=tuple(payouts),
        carries=tuple(carries),
        totals=_totals(ordered, charges, payouts, carries),
    )


def _totals(
    balances: Sequence[Balance],
    charges: Sequence[Line],
    payouts: Sequence[Line],
    carries: Sequence[Carry],
) -> tuple[Totals, ...]:
    out = []
    for cur in sorted({b.currency for b in balances}):
        bs = [b for b in balances if b.currency == cur]
        cs = [x for x in charges if x.currency == cur]
        ps = [x for x in payouts if x.currency == cur]
        cos = [c for c in carries if c.currency == cur]
        totals = Totals(
            currency=cur,
            receipts=sum(b.receipts for b in bs),
            debits_micros=sum(b.debit_micros for b in bs),
            credits_micros=sum(b.credit_micros for b in bs),
            charged_micros=sum(x.micros for x in cs),
            charge_lines=len(cs),
            charge_carry_in_micros=sum(b.carry_in_micros for b in bs),
            charge_carry_out_micros=sum(c.charge_micros for c in cos),
            paid_micros=sum(x.micros for x in ps),
            payout_lines=len(ps),
            payout_carry_in_micros=sum(b.credit_carry_in_micros for b in bs),
            payout_carry_out_micros=sum(c.payout_micros for c in cos),
        )
        assert _charge_delta(totals) == 0 and _payout_delta(totals) == 0, totals
        out.append(totals)
    return tuple(out)


def _charge_delta(t: Totals) -> int:
    """Zero when charged + carry_out == debits + carry_in (nothing created or lost)."""
    return t.charged_micros + t.charge_carry_out_micros - t.debits_micros - t.charge_carry_in_micros


def _payout_delta(t: Totals) -> int:
    return t.paid_micros + t.payout_carry_out_micros - t.credits_micros - t.payout_carry_in_micros


Amounts = int | Mapping[str, int]


def reconcile(
    plan: SettlementPlan,
    *,
    receipts_total_micros: Amounts,
    ledger_debits_micros: Amounts,
    ledger_credits_micros: Amounts,
    escrow_in_micros: Amounts | None = None,
    escrow_out_micros: Amounts | None = None,
) -> dict[str, Any]:
    """The period's reconciliation report (JSON-ready): device receipts = ledger movements =
    settlement lines + carry delta, per currency.

    Voucher escrow (docs/protocol.md 18.3): what the period's debits put into the escrow
    (``escrow_in``: voucher intents) is not paid out; what left it (``escrow_out``: d2d
    payments to their payees, unspent escrow returned to owners) is, so double entry reads
    ``debits == credits + escrow_in - escrow_out``. Both default to nothing.

    Pass per-currency mappings (``{"EUR": micros}``); a plain int is compared with the sum
    over all currencies (a weaker check, exact only for a single-currency period). The plan's
    own identities (lines + carry_out == booked + carry_in) are asserted when the plan is
    built; the external equalities are flagged: ``report["balanced"]`` is False and
    ``report["mismatches"]`` names each one that fails."""
    sides = {
        "receipts": receipts_total_micros,
        "ledger_debits": ledger_debits_micros,
        "ledger_credits": ledger_credits_micros,
        "escrow_in": _zero_like(escrow_in_micros, receipts_total_micros),
        "escrow_out": _zero_like(escrow_out_micros, receipts_total_micros),
    }
    per_currency = all(isinstance(v, Mapping) for v in sides.values())
    assert per_currency or all(isinstance(v, int) for v in sides.values()), "mixed forms"
    scopes = [t.currency for t in plan.totals] if per_currency else ["*"]
    if per_currency:
        extra = set().union(*(set(v) for v in sides.values() if isinstance(v, Mapping)))
        scopes = sorted(set(scopes) | extra)
    rows = [_reconcile_scope(plan, scope, sides) for scope in scopes]
    mismatches = [f"{row['currency']}: {m}" for row in rows for m in row["mismatches"]]
    return {
        "period_id": plan.period_id,
        "until_ms": plan.until_ms,
        "scope": "per_currency" if per_currency else "all_currencies",
        "balanced": not mismatches,
        "mismatches": mismatches,
        "currencies": rows,
    }


def _zero_like(given: Amounts | None, like: Amounts) -> Amounts:
    if given is not None:
        return given
    return {} if isinstance(like, Mapping) else 0


def _scope_totals(plan: SettlementPlan, scope: str) -> Totals:
    chosen = [t for t in plan.totals if scope in ("*", t.currency)]
    sums = {
        name: sum(getattr(t, name) for t in chosen)
        for name in Totals.__dataclass_fields__
        if name != "currency"
    }
    return Totals(currency=scope, **sums)


def _reconcile_scope(
    plan: SettlementPlan, scope: str, sides: Mapping[str, Amounts]
) -> dict[str, Any]:
    t = _scope_totals(plan, scope)
    given = {name: (v.get(scope, 0) if isinstance(v, Mapping) else v) for name, v in sides.items()}
    checks = {
        "receipts_eq_ledger_debits": given["receipts"] == given["ledger_debits"],
        "ledger_debits_eq_ledger_credits": given["ledger_debits"]
        == given["ledger_credits"] + given["escrow_in"] - given["escrow_out"],
        "ledger_debits_eq_plan_debits": given["ledger_debits"] == t.debits_micros,
        "ledger_credits_eq_plan_credits": given["ledger_credits"] == t.credits_micros,
        "charges_eq_debits_plus_carry_delta": _charge_delta(t) == 0,
        "payouts_eq_credits_plus_carry_delta": _payout_delta(t) == 0,
    }
    return {
        "currency": scope,
        "receipts": t.receipts,
        "receipts_micros": given["receipts"],
        "ledger_debits_micros": given["ledger_debits"],
        "ledger_credits_micros": given["ledger_credits"],
        "escrow_in_micros": given["escrow_in"],
        "escrow_out_micros": given["escrow_out"],
        "plan_debits_micros": t.debits_micros,
        "plan_credits_micros": t.credits_micros,
        "charged_micros": t.charged_micros,
        "charge_lines": t.charge_lines,
        "charge_carry_in_micros": t.charge_carry_in_micros,
        "charge_carry_out_micros": t.charge_carry_out_micros,
        "paid_micros": t.paid_micros,
        "payout_lines": t.payout_lines,
        "payout_carry_in_micros": t.payout_carry_in_micros,
        "payout_carry_out_micros": t.payout_carry_out_micros,
        "checks": checks,
        "mismatches": sorted(name for name, ok in checks.items() if not ok),
    }
