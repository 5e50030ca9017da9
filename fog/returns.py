"""Early return of leases (docs/protocol.md 18.1): the SQL behind ``FogStore.retire_leases``
and ``fogpay fog return-leases``.

A fog gives a lease back before its ``na`` when it no longer needs it: its owner has been idle
for ``lease.return_idle_ms``, the fog stops gracefully with ``lease.return_on_stop``, or an
operator says so (``fogpay fog return-leases [--owner O]``). Returning is two steps, both
durable:

1. **Retire** (here, one transaction): every live, unreported lease chosen gets
   ``not_after_ms = RETIRED_NOT_AFTER_MS`` (-1), so no group draws on it again from this
   commit on, whatever the clock says (a group reads leases with ``not_after_ms >= now``, and
   its draw is a compare-and-set on the same condition), and a row in ``lease_returns`` saying
   why, with what was drawn then. Its real ``na`` stays in the stored lease envelope.
2. **Report**: a retired lease looks expired to the lease round, so the ordinary report path
   (``FogStore.lease_reports_due``, fog/leasing.py) signs its ``lrep`` once every draw on it is
   in a sealed batch, stores it in the same transaction that (again) makes it undrawable, and
   sends it until the cloud clears the lease (14.4). The cloud closes it by the rules of 14.4
   and the unused part returns to the owner's credit then.

Retiring works on any connection to the fog's database: the daemon's core (idle owners,
shutdown) or the CLI's own connection while the daemon runs (the operator). A commit by
another connection moves SQLite's ``data_version``, so the daemon's next group forgets what it
had cached (fog/group.py) and never sees the lease as live again; its next lease round (every
``lease.check_interval_ms``) reports it. A retired lease stays retired across restarts.
"""

import sqlite3
from dataclasses import dataclass
from typing import Final

from fog.batcher import transaction

RETIRED_NOT_AFTER_MS: Final = -1  # as a reported lease: never drawn on again
REASONS: Final = ("idle", "shutdown", "operator", "cloud")  # cloud: an rbal (18.5)
RETURNS_LISTED_MAX: Final = 4096  # leases retired by one call (more: call again)
OWNERS_LISTED_MAX: Final = 4096

DDL: Final = """
CREATE TABLE IF NOT EXISTS lease_returns (
    lease_id BLOB PRIMARY KEY,
    owner_id TEXT NOT NULL,
    currency TEXT NOT NULL,
    amount_micros INTEGER NOT NULL,
    drawn_micros INTEGER NOT NULL,  -- drawn when retired: final, nothing is drawn after
    reason TEXT NOT NULL,           -- idle | shutdown | operator
    at_ms INTEGER NOT NULL
)"""

_LIVE: Final = (
    "FROM leases WHERE not_after_ms >= ? AND lease_id NOT IN (SELECT lease_id FROM "
    "lease_reports) AND lease_id NOT IN (SELECT lease_id FROM lease_returns)"
)


@dataclass(frozen=True, slots=True)
class Returned:
    """A lease retired early: what it held and what returns to the owner when it closes."""

    lease_id: bytes
    owner_id: str
    currency: str
    amount_micros: int
    drawn_micros: int
    reason: str

    @property
    def room_micros(self) -> int:
        """The unused part: back to the owner's credit once the cloud closes the lease."""
        return self.amount_micros - self.drawn_micros


def init(conn: sqlite3.Connection) -> None:
    """Create the table if missing (idempotent)."""
    with transaction(conn):
        conn.execute(DDL)


def has_tables(conn: sqlite3.Connection) -> bool:
    """Whether this database holds a fog's leases (a daemon opened it at least once)."""
    names = {
        str(r[0])
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN "
            "('leases', 'lease_reports')"
        )
    }
    return names == {"leases", "lease_reports"}


def live_owners(conn: sqlite3.Connection, *, now_ms: int) -> list[str]:
    """Owners holding a live lease that is neither reported nor retired."""
    rows = conn.execute(
        f"SELECT DISTINCT owner_id {_LIVE} ORDER BY owner_id LIMIT ?",
        (now_ms, OWNERS_LISTED_MAX),
    ).fetchall()
    return [str(r[0]) for r in rows]


def retire(
    conn: sqlite3.Connection,
    *,
    now_ms: int,
    reason: str,
    owner_ids: list[str] | None = None,
) -> list[Returned]:
    """Retire the live, unreported leases of ``owner_ids`` (None: of every owner) in one
    transaction; returns them (none: nothing changed). After the commit nothing is drawn on
    them again; the lease round reports them (18.1)."""
    assert reason in REASONS, reason
    if owner_ids is not None and not owner_ids:
        return []
    out: list[Returned] = []
    with transaction(conn):
        sql = f"SELECT lease_id, owner_id, currency, amount_micros, drawn_micros {_LIVE}"
        params: tuple[object, ...] = (now_ms,)
        if owner_ids is not None:
            sql += f" AND owner_id IN ({', '.join('?' * len(owner_ids))})"
            params += tuple(owner_ids)
        rows = conn.execute(
            sql + " ORDER BY not_after_ms, lease_id LIMIT ?", (*params, RETURNS_LISTED_MAX)
        ).fetchall()
        for lease_id, owner_id, currency, amount, drawn in rows:
            r = Returned(bytes(lease_id), str(owner_id), str(currency), amount, drawn, reason)
            conn.execute(
                "UPDATE leases SET not_after_ms = ? WHERE lease_id = ?",
                (RETIRED_NOT_AFTER_MS, r.lease_id),
            )
            conn.execute(
                "INSERT INTO lease_returns (lease_id, owner_id, currency, amount_micros, "
                "drawn_micros, reason, at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (r.lease_id, r.owner_id, r.currency, amount, drawn, reason, now_ms),
            )
            out.append(r)
    return out


def returned(conn: sqlite3.Connection) -> list[Returned]:
    """Every lease retired early, oldest first (for the operator and the demo)."""
    rows = conn.execute(
        "SELECT lease_id, owner_id, currency, amount_micros, drawn_micros, reason "
        "FROM lease_returns ORDER BY at_ms, lease_id"
    ).fetchall()
    return [
        Returned(bytes(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4]), str(r[5])) for r in rows
    ]
