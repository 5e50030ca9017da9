"""Device-to-device payments handed in (docs/protocol.md 18.3): the cloud's part.

A voucher is an intent to the reserved payee ``voucher``, booked like any record (15.3): a
transfer from the owner to the account ``voucher``, the **escrow**, drawn on the fog's lease.
A payee hands in each ``d2d`` payment with its voucher, as the held record ``[vch, d2d]`` in a
``held`` payload (17.7, ``cloud.held`` sends such records here). In the held payload's one
transaction, in hand-in order, each payment is:

- **already booked** (its payment id is in ``voucher_payments``): listed as booked again;
- **refused** with a fault, final (``bad_voucher``: not signed by the registered key of the
  voucher's fog valid at its ``nb``, or not matching the booked voucher intent;
  ``bad_payment``; ``payee_not_allowed``; ``voucher_expired``: its ``t`` after the voucher's
  ``na``, or handed in after ``na`` + the grace; ``voucher_overspent``: its cumulative ``u``
  past the voucher's amount, or the voucher's booked payments plus this one past it);
- **pending**, in neither list, when the voucher intent is not booked yet (the fog's batch is
  still on its way): the payee hands it in again later;
- else **booked**: a row of ``voucher_payments`` (from the voucher's escrow to the payee) and
  the voucher's ``spent`` grows. Never more than the voucher's amount in all.

**Double spending**: a second payment at a voucher sequence already booked, or a payment past
the amount (``voucher_overspent``), is the payer's key signing more than its voucher: alarm
``voucher_double_spent`` (subject the device, once per device) and the device **suspended**
exactly as for ``cloned_key`` (15.3: the issuer revokes its key in the same transaction and
publishes the revocation). A second payment at a used sequence that still fits the amount is
booked (the payee was served in good faith and the escrow covers it).

``escrow(tx, owner_id, now_ms)`` is what ``fogpay cloud owner show`` prints as ``vouchers``.

Concurrency: the voucher's ``spent`` grows by a compare-and-set in the database (``spent + a
<= amount``), so even two hand-ins of one voucher booked at once by two processes on
PostgreSQL never book past its amount (the second re-reads the row after the first's lock).
Hand-ins and ``return_expired`` run on the cloud's one control worker (batches may be
partitioned across processes; held uploads are not), which orders a return after or before a
hand-in of the same voucher.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from cloud import registry
from cloud.booking import Alarm
from cloud.store import Tx, clamp_ms
from protocol.batch import decode_record
from protocol.errors import Declined
from protocol.messages import FogCredential
from protocol.signing import Signed, open_envelope
from protocol.voucher import (
    FAULT_BAD_PAYMENT,
    FAULT_BAD_VOUCHER,
    FAULT_EXPIRED,
    FAULT_OVERSPENT,
    VOUCHER_GRACE_MS,
    VOUCHER_LIFE_MS,
    VOUCHER_PAYEE,
    Payment,
    Voucher,
    VoucherError,
    check_terms,
    open_payment,
    open_voucher,
)

ALARM_DOUBLE_SPENT: Final = "voucher_double_spent"
SUSPEND_REASON: Final = "suspended: voucher spent twice"  # the revocation's r
ESCROW_ACCOUNT: Final = VOUCHER_PAYEE  # the account the voucher intents credit


@dataclass(frozen=True, slots=True)
class D2DVerdict:
    """One ``[vch, d2d]`` record of a held payload after the checks that need no store."""

    position: int
    payment_id: bytes | None
    fault: str | None = None
    voucher: Signed[Voucher] | None = None
    payment: Signed[Payment] | None = None
    record: bytes = b""


def check_d2d(position: int, record: bytes) -> D2DVerdict:
    """The record decodes, the voucher opens (its signer is checked against the registry
    later), the payment is the voucher device's, and it keeps the voucher's terms."""
    try:
        vch_env, d2d_env = decode_record(record)
        voucher = open_voucher(vch_env)
    except (Declined, VoucherError):
        return D2DVerdict(position, None, FAULT_BAD_VOUCHER, record=record)
    try:
        payment = open_payment(d2d_env, voucher.msg)
    except VoucherError:
        return D2DVerdict(position, None, FAULT_BAD_PAYMENT, voucher, record=record)
    try:
        check_terms(voucher.msg, payment.msg)
    except VoucherError as exc:
        return D2DVerdict(position, payment.id, exc.code, voucher, payment, record)
    return D2DVerdict(position, payment.id, None, voucher, payment, record)


@dataclass(slots=True)
class D2DDone:
    booked: list[bytes] = field(default_factory=list)
    already: list[bytes] = field(default_factory=list)
    refused: list[tuple[int, bytes | None, str]] = field(default_factory=list)
    pending: list[bytes] = field(default_factory=list)
    alarms: list[tuple[str, Alarm]] = field(default_factory=list)  # (fog_id, alarm)
    suspend: dict[bytes, str] = field(default_factory=dict)  # device -> fog_id


async def book(tx: Tx, verdicts: Sequence[D2DVerdict], *, now_ms: int) -> D2DDone:
    """Book the payments of one held payload, in order, inside the caller's transaction."""
    done = D2DDone()
    for v in verdicts:
        if v.payment_id is not None and await _booked(tx, v.payment_id):
            done.already.append(v.payment_id)
            continue
        if v.voucher is None or v.payment is None or v.payment_id is None:
            done.refused.append((v.position, v.payment_id, v.fault or FAULT_BAD_VOUCHER))
            continue
        vch, pay = v.voucher.msg, v.payment.msg
        if not await _fog_signed(tx, v.voucher):
            done.refused.append((v.position, v.payment_id, FAULT_BAD_VOUCHER))
            continue
        if v.fault is not None:
            done.refused.append((v.position, v.payment_id, v.fault))
            if v.fault == FAULT_OVERSPENT:  # the payer signed past its fog's voucher
                _double(done, vch, v.payment_id, f"u={pay.spent_micros} > a={vch.amount_micros}")
            continue
        escrow = await tx.fetchone(
            "SELECT debit, currency, amount_micros, device FROM transfers "
            "WHERE intent_id = ? AND credit = ?",
            (vch.voucher_id, ESCROW_ACCOUNT),
        )
        if escrow is None:  # the voucher intent's record has not reached the cloud yet
            done.pending.append(v.payment_id)
            continue
        owner, currency, amount, device = (
            str(escrow[0]),
            str(escrow[1]),
            int(escrow[2]),
            bytes(escrow[3]),
        )
        if (currency, amount, device) != (vch.currency, vch.amount_micros, vch.device):
            done.refused.append((v.position, v.payment_id, FAULT_BAD_VOUCHER))
            continue
        if now_ms > vch.not_after_ms + VOUCHER_GRACE_MS or await _returned(tx, vch.voucher_id):
            done.refused.append((v.position, v.payment_id, FAULT_EXPIRED))
            continue
        spent = await _voucher_row(tx, vch, owner, now_ms)
        same_seq = await tx.fetchone(
            "SELECT payment_id FROM voucher_payments WHERE voucher_id = ? AND seq = ?",
            (vch.voucher_id, pay.seq),
        )
        if spent + pay.amount_micros > vch.amount_micros:
            done.refused.append((v.position, v.payment_id, FAULT_OVERSPENT))
            _double(done, vch, v.payment_id, f"spent {spent} + {pay.amount_micros} > a")
            continue
        # compare-and-set in the database: never past the amount, even if another hand-in of
        # the same voucher books concurrently (PostgreSQL re-checks the row after its lock)
        took = await tx.execute(
            "UPDATE vouchers SET spent_micros = spent_micros + ? WHERE voucher_id = ? "
            "AND spent_micros + ? <= amount_micros",
            (pay.amount_micros, vch.voucher_id, pay.amount_micros),
        )
        if took != 1:
            done.refused.append((v.position, v.payment_id, FAULT_OVERSPENT))
            _double(done, vch, v.payment_id, f"{pay.amount_micros} past a (booked concurrently)")
            continue
        if same_seq is not None:
            _double(done, vch, v.payment_id, f"s={pay.seq} already {bytes(same_seq[0]).hex()[:16]}")
        await tx.execute(
            "INSERT INTO voucher_payments (payment_id, voucher_id, seq, payee, currency, "
            "amount_micros, device, record, booked_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                v.payment_id,
                vch.voucher_id,
                pay.seq,
                pay.payee_id,
                currency,
                pay.amount_micros,
                vch.device,
                v.record,
                clamp_ms(now_ms),
            ),
        )
        await _move(
            tx,
            [
                (ESCROW_ACCOUNT, currency, -pay.amount_micros),
                (pay.payee_id, currency, pay.amount_micros),
            ],
        )
        done.booked.append(v.payment_id)
    return done


