"""Settlement planning (cloud/settlement.py): rounding, carries, rails, reconciliation."""

import json
import random

import pytest

from cloud.sepa import SepaError
from cloud.settlement import (
    Balance,
    CardToken,
    Note,
    Party,
    SepaAccount,
    SettlementError,
    SettlementPlan,
    mask_funding_ref,
    parse_funding_ref,
    plan_period,
    reconcile,
)

UNTIL_MS = 1_795_000_000_000  # 2026-11-18 11:06:40 UTC
ALICE_REF = "sepa:DE89370400440532013000:COBADEFFXXX:2024-01-15:MANDATE-alice/1"


def party(owner_id: str, ref: str = ALICE_REF, *, currency: str = "EUR") -> Party:
    return Party(owner_id=owner_id, name=owner_id.title(), currency=currency, funding_ref=ref)


def bal(owner_id: str, currency: str = "EUR", debit: int = 0, **kw: int) -> Balance:
    return Balance(
        owner_id=owner_id,
        currency=currency,
        debit_micros=debit,
        credit_micros=kw.get("credit", 0),
        carry_in_micros=kw.get("carry", 0),
        receipts=kw.get("receipts", 1 if debit else 0),
        credit_carry_in_micros=kw.get("credit_carry", 0),
        credit_receipts=kw.get("credit_receipts", 0),
    )


def plan(*balances: Balance, parties: dict[str, Party] | None = None) -> SettlementPlan:
    if parties is None:
        parties = {b.owner_id: party(b.owner_id) for b in balances}
    return plan_period(period_id="P2026-11", until_ms=UNTIL_MS, balances=balances, parties=parties)


@pytest.mark.parametrize(
    ("currency", "debit", "carry", "minor", "carry_out"),
    [
        ("EUR", 12_345_678, 5_000, 1235, 678),  # cent = 10,000 micros
        ("JPY", 2_500_000, 0, 2, 500_000),  # yen = 1,000,000 micros
        ("BHD", 1_234_567, 0, 1234, 567),  # fils = 1,000 micros
        ("EUR", 10_000, 0, 1, 0),
    ],
)
def test_charge_is_rounded_down_and_remainder_carried(
    currency: str, debit: int, carry: int, minor: int, carry_out: int
) -> None:
    p = plan(bal("alice", currency, debit, carry=carry), parties={})
    (line,) = p.charges
    assert (line.minor_units, line.carry_out_micros) == (minor, carry_out)
    assert line.micros + line.carry_out_micros == debit + carry
    (c,) = p.carries
    assert (c.owner_id, c.currency, c.charge_micros) == ("alice", currency, carry_out)


def test_a_line_below_one_minor_unit_is_omitted_and_carried_until_it_adds_up() -> None:
    first = plan(bal("alice", debit=6_000))
    assert first.charges == () and first.carries[0].charge_micros == 6_000
    second = plan(bal("alice", debit=6_000, carry=first.carries[0].charge_micros))
    (line,) = second.charges
    assert (line.minor_units, line.carry_out_micros) == (1, 2_000)


def test_payouts_follow_the_same_rule_and_sides_are_not_netted() -> None:
    p = plan(bal("shop", debit=30_000, credit=1_239_999, credit_carry=1, credit_receipts=7))
    (charge,) = p.charges
    (payout,) = p.payouts
    assert (charge.kind, charge.minor_units) == ("charge", 3)
    assert (payout.kind, payout.minor_units, payout.carry_out_micros) == ("payout", 124, 0)
    assert payout.receipts == 7
    assert p.carries[0].payout_micros == 0


def test_lines_are_sorted_and_numbered_whatever_the_input_order() -> None:
    balances = [
        bal("zed", "EUR", 50_000),
        bal("amy", "USD", 70_000),
        bal("bob", "EUR", 20_000, credit=40_000),
        bal("amy", "EUR", 90_000, credit=90_000),
    ]
    expected = plan(*balances)
    for seed in range(5):
        shuffled = balances[:]
        random.Random(seed).shuffle(shuffled)
        assert plan(*shuffled) == expected
    assert [(x.line_id, x.currency, x.owner_id) for x in expected.charges] == [
        ("P2026-11-C000001", "EUR", "amy"),
        ("P2026-11-C000002", "EUR", "bob"),
        ("P2026-11-C000003", "EUR", "zed"),
        ("P2026-11-C000004", "USD", "amy"),
    ]
    assert [x.line_id for x in expected.payouts] == ["P2026-11-P000001", "P2026-11-P000002"]


