"""The store side of settlement: close a period, plan it (``cloud.settlement``), book it.

``close_period`` runs in one transaction: it takes every booked transfer with no period and
``booked_ms <= until_ms``, sums it per (owner, currency) on both sides with the carries of
the previous period, asks ``plan_period`` for the lines, marks the transfers with the period,
stores the lines, overwrites the carries and stores the reconciliation report. Settled
transfers stop counting against their owner's credit (``cloud.leases.exposure``); the carry
keeps counting. The report's "receipts" side is summed from the intents in the stored
records (decoded again, not from the transfers table), so it is an independent count.

The ledger's accounts are not moved by settlement: they hold everything ever booked, and a
period is the set of transfers marked with it (docs/cloud.md), with the escrow moves of
device-to-device payments (docs/protocol.md 18.3) marked in ``escrow_settled``: a voucher
intent charges its owner like any payment but pays nobody (its credit is the escrow account
``voucher``); each d2d payment booked from the escrow is paid out to its payee, and each
returned escrow back to its owner, in the period that takes it.
"""

import json
from dataclasses import dataclass
from typing import Any, Final

from cloud.settlement import Balance, Party, SettlementPlan, plan_period, reconcile
from cloud.store import Tx
from cloud.vouchers import ESCROW_ACCOUNT
from protocol import limits
from protocol.batch import decode_record
from protocol.errors import FogpayError
from protocol.messages import Intent, decode_body
from protocol.signing import split_envelope

PERIOD_TRANSFERS_MAX: Final = 5_000_000


class PeriodError(FogpayError):
    pass


@dataclass(frozen=True, slots=True)
class Closed:
    plan: SettlementPlan
    report: dict[str, Any]


async def _parties(tx: Tx) -> dict[str, Party]:
    rows = await tx.fetchall("SELECT owner_id, name, currency, funding_ref FROM owners")
    return {r[0]: Party(owner_id=r[0], name=r[1], currency=r[2], funding_ref=r[3]) for r in rows}


# the escrow moves a period pays out (docs/protocol.md 18.3): d2d payments to their payees,
# unspent escrow back to its owner; (kind in escrow_settled, table, id, party, time column)
_ESCROW_OUT: Final = (
    ("payment", "voucher_payments", "payment_id", "payee", "booked_ms"),
    ("return", "voucher_returns", "voucher_id", "owner_id", "returned_ms"),
)


async def _mark_escrow(tx: Tx, period_id: str, until_ms: int) -> None:
    """The escrow moves booked up to ``until_ms`` and in no period yet join this one."""
    for kind, table, key, _, at in _ESCROW_OUT:
        await tx.execute(
            f"INSERT INTO escrow_settled (kind, ref, period) SELECT ?, m.{key}, ? "
            f"FROM {table} m WHERE m.{at} <= ? AND NOT EXISTS (SELECT 1 FROM escrow_settled "
            f"e WHERE e.kind = ? AND e.ref = m.{key})",
            (kind, period_id, until_ms, kind),
        )