async def _move(tx: Tx, moves: list[tuple[str, str, int]]) -> None:
    """Account moves, as ``cloud.ledger`` makes them (balances derive from ``transfers``,
    ``voucher_payments`` and ``voucher_returns``: ``ledger.derived_balances``)."""
    await tx.executemany(
        "INSERT INTO accounts (account_id, currency, balance_micros) VALUES (?, ?, ?) "
        "ON CONFLICT (account_id, currency) DO UPDATE "
        "SET balance_micros = accounts.balance_micros + excluded.balance_micros",
        moves,
    )


async def _returned(tx: Tx, voucher_id: bytes) -> bool:
    row = await tx.fetchone("SELECT 1 FROM voucher_returns WHERE voucher_id = ?", (voucher_id,))
    return row is not None


def _double(done: D2DDone, vch: Voucher, payment_id: bytes, why: str) -> None:
    detail = f"voucher={vch.voucher_id.hex()} payment={payment_id.hex()} {why}"
    done.alarms.append((vch.fog_id, Alarm(ALARM_DOUBLE_SPENT, vch.device.hex(), detail)))
    done.suspend[vch.device] = vch.fog_id


async def _booked(tx: Tx, payment_id: bytes) -> bool:
    row = await tx.fetchone("SELECT 1 FROM voucher_payments WHERE payment_id = ?", (payment_id,))
    return row is not None