@pytest.mark.parametrize(
    ("ref", "currency", "kind", "rail", "note"),
    [
        (ALICE_REF, "EUR", "charge", "sepa", ""),
        ("card:tok_visa_4242", "USD", "charge", "card", ""),
        ("card:tok_visa_4242", "EUR", "payout", "card", ""),
        ("sepa:NL91ABNA0417164300:", "EUR", "charge", "manual", Note.NO_MANDATE),
        ("sepa:NL91ABNA0417164300:", "EUR", "payout", "sepa", ""),
        (ALICE_REF, "USD", "charge", "manual", Note.NOT_SEPA_CURRENCY),
        ("sepa:DE89370400440532013001:", "EUR", "payout", "manual", Note.BAD_FUNDING),
        ("sepa:DE89370400440532013000::2026-11-19:M1", "EUR", "charge", "manual", "bad_funding"),
        ("iban:DE89370400440532013000", "EUR", "charge", "manual", Note.BAD_FUNDING),
    ],
)
def test_each_line_is_routed_to_a_rail(
    ref: str, currency: str, kind: str, rail: str, note: str
) -> None:
    amount = {"debit": 1_000_000} if kind == "charge" else {"credit": 1_000_000}
    p = plan(bal("alice", currency, **amount), parties={"alice": party("alice", ref)})
    (line,) = p.lines()
    assert (line.kind, line.rail, line.note) == (kind, rail, note)
    assert (line.funding is None) == (rail == "manual")


def test_a_manual_line_says_why_without_leaking_the_account() -> None:
    p = plan(bal("alice", credit=1_000_000), parties={"alice": party("alice", "sepa:DE00x:")})
    (line,) = p.payouts
    assert line.note == Note.BAD_FUNDING and "funding.iban" in line.detail
    assert "DE00x" not in line.detail


def test_an_owner_without_party_is_settled_on_the_manual_rail() -> None:
    p = plan(bal("ghost", debit=2_000_000), parties={})
    (line,) = p.charges
    assert (line.rail, line.note, line.name, line.funding_ref) == (
        "manual",
        "no_party",
        "ghost",
        "",
    )


def test_an_amount_above_the_sepa_maximum_goes_manual() -> None:
    p = plan(bal("alice", debit=1_000_000_000 * 1_000_000))
    assert p.charges[0].note == Note.OVER_RAIL_MAX


def test_freed_credit_is_what_was_charged_and_the_carry_stays_owed() -> None:
    p = plan(bal("alice", debit=12_345_678), bal("bob", debit=9_999))
    assert p.freed_credit() == {("alice", "EUR"): 12_340_000}


@pytest.mark.parametrize("period_id", ["", "P" * 25, "period_3", "p 3", "/p3", "période"])
def test_period_ids_that_cannot_make_sepa_end_to_end_ids_are_refused(period_id: str) -> None:
    with pytest.raises(SepaError) as err:
        plan_period(period_id=period_id, until_ms=UNTIL_MS, balances=[], parties={})
    assert err.value.field == "period_id"


def test_a_currency_without_known_minor_unit_is_refused() -> None:
    with pytest.raises(SettlementError, match="XTS"):
        plan(bal("alice", "XTS", 1_000_000))


def test_caller_bugs_are_assertions() -> None:
    with pytest.raises(AssertionError):
        plan(bal("alice", debit=1), bal("alice", debit=2))
    with pytest.raises(AssertionError):
        bal("alice", debit=-1)


