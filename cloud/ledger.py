"""Double-entry ledger: every booked intent is one transfer, owner debited, payee credited.

This module both writes the books and checks them. ``booking_state`` reads the slice of the
store a batch's booking looks at; ``cloud.booking.book`` decides (pure) and returns rows;
``write`` writes them: the batch and its records (the evidence), the transfers, the lease
draws, the account moves and the rejected records, in the transaction ``cloud.ingest`` runs,
so balances move with the transfers that explain them. ``check`` proves the books: per
currency the accounts sum to zero, and every account's balance equals what its transfers
say. Amounts are integer micros.
"""

from dataclasses import dataclass, field

from cloud import booking
from cloud.booking import BindingRow, Booking, BookState, LeaseRow, Transfer
from cloud.store import Tx, fetch_in
from cloud.verify import CheckedBatch

_TRANSFER_COLUMNS = (*Transfer._fields, "fog_id", "number", "booked_ms")


async def booking_state(tx: Tx, batch: CheckedBatch) -> tuple[BookState, list[bytes]]:
    """The slice of the store that booking ``batch`` reads, and ``booking.dseqs(batch)``.

    One lookup by dseq (device + q) finds both the intents already booked and the
    (device, q) already used: an intent id is the hash of a body holding its ``d`` and
    ``q``, so a booked intent's transfer has the dseq of every record carrying that id."""
    draws = batch.draws
    keys = booking.dseqs(batch)
    bindings: dict[bytes, list[BindingRow]] = {}
    sql = (
        "SELECT b.device, b.owner_id, b.currency, b.nb, b.na, o.nb, o.na FROM bindings b "
        "JOIN owners o ON o.owner_id = b.owner_id WHERE b.device IN ({in})"
    )
    for row in await fetch_in(tx, sql, sorted(set(draws.devices))):
        bindings.setdefault(bytes(row[0]), []).append(BindingRow(*row[1:7]))
    lease_rows = await fetch_in(
        tx,
        "SELECT lease_id, owner_id, fog_id, currency, amount_micros, not_after_ms, drawn_micros "
        "FROM leases WHERE lease_id IN ({in})",
        sorted(set(draws.lease_ids)),
    )
    leases_ = {bytes(r[0]): LeaseRow(*r[1:7]) for r in lease_rows}
    ids = set(draws.intent_ids)
    state = BookState(bindings, leases_, set(), {})
    sql = "SELECT dseq, intent_id FROM transfers WHERE dseq IN ({in})"
    for dseq, intent_id in await fetch_in(tx, sql, sorted(set(keys)), pg_array=True):
        intent_id = bytes(intent_id)
        state.seqs[bytes(dseq)] = intent_id
        if intent_id in ids:
            state.booked.add(intent_id)
    return state, keys


async def write(tx: Tx, b: Booking) -> None:
    """Write a batch's booking. A duplicate batch or intent id fails the transaction
    (primary keys): ``book`` never plans one, so that is a concurrent writer or a bug."""
    await tx.execute(
        "INSERT INTO batches (fog_id, number, header_id, header, first_index, count, "
        "received_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
        b.batch_row,
    )
    await tx.insert_rows(
        "records", ("fog_id", "number", "position", "intent_id", "record"), b.record_rows
    )
    await tx.insert_rows("transfers", _TRANSFER_COLUMNS, b.transfer_rows)
    await tx.executemany(
        "UPDATE leases SET drawn_micros = drawn_micros + ? WHERE lease_id = ?", b.draw_rows
    )
    await tx.executemany(
        "INSERT INTO accounts (account_id, currency, balance_micros) VALUES (?, ?, ?) "
        "ON CONFLICT (account_id, currency) DO UPDATE "
        "SET balance_micros = accounts.balance_micros + excluded.balance_micros",
        b.account_rows,
    )
    await tx.executemany(
        "INSERT INTO rejected (fog_id, number, position, intent_id, reason) VALUES (?, ?, ?, ?, ?)",
        b.rejected_rows,
    )
    if b.relink_rows:  # booked from a device's upload (number 0): now in this batch
        await tx.executemany(
            "UPDATE transfers SET number = ?, position = ? "
            "WHERE intent_id = ? AND fog_id = ? AND number = 0",
            b.relink_rows,
        )


HELD_NUMBER = 0  # transfers.number of a transfer booked from a device's upload (17.8)