async def _voucher_row(tx: Tx, vch: Voucher, owner_id: str, now_ms: int) -> int:
    """The voucher's booked spending so far (its row made at its first hand-in)."""
    row = await tx.fetchone(
        "SELECT spent_micros FROM vouchers WHERE voucher_id = ?", (vch.voucher_id,)
    )
    if row is not None:
        return int(row[0])
    await tx.execute(
        "INSERT INTO vouchers (voucher_id, owner_id, device, fog_id, currency, amount_micros, "
        "spent_micros, not_after_ms, first_ms) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?) "
        "ON CONFLICT (voucher_id) DO NOTHING",
        (
            vch.voucher_id,
            owner_id,
            vch.device,
            vch.fog_id,
            vch.currency,
            vch.amount_micros,
            clamp_ms(vch.not_after_ms),
            clamp_ms(now_ms),
        ),
    )
    return 0


async def _fog_signed(tx: Tx, voucher: Signed[Voucher]) -> bool:
    """Signed by the registered key of the voucher's fog, valid at the voucher's ``nb``."""
    credential = await registry.fog_credential(tx, voucher.msg.fog_id)
    if credential is None:
        return False
    cred = open_envelope(credential, FogCredential).msg
    nb = voucher.msg.not_before_ms
    return cred.key == voucher.signer and cred.not_before_ms <= nb <= cred.not_after_ms


@dataclass(frozen=True, slots=True)
class Escrow:
    """An owner's vouchers as ``fogpay cloud owner show`` prints them (``vouchers``)."""

    vouchers: int  # voucher intents booked (escrow deposits)
    deposited_micros: int  # their amounts: already counted in the exposure, as booked transfers
    spent_micros: int  # d2d payments booked against them
    outstanding_micros: int  # unspent escrow of vouchers still open (before na + grace)
    returnable_micros: int  # unspent escrow of vouchers past na + grace, not yet returned
    returned_micros: int  # unspent escrow returned to the owner (``return_expired``)

    def as_json(self) -> dict[str, int]:
        return {
            "vouchers": self.vouchers,
            "deposited_micros": self.deposited_micros,
            "spent_micros": self.spent_micros,
            "outstanding_micros": self.outstanding_micros,
            "returnable_micros": self.returnable_micros,
            "returned_micros": self.returned_micros,
        }


