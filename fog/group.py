"""One group of intents in one transaction: reads through a coherent cache, writes at the end.

``FogStore.process`` decides a group of intents in one ``BEGIN IMMEDIATE ... COMMIT``. What it
needs about a device (its vouched bindings with their owner credentials and revocation flags;
its sequence and day total) and about an owner's leases is read from SQLite at most once and
kept in ``Reads``. An authorized intent updates those in-memory records at once, so later
intents of the group see its effects; its log record, the device's new state and the lease
draw are written at the end of the group (``Group.flush``, three ``executemany``), still
inside the group's transaction, so durability and atomicity are those of the one COMMIT.

``Reads`` survive from one group to the next only while the database provably has not
changed in between. After a group commits we take the fingerprint ``(total_changes, PRAGMA
data_version)`` of the connection: ``total_changes`` moves with every row this connection
inserts, updates or deletes, whoever in FogStore wrote it (trust material, leases, and any
later code), and ``data_version`` moves when another connection commits. The next group
compares it inside its BEGIN IMMEDIATE and forgets everything if either moved; a failed group
forgets everything. The one exception is ``restamp``: FogStore calls it around writes that
touch only the ``batches`` table (sealing, acks) or the gossip cursor and peers' reports
(``fog/peers.py``), which nothing here reads, and around a peer's ``seen`` after forgetting
the devices it names (their peer marks, read here, may have moved). The writes are
compare-and-set (a lease's drawn amount and a device's stored sequence must still be what was
read), so even a flaw in this reasoning could not draw money twice: the group would fail with
an AssertionError and roll back.

Choosing the binding in force in Python (``Voucher.rank``) keeps the cached candidates valid
whatever the clock does: it is the same order as the SQL of ``VOUCHER_AT_SQL``, used instead
for a device with more than ``VOUCHERS_MAX`` vouched bindings (not cached).
"""

import sqlite3
from dataclasses import dataclass
from typing import Final, NamedTuple

from fog import peers
from fog.authorize import LeaseView
from fog.sqlints import from_i64, to_i64
from protocol.messages import Binding, Message, OwnerCredential, decode_body

VOUCHERS_MAX: Final = 64  # vouched bindings of one device read and cached; more: SQL picks
DEVICES_CACHED_MAX: Final = 65_536  # devices kept between groups (then all forgotten)
LEASE_SETS_CACHED_MAX: Final = 16_384  # (owner, currency) lease sets kept between groups
DECODED_CACHE_MAX: Final = 65_536  # decoded bindings and credentials, by message id