async def write_held(
    tx: Tx, fog_id: str, plan: booking.Plan, records: dict[bytes, bytes], *, now_ms: int
) -> None:
    """Write what ``booking.plan`` decided for records a device handed in (``records``:
    intent id -> record bytes): the transfers (batch number 0 until a batch of their fog
    brings the record), the records as evidence, the lease draws and the account moves,
    in the caller's transaction."""
    tail = (fog_id, HELD_NUMBER, now_ms)
    await tx.insert_rows("transfers", _TRANSFER_COLUMNS, [t + tail for t in plan.transfers])
    await tx.executemany(
        "INSERT INTO held_records (intent_id, fog_id, device, record, received_ms) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (intent_id) DO NOTHING",
        [(t.intent_id, fog_id, t.device, records[t.intent_id], now_ms) for t in plan.transfers],
    )
    await tx.executemany(
        "UPDATE leases SET drawn_micros = drawn_micros + ? WHERE lease_id = ?",
        [(amount, lease_id) for lease_id, amount in sorted(plan.lease_draws.items())],
    )
    await tx.executemany(
        "INSERT INTO accounts (account_id, currency, balance_micros) VALUES (?, ?, ?) "
        "ON CONFLICT (account_id, currency) DO UPDATE "
        "SET balance_micros = accounts.balance_micros + excluded.balance_micros",
        [(a, c, d) for (a, c), d in sorted(plan.balances.items())],
    )


@dataclass(frozen=True, slots=True)
class LedgerCheck:
    sums: dict[str, int]  # currency -> sum of all balances (must be 0)
    mismatched: list[tuple[str, str, int, int]] = field(
        default_factory=list
    )  # acct, cur, kept, derived
    transfers: int = 0
    volume_micros: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.mismatched and all(v == 0 for v in self.sums.values())


async def balance(tx: Tx, account_id: str, currency: str) -> int:
    row = await tx.fetchone(
        "SELECT balance_micros FROM accounts WHERE account_id = ? AND currency = ?",
        (account_id, currency),
    )
    return 0 if row is None else int(row[0])


async def balances(tx: Tx) -> dict[tuple[str, str], int]:
    rows = await tx.fetchall("SELECT account_id, currency, balance_micros FROM accounts")
    return {(r[0], r[1]): int(r[2]) for r in rows}


async def derived_balances(tx: Tx) -> dict[tuple[str, str], int]:
    """Each account's balance recomputed from the transfers (and the voucher payments and
    returns, 18.3) alone."""
    out: dict[tuple[str, str], int] = {}
    for side, sign in (("credit", 1), ("debit", -1)):
        rows = await tx.fetchall(
            f"SELECT {side}, currency, CAST(SUM(amount_micros) AS BIGINT) FROM transfers "
            f"GROUP BY {side}, currency"
        )
        for account, currency, total in rows:
            out[(account, currency)] = out.get((account, currency), 0) + sign * int(total)
    # device-to-device payments and returned escrow move money out of the account of the
    # voucher intents' payee, ``voucher`` (docs/protocol.md 18.3, cloud/vouchers.py)
    for table, credit in (("voucher_payments", "payee"), ("voucher_returns", "owner_id")):
        rows = await tx.fetchall(
            f"SELECT {credit}, currency, CAST(SUM(amount_micros) AS BIGINT) FROM {table} "
            f"GROUP BY {credit}, currency"
        )
        for account, currency, total in rows:
            out[(account, currency)] = out.get((account, currency), 0) + int(total)
            out[("voucher", currency)] = out.get(("voucher", currency), 0) - int(total)
    return out


async def check(tx: Tx) -> LedgerCheck:
    kept = await balances(tx)
    derived = await derived_balances(tx)
    sums: dict[str, int] = {}
    for (_, currency), amount in kept.items():
        sums[currency] = sums.get(currency, 0) + amount
    mismatched = [
        (acct, cur, kept.get((acct, cur), 0), derived.get((acct, cur), 0))
        for acct, cur in sorted(set(kept) | set(derived))
        if kept.get((acct, cur), 0) != derived.get((acct, cur), 0)
    ]
    rows = await tx.fetchall(
        "SELECT currency, COUNT(*), CAST(SUM(amount_micros) AS BIGINT) FROM transfers "
        "GROUP BY currency"
    )
    volume = {r[0]: int(r[2]) for r in rows}
    return LedgerCheck(sums, mismatched, sum(int(r[1]) for r in rows), volume)