def test_funding_refs_parse_and_normalize() -> None:
    assert parse_funding_ref("sepa:de89 3704 0044 0532 0130 00:cobadeff") == SepaAccount(
        iban="DE89370400440532013000", bic="COBADEFF"
    )
    assert parse_funding_ref("sepa:NL91ABNA0417164300::2024-02-01:M:1/2") == SepaAccount(
        iban="NL91ABNA0417164300", mandate_id="M:1/2", mandate_signed="2024-02-01"
    )
    assert parse_funding_ref("card:tok_1") == CardToken(token="tok_1")
    for bad in ("card:", "card:a b", "sepa:NL91ABNA0417164300", "sepa:X:Y:Z", "paypal:x"):
        with pytest.raises(SettlementError):
            parse_funding_ref(bad)
    with pytest.raises(SepaError, match=r"funding\.mandate_signed"):
        parse_funding_ref("sepa:NL91ABNA0417164300::2024-13-01:M1")


def test_masked_funding_refs_keep_only_four_characters() -> None:
    assert mask_funding_ref(ALICE_REF) == "sepa:...3000"
    assert mask_funding_ref("card:tok_visa_4242") == "card:...4242"
    assert mask_funding_ref("card:short") == "card:..."


def _two_currency_plan() -> SettlementPlan:
    return plan(
        bal("alice", "EUR", 12_345_678, carry=5_000),
        bal("shop", "EUR", credit=12_345_678),
        bal("carl", "USD", 2_000_001),
        bal("shop", "USD", credit=2_000_001),
    )


def test_reconcile_balances_per_currency() -> None:
    p = _two_currency_plan()
    amounts = {"EUR": 12_345_678, "USD": 2_000_001}
    report = reconcile(
        p,
        receipts_total_micros=amounts,
        ledger_debits_micros=amounts,
        ledger_credits_micros=amounts,
    )
    assert report["balanced"] is True and report["mismatches"] == []
    eur = report["currencies"][0]
    assert eur["currency"] == "EUR"
    assert eur["charged_micros"] + eur["charge_carry_out_micros"] == 12_345_678 + 5_000
    assert eur["paid_micros"] + eur["payout_carry_out_micros"] == 12_345_678
    assert json.loads(json.dumps(report)) == report


@pytest.mark.parametrize(
    ("receipts", "debits", "credits", "failed"),
    [
        (12_345_679, 12_345_678, 12_345_678, "EUR: receipts_eq_ledger_debits"),
        (12_345_678, 12_345_678, 12_345_677, "EUR: ledger_credits_eq_plan_credits"),
        (12_345_677, 12_345_677, 12_345_677, "EUR: ledger_debits_eq_plan_debits"),
    ],
)
def test_reconcile_flags_each_mismatch(
    receipts: int, debits: int, credits: int, failed: str
) -> None:
    p = _two_currency_plan()
    usd = 2_000_001
    report = reconcile(
        p,
        receipts_total_micros={"EUR": receipts, "USD": usd},
        ledger_debits_micros={"EUR": debits, "USD": usd},
        ledger_credits_micros={"EUR": credits, "USD": usd},
    )
    assert report["balanced"] is False
    assert failed in report["mismatches"]
    assert not any(m.startswith("USD") for m in report["mismatches"])


def test_reconcile_flags_a_currency_the_plan_never_saw() -> None:
    p = _two_currency_plan()
    amounts = {"EUR": 12_345_678, "USD": 2_000_001, "GBP": 5}
    report = reconcile(
        p,
        receipts_total_micros=amounts,
        ledger_debits_micros=amounts,
        ledger_credits_micros=amounts,
    )
    assert report["balanced"] is False
    assert "GBP: ledger_debits_eq_plan_debits" in report["mismatches"]


def test_reconcile_with_plain_ints_compares_sums_over_currencies() -> None:
    p = _two_currency_plan()
    total = 12_345_678 + 2_000_001
    report = reconcile(
        p, receipts_total_micros=total, ledger_debits_micros=total, ledger_credits_micros=total
    )
    assert report["scope"] == "all_currencies" and report["balanced"] is True
    off = reconcile(
        p, receipts_total_micros=total, ledger_debits_micros=total, ledger_credits_micros=total - 1
    )
    assert off["balanced"] is False


def test_a_sepa_account_must_be_in_eur() -> None:
    usd_account = party("alice", "sepa:NL91ABNA0417164300:", currency="USD")
    p = plan(bal("alice", credit=1_000_000), parties={"alice": usd_account})
    assert (p.payouts[0].rail, p.payouts[0].note) == ("manual", Note.BAD_FUNDING)