async def _escrow_out(tx: Tx, period_id: str) -> list[tuple[str, str, int, int]]:
    """(party, currency, count, micros) of the period's escrow moves, both kinds."""
    out = []
    for kind, table, key, party, _ in _ESCROW_OUT:
        rows = await tx.fetchall(
            f"SELECT m.{party}, m.currency, COUNT(*), CAST(SUM(m.amount_micros) AS BIGINT) "
            f"FROM {table} m JOIN escrow_settled e ON e.kind = ? AND e.ref = m.{key} "
            f"WHERE e.period = ? GROUP BY m.{party}, m.currency",
            (kind, period_id),
        )
        out += [(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows]
    return out


async def _balances(tx: Tx, period_id: str) -> list[Balance]:
    """Per party and currency: its debits (payments its devices made), its credits (payments
    it received; for the escrow account ``voucher``, nothing: what went into the escrow is
    paid out only as it leaves, to d2d payees and back to owners)."""
    sides: dict[tuple[str, str], dict[str, int]] = {}
    for col, n_key, sum_key in (
        ("debit", "receipts", "debit"),
        ("credit", "credit_receipts", "credit"),
    ):
        rows = await tx.fetchall(
            f"SELECT {col}, currency, COUNT(*), CAST(SUM(amount_micros) AS BIGINT) "
            f"FROM transfers WHERE period = ? AND {col} <> ? GROUP BY {col}, currency",
            (period_id, ESCROW_ACCOUNT),
        )
        for account, currency, n, total in rows:
            side = sides.setdefault((account, currency), {})
            side[n_key], side[sum_key] = int(n), int(total)
    for account, currency, n, total in await _escrow_out(tx, period_id):
        side = sides.setdefault((account, currency), {})
        side["credit_receipts"] = side.get("credit_receipts", 0) + n
        side["credit"] = side.get("credit", 0) + total
    carries = await tx.fetchall(
        "SELECT owner_id, currency, charge_micros, payout_micros FROM carries"
    )
    for owner_id, currency, charge, payout in carries:
        side = sides.setdefault((owner_id, currency), {})
        side["carry"], side["credit_carry"] = int(charge), int(payout)
    return [
        Balance(
            owner_id=owner_id,
            currency=currency,
            debit_micros=s.get("debit", 0),
            credit_micros=s.get("credit", 0),
            carry_in_micros=s.get("carry", 0),
            receipts=s.get("receipts", 0),
            credit_carry_in_micros=s.get("credit_carry", 0),
            credit_receipts=s.get("credit_receipts", 0),
        )
        for (owner_id, currency), s in sorted(sides.items())
    ]


async def _receipts_total(tx: Tx, period_id: str) -> dict[str, int]:
    """Per currency, the amounts of the period's intents, decoded from the stored records."""
    rows = await tx.fetchall(
        "SELECT r.record FROM transfers t JOIN records r ON r.fog_id = t.fog_id "
        "AND r.number = t.number AND r.position = t.position WHERE t.period = ?",
        (period_id,),
    )
    # booked from a device's upload and in no batch yet (docs/protocol.md 17.8)
    rows += await tx.fetchall(
        "SELECT h.record FROM transfers t JOIN held_records h ON h.intent_id = t.intent_id "
        "WHERE t.period = ? AND t.number = 0",
        (period_id,),
    )
    out: dict[str, int] = {}
    for (record,) in rows:
        intent_env, _ = decode_record(bytes(record))
        env = split_envelope(intent_env, bytes_max=limits.INTENT_ENVELOPE_BYTES_MAX)
        intent = decode_body(Intent, env.body)
        out[intent.currency] = out.get(intent.currency, 0) + intent.amount_micros
    return out


@dataclass(frozen=True, slots=True)
class _Sides:
    debits: dict[str, int]
    credits: dict[str, int]  # paid out: to payees other than the escrow, and out of it
    escrow_in: dict[str, int]
    escrow_out: dict[str, int]


async def _ledger_sides(tx: Tx, period_id: str) -> _Sides:
    rows = await tx.fetchall(
        "SELECT currency, CAST(SUM(amount_micros) AS BIGINT) FROM transfers "
        "WHERE period = ? GROUP BY currency",
        (period_id,),
    )
    debits = {r[0]: int(r[1]) for r in rows}
    # every transfer has exactly one debit and one credit leg of the same amount; the credit
    # side is summed over the accounts credited, as the ledger keeps them
    credit_rows = await tx.fetchall(
        "SELECT currency, credit, CAST(SUM(amount_micros) AS BIGINT) FROM transfers "
        "WHERE period = ? GROUP BY currency, credit",
        (period_id,),
    )
    credits: dict[str, int] = {}
    escrow_in: dict[str, int] = {}
    for currency, account, total in credit_rows:
        into = escrow_in if account == ESCROW_ACCOUNT else credits
        into[currency] = into.get(currency, 0) + int(total)
    escrow_out: dict[str, int] = {}
    for _, currency, _, total in await _escrow_out(tx, period_id):
        escrow_out[currency] = escrow_out.get(currency, 0) + total
        credits[currency] = credits.get(currency, 0) + total
    return _Sides(debits, credits, escrow_in, escrow_out)


async def close_period(tx: Tx, *, period_id: str, until_ms: int, now_ms: int) -> Closed:
    if await tx.fetchone("SELECT 1 FROM periods WHERE period_id = ?", (period_id,)):
        raise PeriodError(f"period {period_id!r} already closed")
    n = await tx.execute(
        "UPDATE transfers SET period = ? WHERE period IS NULL AND booked_ms <= ?",
        (period_id, until_ms),
    )
    if n > PERIOD_TRANSFERS_MAX:
        raise PeriodError(f"{n} transfers in one period > {PERIOD_TRANSFERS_MAX}: settle oftener")
    await _mark_escrow(tx, period_id, until_ms)
    plan = plan_period(
        period_id=period_id,
        until_ms=until_ms,
        balances=await _balances(tx, period_id),
        parties=await _parties(tx),
    )
    sides = await _ledger_sides(tx, period_id)
    report = reconcile(
        plan,
        receipts_total_micros=await _receipts_total(tx, period_id),
        ledger_debits_micros=sides.debits,
        ledger_credits_micros=sides.credits,
        escrow_in_micros=sides.escrow_in,
        escrow_out_micros=sides.escrow_out,
    )
    await _book(tx, plan, report, now_ms)
    return Closed(plan, report)


async def _book(tx: Tx, plan: SettlementPlan, report: dict[str, Any], now_ms: int) -> None:
    await tx.executemany(
        "INSERT INTO settlement_lines (line_id, period_id, kind, owner_id, currency, micros, "
        "rail, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (x.line_id, plan.period_id, x.kind, x.owner_id, x.currency, x.micros, x.rail, x.note)
            for x in plan.lines()
        ],
    )
    await tx.executemany(
        "INSERT INTO carries (owner_id, currency, charge_micros, payout_micros) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (owner_id, currency) DO UPDATE SET "
        "charge_micros = excluded.charge_micros, payout_micros = excluded.payout_micros",
        [(c.owner_id, c.currency, c.charge_micros, c.payout_micros) for c in plan.carries],
    )
    await tx.execute(
        "INSERT INTO periods (period_id, until_ms, created_ms, report) VALUES (?, ?, ?, ?)",
        (plan.period_id, plan.until_ms, now_ms, json.dumps(report, sort_keys=True)),
    )