@dataclass(frozen=True, slots=True)
class Deposit:
    """One voucher's escrow: its intent's booked transfer, what was spent, whether returned."""

    voucher_id: bytes
    owner_id: str
    currency: str
    amount_micros: int
    spent_micros: int
    until_ms: int  # na + grace: no hand-in is booked after it
    returned: bool

    @property
    def unspent_micros(self) -> int:
        return max(0, self.amount_micros - self.spent_micros)

    def as_json(self) -> dict[str, object]:
        return {
            "voucher": self.voucher_id.hex(),
            "owner_id": self.owner_id,
            "currency": self.currency,
            "amount_micros": self.amount_micros,
            "spent_micros": self.spent_micros,
            "returned_micros": self.unspent_micros,
            "until_ms": self.until_ms,
        }


async def deposits(tx: Tx, owner_id: str | None = None) -> list[Deposit]:
    """Every voucher's escrow (of ``owner_id``, or all). A voucher intent's transfer row carries
    no ``na``: until its first hand-in stores it, the booking time plus the voucher's life
    stands in for it (booking came after the receipt: a late estimate, never an early one)."""
    sql = (
        "SELECT t.intent_id, t.debit, t.currency, t.amount_micros, v.spent_micros, "
        "v.not_after_ms, t.booked_ms, r.voucher_id FROM transfers t "
        "LEFT JOIN vouchers v ON v.voucher_id = t.intent_id "
        "LEFT JOIN voucher_returns r ON r.voucher_id = t.intent_id WHERE t.credit = ?"
    )
    args: tuple[object, ...] = (ESCROW_ACCOUNT,)
    if owner_id is not None:
        sql, args = sql + " AND t.debit = ?", (ESCROW_ACCOUNT, owner_id)
    rows = await tx.fetchall(sql + " ORDER BY t.intent_id", args)
    out = []
    for vid, owner, currency, amount, used, na, booked_ms, ret in rows:
        until = int(na) if na is not None else int(booked_ms) + VOUCHER_LIFE_MS
        out.append(
            Deposit(
                bytes(vid),
                str(owner),
                str(currency),
                int(amount),
                int(used or 0),
                until + VOUCHER_GRACE_MS,
                ret is not None,
            )
        )
    return out


async def escrow(tx: Tx, owner_id: str, *, now_ms: int) -> Escrow:
    """The owner's voucher escrow from the booked voucher intents, d2d payments, returns."""
    ds = await deposits(tx, owner_id)
    outstanding = sum(d.unspent_micros for d in ds if not d.returned and now_ms <= d.until_ms)
    returnable = sum(d.unspent_micros for d in ds if not d.returned and now_ms > d.until_ms)
    return Escrow(
        vouchers=len(ds),
        deposited_micros=sum(d.amount_micros for d in ds),
        spent_micros=sum(d.spent_micros for d in ds),
        outstanding_micros=outstanding,
        returnable_micros=returnable,
        returned_micros=sum(d.unspent_micros for d in ds if d.returned),
    )


async def return_expired(tx: Tx, *, now_ms: int, apply: bool) -> list[Deposit]:
    """The vouchers past ``na`` + grace whose unspent escrow has not returned; with ``apply``,
    return it (one ``voucher_returns`` row each, escrow -> owner), in this transaction. No
    hand-in is booked against a returned voucher (``voucher_expired``)."""
    due = [d for d in await deposits(tx) if not d.returned and now_ms > d.until_ms]
    if apply:
        for d in due:
            await tx.execute(
                "INSERT INTO voucher_returns (voucher_id, owner_id, currency, amount_micros, "
                "returned_ms) VALUES (?, ?, ?, ?, ?)",
                (d.voucher_id, d.owner_id, d.currency, d.unspent_micros, clamp_ms(now_ms)),
            )
            if d.unspent_micros:
                await _move(
                    tx,
                    [
                        (ESCROW_ACCOUNT, d.currency, -d.unspent_micros),
                        (d.owner_id, d.currency, d.unspent_micros),
                    ],
                )
    return due
