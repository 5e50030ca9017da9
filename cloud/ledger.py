"""Double-entry ledger: every booked intent is one transfer, owner debited, payee credited.

Balances live in ``accounts`` and move in the same transaction that inserts the transfer
(``cloud.ingest``). ``check`` proves the books: per currency the accounts sum to zero, and
every account's balance equals what its transfers say. Amounts are integer micros.
"""

from dataclasses import dataclass, field

from cloud.store import Tx


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
    """Each account's balance recomputed from the transfers alone."""
    out: dict[tuple[str, str], int] = {}
    for side, sign in (("credit", 1), ("debit", -1)):
        rows = await tx.fetchall(
            f"SELECT {side}, currency, CAST(SUM(amount_micros) AS BIGINT) FROM transfers "
            f"GROUP BY {side}, currency"
        )
        for account, currency, total in rows:
            out[(account, currency)] = out.get((account, currency), 0) + sign * int(total)
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