_VOUCHER_COLUMNS: Final = (
    "SELECT b.id, b.body, b.nb, b.na, o.id, o.body, o.nb, o.na, "
    "EXISTS (SELECT 1 FROM revocations r WHERE r.key = b.device AND r.signer IN (?2, o.key)), "
    "EXISTS (SELECT 1 FROM revocations r WHERE r.key = o.key AND r.signer IN (?2, o.key)) "
    "FROM bindings b JOIN owners o ON o.owner_id = b.owner_id AND o.key = b.signer "
    "WHERE b.device = ?1 "
)
VOUCHERS_SQL: Final = _VOUCHER_COLUMNS + "LIMIT ?3"
VOUCHER_AT_SQL: Final = _VOUCHER_COLUMNS + (
    "ORDER BY (b.nb <= ?3 AND ?3 <= b.na) DESC, b.nb DESC, b.id DESC, "
    "(o.nb <= ?3 AND ?3 <= o.na) DESC, o.na DESC, o.id DESC LIMIT 1"
)
DEVICE_SQL: Final = "SELECT seq_last, day, day_micros FROM devices WHERE device = ?"
PRIOR_SQL: Final = (
    "SELECT intent_id, receipt, owner_id, amount_micros, n FROM log WHERE device = ? AND seq = ?"
)
LEASES_SQL: Final = (
    "SELECT lease_id, currency, amount_micros, drawn_micros, not_after_ms FROM leases "
    "WHERE owner_id = ? AND currency = ? AND not_after_ms >= ? AND drawn_micros < amount_micros"
)
INSERT_LOG_SQL: Final = (
    "INSERT INTO log (n, intent_id, device, seq, owner_id, lease_id, amount_micros, intent, "
    "receipt, at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
UPSERT_DEVICE_SQL: Final = (
    "INSERT INTO devices (device, seq_last, day, day_micros) VALUES (?1, ?2, ?3, ?4) "
    "ON CONFLICT (device) DO UPDATE SET seq_last = excluded.seq_last, day = excluded.day, "
    "day_micros = excluded.day_micros WHERE devices.seq_last IS ?5"
)
DRAW_SQL: Final = (
    "UPDATE leases SET drawn_micros = ?1 "
    "WHERE lease_id = ?2 AND drawn_micros = ?3 AND not_after_ms >= ?4"
)


@dataclass(frozen=True, slots=True)
class Voucher:
    """A binding of a device with an owner credential that vouches for it (same owner_id, its
    key signed the binding), the stored (clamped) validity bounds, and revocation flags."""

    binding_id: bytes
    binding: Binding
    binding_nb: int
    binding_na: int
    owner_msg_id: bytes
    owner: OwnerCredential
    owner_nb: int
    owner_na: int
    device_revoked: bool  # by the issuer or by this owner key
    owner_revoked: bool  # this owner key, by the issuer or by itself

    def rank(self, now_ms: int) -> tuple[bool, int, bytes, bool, int, bytes]:
        """Highest wins: valid binding, latest nb, highest id; then valid credential, latest
        na, highest id (docs/protocol.md, section 13.3)."""
        return (
            self.binding_nb <= now_ms <= self.binding_na,
            self.binding_nb,
            self.binding_id,
            self.owner_nb <= now_ms <= self.owner_na,
            self.owner_na,
            self.owner_msg_id,
        )


@dataclass(slots=True)
class DeviceState:
    """A device's sequence and day total (wire ``q``), with what the database holds."""

    seq_last: int
    day: int
    day_micros: int
    stored_seq: int | None  # seq_last in the database; None: no row
    peer_seq: int = 0  # the peers' high-water mark (fog/peers.py; read, never written here)
    suspended: bool = False  # suspended here as a clone (fog/peers.py)


@dataclass(slots=True)
class LeaseSet:
    """An owner's live leases in one currency with room left, as read at ``read_ms``, with
    the group's draws applied; ``stored`` is drawn_micros in the database."""

    read_ms: int
    views: dict[bytes, LeaseView]
    stored: dict[bytes, int]

    def draw(self, lease_id: bytes, amount_micros: int) -> None:
        v = self.views[lease_id]
        if v.left_micros < amount_micros:  # not an assert: it must hold under python -O too
            raise AssertionError("authorize picked a lease without room")
        self.views[lease_id] = LeaseView(
            lease_id=lease_id,
            currency=v.currency,
            amount_micros=v.amount_micros,
            drawn_micros=v.drawn_micros + amount_micros,
            not_after_ms=v.not_after_ms,
        )


class Prior(NamedTuple):
    """The authorized log record with a device's ``q``."""

    intent_id: bytes
    receipt: bytes
    owner_id: str
    amount_micros: int
    n: int


class LogRow(NamedTuple):
    """A log record, in the column order of INSERT_LOG_SQL."""

    n: int
    intent_id: bytes
    device: bytes
    seq_i64: int
    owner_id: str
    lease_id: bytes
    amount_micros: int
    intent: bytes
    receipt: bytes
    at_ms: int


class Reads:
    """What groups read, kept while the database is provably unchanged (module docstring)."""

    def __init__(self, issuer: bytes) -> None:
        self.issuer = issuer
        self.vouchers: dict[bytes, tuple[Voucher, ...]] = {}
        self.devices: dict[bytes, DeviceState] = {}
        self.leases: dict[tuple[str, str], LeaseSet] = {}
        self._decoded: dict[bytes, Message] = {}
        self._fingerprint: tuple[int, int] | None = None
        self._version = 0
        # any peer high-water mark or suspension stored (fog/peers.py); False: not read
        self.peer_marks = False

    def begin(self, conn: sqlite3.Connection) -> None:
        """At the start of a group, inside its transaction: forget unless nothing changed."""
        assert conn.in_transaction
        self._version = conn.execute("PRAGMA data_version").fetchone()[0]
        if self._fingerprint != (conn.total_changes, self._version):
            self.forget()
        if len(self.devices) > DEVICES_CACHED_MAX or len(self.vouchers) > DEVICES_CACHED_MAX:
            self.devices.clear()
            self.vouchers.clear()
        if len(self.leases) > LEASE_SETS_CACHED_MAX:
            self.leases.clear()

    def committed(self, conn: sqlite3.Connection) -> None:
        """After the group's COMMIT: what we hold is what the database holds."""
        self._fingerprint = (conn.total_changes, self._version)

    def restamp(self, changes_before: int, changes_after: int) -> None:
        """Writes on our connection that touched only tables not read here (``batches``)
        leave what we hold valid, if it was valid before them."""
        if self._fingerprint is not None and self._fingerprint[0] == changes_before:
            self._fingerprint = (changes_after, self._fingerprint[1])

    def forget(self) -> None:
        self._fingerprint = None
        self.vouchers.clear()
        self.devices.clear()
        self.leases.clear()

    def decoded(self, cls: type[Message], msg_id: bytes, body: bytes) -> Message:
        """A stored body (verified when stored) decoded, cached by message id (immutable)."""
        msg = self._decoded.get(msg_id)
        if msg is None:
            if len(self._decoded) >= DECODED_CACHE_MAX:
                self._decoded.clear()
            msg = decode_body(cls, body)
            self._decoded[msg_id] = msg
        assert isinstance(msg, cls)
        return msg


class Group:
    """One group's reads and pending writes; create after BEGIN IMMEDIATE, flush before
    COMMIT."""

    def __init__(self, conn: sqlite3.Connection, reads: Reads, now_ms: int) -> None:
        self._conn = conn
        self._reads = reads
        self._now = now_ms
        self._rows: list[LogRow] = []
        self._priors: dict[tuple[bytes, int], Prior] = {}
        self._devices: dict[bytes, DeviceState] = {}
        self._leases: dict[bytes, LeaseSet] = {}

    # ---- reads ---------------------------------------------------------------------------

    def voucher(self, device: bytes) -> Voucher | None:
        """The binding in force of ``device`` and its owner credential, or None."""
        found = self._reads.vouchers.get(device)
        if found is None:
            args = (device, self._reads.issuer, VOUCHERS_MAX + 1)
            rows = self._conn.execute(VOUCHERS_SQL, args).fetchall()
            if len(rows) > VOUCHERS_MAX:
                row = self._conn.execute(
                    VOUCHER_AT_SQL, (device, self._reads.issuer, self._now)
                ).fetchone()
                assert row is not None, "vouched bindings vanished inside the transaction"
                return self._voucher_of(row)
            found = tuple(self._voucher_of(r) for r in rows)
            self._reads.vouchers[device] = found
        if len(found) <= 1:
            return found[0] if found else None
        now = self._now
        return max(found, key=lambda v: v.rank(now))

    def _voucher_of(self, row: tuple[object, ...]) -> Voucher:
        b_id, b_body, b_nb, b_na, o_id, o_body, o_nb, o_na, d_rev, o_rev = row
        assert isinstance(b_id, bytes) and isinstance(b_body, bytes)
        assert isinstance(o_id, bytes) and isinstance(o_body, bytes)
        assert isinstance(b_nb, int) and isinstance(b_na, int)
        assert isinstance(o_nb, int) and isinstance(o_na, int)
        binding = self._reads.decoded(Binding, b_id, b_body)
        owner = self._reads.decoded(OwnerCredential, o_id, o_body)
        assert isinstance(binding, Binding) and isinstance(owner, OwnerCredential)
        return Voucher(b_id, binding, b_nb, b_na, o_id, owner, o_nb, o_na, bool(d_rev), bool(o_rev))

    def device(self, device: bytes) -> DeviceState:
        """The device's sequence and day total, with the group's effects."""
        state = self._reads.devices.get(device)
        if state is None:
            row = self._conn.execute(DEVICE_SQL, (device,)).fetchone()
            if row is None:
                state = DeviceState(0, 0, 0, None)
            else:
                seq = from_i64(row[0])
                state = DeviceState(seq, row[1], row[2], seq)
            if self._reads.peer_marks:
                state.peer_seq, state.suspended = peers.device_marks(self._conn, device)
            self._reads.devices[device] = state
        return state

    def prior(self, device: bytes, seq: int) -> Prior | None:
        """The authorized record of ``device`` with ``seq``, written or pending, or None."""
        found = self._priors.get((device, seq))
        if found is None:
            row = self._conn.execute(PRIOR_SQL, (device, to_i64(seq))).fetchone()
            if row is not None:
                found = Prior(bytes(row[0]), bytes(row[1]), row[2], row[3], row[4])
        return found

    def leases(self, owner_id: str, currency: str) -> LeaseSet:
        """The owner's live leases in ``currency`` with room, with the group's draws."""
        key = (owner_id, currency)
        found = self._reads.leases.get(key)
        if found is None or self._now < found.read_ms:  # a clock gone back: read again
            rows = self._conn.execute(LEASES_SQL, (owner_id, currency, self._now)).fetchall()
            views = {
                bytes(r[0]): LeaseView(
                    lease_id=bytes(r[0]),
                    currency=r[1],
                    amount_micros=r[2],
                    drawn_micros=r[3],
                    not_after_ms=r[4],
                )
                for r in rows
            }
            found = LeaseSet(self._now, views, {k: v.drawn_micros for k, v in views.items()})
            self._reads.leases[key] = found
        return found

    # ---- writes --------------------------------------------------------------------------

    def append(self, row: LogRow, *, seq: int, leases: LeaseSet, day: int, day_micros: int) -> None:
        """An authorized intent: its record, the device's new state, the lease draw."""
        self._rows.append(row)
        self._priors[(row.device, seq)] = Prior(
            row.intent_id, row.receipt, row.owner_id, row.amount_micros, row.n
        )
        state = self.device(row.device)
        assert seq > state.seq_last, "authorize accepted a stale sequence"
        state.seq_last, state.day, state.day_micros = seq, day, day_micros
        self._devices[row.device] = state
        leases.draw(row.lease_id, row.amount_micros)
        self._leases[row.lease_id] = leases

    def flush(self) -> None:
        """Write the group's records, device states and lease draws (inside its transaction);
        compare-and-set against what was read. The checks raise whatever the interpreter's
        flags (not ``assert``: ``python -O`` would skip the log's INSERT with it, and let a
        lost compare-and-set pass): a failed one rolls the group back, nothing recorded."""
        if not self._rows:
            return
        c = self._conn
        inserted = c.executemany(INSERT_LOG_SQL, self._rows).rowcount
        if inserted != len(self._rows):
            raise AssertionError("the group's log records were not all inserted")
        devices = [
            (d, to_i64(s.seq_last), s.day, s.day_micros, _opt_i64(s.stored_seq))
            for d, s in self._devices.items()
        ]
        changed = c.executemany(UPSERT_DEVICE_SQL, devices).rowcount
        if changed != len(devices):
            raise AssertionError("a device's state changed under the group")
        draws = [
            (s.views[lid].drawn_micros, lid, s.stored[lid], self._now)
            for lid, s in self._leases.items()
        ]
        changed = c.executemany(DRAW_SQL, draws).rowcount
        if changed != len(draws):
            raise AssertionError("a lease changed under the group")
        for state in self._devices.values():
            state.stored_seq = state.seq_last
        for lid, lease_set in self._leases.items():
            lease_set.stored[lid] = lease_set.views[lid].drawn_micros


def _opt_i64(seq: int | None) -> int | None:
    return None if seq is None else to_i64(seq)
