"""Properties of settlement planning: no micro is created or lost, over chained periods too.

Payments are generated as (payer, payee, currency, amount) and booked the way the ledger
does (a debit of the payer, a credit of the payee), then settled period after period with
each period's carries fed into the next.
"""

import random
from collections import Counter, defaultdict
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.settlement import Balance, Party, SettlementPlan, plan_period, reconcile
from protocol.money import minor_unit_micros

OWNERS = ("amy", "bob", "cy", "dan", "eve")
CURRENCIES = ("EUR", "JPY", "BHD", "USD")
PARTIES = {
    "amy": Party(
        owner_id="amy",
        name="Amy",
        currency="EUR",
        funding_ref="sepa:DE89370400440532013000::2024-01-15:M-amy",
    ),
    "bob": Party(owner_id="bob", name="Bob", currency="USD", funding_ref="card:tok_bob"),
    "cy": Party(owner_id="cy", name="Cy", currency="EUR", funding_ref="sepa:NL91ABNA0417164300:"),
}  # dan and eve have no party: their lines go manual, and must add up all the same

Payment = tuple[str, str, str, int]
payments = st.tuples(
    st.sampled_from(OWNERS),
    st.sampled_from(OWNERS),
    st.sampled_from(CURRENCIES),
    st.one_of(st.integers(1, 20_000), st.integers(1, 2**53)),  # sub-cent and huge amounts
)
periods = st.lists(st.lists(payments, max_size=25), min_size=1, max_size=6)

Key = tuple[str, str]  # owner_id, currency


def book(
    batch: Sequence[Payment], carry: dict[Key, tuple[int, int]]
) -> tuple[list[Balance], Counter[str]]:
    debit: Counter[Key] = Counter()
    credit: Counter[Key] = Counter()
    count: Counter[Key] = Counter()
    received: Counter[Key] = Counter()
    per_currency: Counter[str] = Counter()
    for payer, payee, currency, amount in batch:
        debit[payer, currency] += amount
        credit[payee, currency] += amount
        count[payer, currency] += 1
        received[payee, currency] += 1
        per_currency[currency] += amount
    keys = set(debit) | set(credit) | {k for k, v in carry.items() if v != (0, 0)}
    balances = [
        Balance(
            owner_id=owner,
            currency=currency,
            debit_micros=debit[owner, currency],
            credit_micros=credit[owner, currency],
            carry_in_micros=carry.get((owner, currency), (0, 0))[0],
            receipts=count[owner, currency],
            credit_carry_in_micros=carry.get((owner, currency), (0, 0))[1],
            credit_receipts=received[owner, currency],
        )
        for owner, currency in keys
    ]
    return balances, per_currency


def settle(n: int, balances: list[Balance]) -> SettlementPlan:
    return plan_period(
        period_id=f"P{n}", until_ms=1_795_000_000_000 + n, balances=balances, parties=PARTIES
    )


@settings(max_examples=150, deadline=None)
@given(periods)
def test_nothing_is_created_or_lost_over_chained_periods(batches: list[list[Payment]]) -> None:
    carry: dict[Key, tuple[int, int]] = {}
    booked_debit: Counter[Key] = Counter()
    booked_credit: Counter[Key] = Counter()
    charged: Counter[Key] = Counter()
    paid: Counter[Key] = Counter()
    for n, batch in enumerate(batches):
        balances, _ = book(batch, carry)
        plan = settle(n, balances)
        for b in balances:
            booked_debit[b.owner_id, b.currency] += b.debit_micros
            booked_credit[b.owner_id, b.currency] += b.credit_micros
        for line in plan.charges:
            charged[line.owner_id, line.currency] += line.micros
        for line in plan.payouts:
            paid[line.owner_id, line.currency] += line.micros
        carry = {(c.owner_id, c.currency): (c.charge_micros, c.payout_micros) for c in plan.carries}
        for (owner, currency), (c_out, p_out) in carry.items():
            unit = minor_unit_micros(currency)
            assert 0 <= c_out < unit and 0 <= p_out < unit
            # never charged or paid a micro more than booked so far, at any period's end
            assert charged[owner, currency] + c_out == booked_debit[owner, currency]
            assert paid[owner, currency] + p_out == booked_credit[owner, currency]
    # and every (owner, currency) that ever booked anything has its carry accounted for
    for key in set(booked_debit) | set(booked_credit):
        c_out, p_out = carry.get(key, (0, 0))
        assert charged[key] + c_out == booked_debit[key]
        assert paid[key] + p_out == booked_credit[key]


@settings(max_examples=100, deadline=None)
@given(st.lists(payments, max_size=40), st.randoms(use_true_random=False))
def test_each_period_reconciles_and_lines_obey_the_rounding_identity(
    batch: list[Payment], rnd: random.Random
) -> None:
    balances, per_currency = book(batch, {})
    plan = settle(1, balances)
    for line in plan.lines():
        unit = minor_unit_micros(line.currency)
        assert line.micros == line.minor_units * unit and line.minor_units >= 1
        assert line.micros + line.carry_out_micros == line.booked_micros + line.carry_in_micros
        assert 0 <= line.carry_out_micros < unit
    report = reconcile(
        plan,
        receipts_total_micros=dict(per_currency),
        ledger_debits_micros=dict(per_currency),
        ledger_credits_micros=dict(per_currency),
    )
    assert report["balanced"], report["mismatches"]
    assert sum(row["receipts"] for row in report["currencies"]) == len(batch)
    shuffled = balances[:]
    rnd.shuffle(shuffled)
    assert settle(1, shuffled) == plan


@settings(max_examples=50, deadline=None)
@given(st.lists(payments, min_size=1, max_size=20), st.integers(1, 10**6))
def test_a_ledger_off_by_any_amount_does_not_reconcile(batch: list[Payment], off: int) -> None:
    balances, per_currency = book(batch, {})
    plan = settle(1, balances)
    currency = batch[0][2]
    ledger = defaultdict(int, per_currency)
    ledger[currency] += off
    report = reconcile(
        plan,
        receipts_total_micros=dict(per_currency),
        ledger_debits_micros=dict(ledger),
        ledger_credits_micros=dict(ledger),
    )
    assert report["balanced"] is False
    assert f"{currency}: receipts_eq_ledger_debits" in report["mismatches"]
    assert f"{currency}: ledger_debits_eq_plan_debits" in report["mismatches"]
