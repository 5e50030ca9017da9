"""Sequence gossip between fogs and cloned keys (docs/protocol.md section 17.4): the SQL.

Tables (created by ``init``, IF NOT EXISTS, like ``lease_reports``):

- ``peer_seq``: per device, the highest ``q`` any peer reported authorizing (offset -2^63
  like every stored ``q``), with the peer and when. It is the peers' half of the ``stale``
  check: a device's intent is stale when ``q <= max(own seq_last, peer_seq)``
  (``fog.authorize``, row 9). One row per device, kept for good (as ``devices``).
- ``peer_seen``: the ``(d, q, i)`` peers reported, kept ``PEER_SEEN_KEEP_MS`` after arrival
  (pruned in small steps, at every tick while a step is full): two peers reporting
  different intent ids at one ``(d, q)`` is a clone.
- ``suspended``: devices suspended here because their key signed two intents with one ``q``
  (a clone): the evidence (both intent ids, where each was authorized). A suspended device is
  declined ``revoked`` (row 6) until the issuer decides; nothing here lifts it (the key is
  known to be copied: its owner binds a new one).
- ``gossip_cursor``: the last log index sent in a ``seen``.

Pure SQL on a connection the caller holds (``FogStore``); every write inside the caller's
transaction or one of its own. No clock, no I/O.
"""

import sqlite3
from dataclasses import dataclass
from typing import Final, Literal

from fog.batcher import transaction
from fog.sqlints import from_i64, to_i64
from protocol.errors import Declined
from protocol.gossip import SEEN_ENTRIES_MAX, Seen, SeenEntry
from protocol.messages import FogCredential
from protocol.reasons import Reason
from protocol.signing import open_envelope

PEERS_DDL: Final = (
    """CREATE TABLE IF NOT EXISTS peer_seq (
    device BLOB PRIMARY KEY,
    seq INTEGER NOT NULL,           -- q - 2^63, the highest a peer reported
    fog_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS peer_seen (
    device BLOB NOT NULL,
    seq INTEGER NOT NULL,           -- q - 2^63
    intent_id BLOB NOT NULL,
    fog_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS peer_seen_by_time ON peer_seen (at_ms)",
    """CREATE TABLE IF NOT EXISTS suspended (
    device BLOB PRIMARY KEY,
    seq INTEGER NOT NULL,           -- q - 2^63 of the collision
    intent_a BLOB NOT NULL,
    fog_a TEXT NOT NULL,
    intent_b BLOB NOT NULL,
    fog_b TEXT NOT NULL,
    at_ms INTEGER NOT NULL
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS gossip_cursor (
    name TEXT PRIMARY KEY,
    n INTEGER NOT NULL              -- the last log index sent
)""",
)
SEEN_ROUND_MESSAGES_MAX: Final = 8  # seen messages per peer per round (then the next tick)
SEEN_ROUND_ENTRIES_MAX: Final = SEEN_ROUND_MESSAGES_MAX * SEEN_ENTRIES_MAX
# a peer's (d, q, i) kept an hour after it arrived, to compare with another peer's: two fogs
# that both authorized one (d, q) did so before hearing from each other, so their reports
# arrive close together (this fog's own log is compared for as long as it keeps records; the
# cloud compares everything at booking). Bounded by time, not rows: at 100 reports a second
# from all peers together, 360,000 rows (about 40 MB).
PEER_SEEN_KEEP_MS: Final = 3_600_000
PEER_SEEN_PRUNE_ROWS: Final = 512  # per round
_CURSOR: Final = "seen"


def init(conn: sqlite3.Connection) -> None:
    """Create the tables if missing (idempotent)."""
    with transaction(conn):
        for ddl in PEERS_DDL:
            conn.execute(ddl)


def has_marks(conn: sqlite3.Connection) -> bool:
    """Whether any peer mark or suspension is stored (else the group skips reading them)."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM peer_seq) OR EXISTS (SELECT 1 FROM suspended)"
    ).fetchone()
    return bool(row[0])


def device_marks(conn: sqlite3.Connection, device: bytes) -> tuple[int, bool]:
    """(the peers' highest q for ``device``, 0 for none; whether it is suspended here)."""
    row = conn.execute(
        "SELECT (SELECT seq FROM peer_seq WHERE device = ?1), "
        "EXISTS (SELECT 1 FROM suspended WHERE device = ?1)",
        (device,),
    ).fetchone()
    return (0 if row[0] is None else from_i64(row[0])), bool(row[1])


@dataclass(frozen=True, slots=True)
class Clone:
    """Two intents signed by one device key with one ``q``: where each was authorized."""

    device: bytes
    seq: int
    intent_a: bytes
    fog_a: str
    intent_b: bytes
    fog_b: str

    def describe(self) -> str:
        return (
            f"device {self.device.hex()[:16]} q {self.seq}: intent {self.intent_a.hex()[:16]} "
            f"at {self.fog_a}, intent {self.intent_b.hex()[:16]} at {self.fog_b}"
        )


@dataclass(frozen=True, slots=True)
class SeenOutcome:
    status: Literal["accepted", "refused"]
    reason: Reason | None = None
    detail: str = ""
    fog_id: str = ""  # the sender
    entries: int = 0
    raised: int = 0  # entries that raised a peer's high-water mark
    clones: tuple[Clone, ...] = ()  # devices this message revealed as clones (suspended now)
    devices: frozenset[bytes] = frozenset()  # the devices it names
    collisions: int = 0  # entries colliding (with devices suspended before, too)


def fog_key_valid(
    conn: sqlite3.Connection, fog_id: str, key: bytes, *, issuer: bytes, now_ms: int
) -> bool:
    """``key`` is the key of a fog credential of ``fog_id`` held here, valid at ``now_ms``
    (inclusive window) and not revoked by the issuer."""
    rows = conn.execute(
        "SELECT t.envelope FROM fogs f JOIN trust t ON t.id = f.id "
        "WHERE f.fog_id = ? AND f.key = ? AND NOT EXISTS "
        "(SELECT 1 FROM revocations r WHERE r.key = f.key AND r.signer = ?)",
        (fog_id, key, issuer),
    ).fetchall()
    for (envelope,) in rows:
        try:
            cred = open_envelope(bytes(envelope), FogCredential, signer=issuer).msg
        except Declined:  # stored after verification: never, but never trusted blindly
            continue
        if cred.not_before_ms <= now_ms <= cred.not_after_ms:
            return True
    return False


def apply_seen(
    conn: sqlite3.Connection, envelope: bytes, *, own_fog_id: str, issuer: bytes, now_ms: int
) -> SeenOutcome:
    """Verify a ``seen`` (signed by the fog credential of ``f``, another fog) and note its
    entries in one transaction (``note_marks``). Idempotent: a ``seen`` applied again changes
    nothing and finds no new clone."""
    try:
        signed = open_envelope(envelope, Seen)
    except Declined as exc:
        return SeenOutcome("refused", exc.reason, exc.detail[:200])
    msg = signed.msg
    if msg.fog_id == own_fog_id:
        return SeenOutcome("refused", Reason.WRONG_FOG, "a seen of this fog's own", msg.fog_id)
    if not fog_key_valid(conn, msg.fog_id, signed.signer, issuer=issuer, now_ms=now_ms):
        return SeenOutcome(
            "refused", Reason.BAD_SIGNATURE, f"not signed by a fog credential of {msg.fog_id}"
        )
    with transaction(conn):
        raised, clones, collisions = note_marks(conn, msg.fog_id, msg.entries, own_fog_id, now_ms)
    return SeenOutcome(
        "accepted",
        fog_id=msg.fog_id,
        entries=len(msg.entries),
        raised=raised,
        clones=clones,
        collisions=collisions,
        devices=frozenset(e.device for e in msg.entries),
    )


def note_marks(
    conn: sqlite3.Connection,
    fog_id: str,
    entries: tuple[SeenEntry, ...] | list[SeenEntry],
    own_fog_id: str,
    now_ms: int,
) -> tuple[int, tuple[Clone, ...], int]:
    """Inside the caller's transaction: what peer ``fog_id`` authorized (from its ``seen``,
    or from the records of its batches a replica holder verified) raises the peer
    high-water marks and is compared with this fog's log and other peers' reports. Returns
    (marks raised, the clones that suspended a device now, entries colliding). A device
    already suspended is not reported again (a resent ``seen`` raises no second alarm)."""
    raised, clones, collisions = 0, [], 0
    for d, q, i in entries:
        q64 = to_i64(q)
        clone = _collision(conn, d, q64, i, fog_id, own_fog_id)
        if clone is None:
            conn.execute(
                "INSERT INTO peer_seen (device, seq, intent_id, fog_id, at_ms) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (device, seq) DO NOTHING",
                (d, q64, i, fog_id, now_ms),
            )
        else:
            collisions += 1
            if suspend(conn, clone, now_ms):
                clones.append(clone)
        changed = conn.execute(
            "INSERT INTO peer_seq (device, seq, fog_id, at_ms) VALUES (?1, ?2, ?3, ?4) "
            "ON CONFLICT (device) DO UPDATE SET seq = excluded.seq, fog_id = excluded.fog_id, "
            "at_ms = excluded.at_ms WHERE excluded.seq > peer_seq.seq",
            (d, q64, fog_id, now_ms),
        ).rowcount
        raised += changed
    return raised, tuple(clones), collisions


def _collision(
    conn: sqlite3.Connection, d: bytes, q64: int, i: bytes, fog_id: str, own_fog_id: str
) -> Clone | None:
    """Another intent id at ``(d, q)``: in this fog's log, or reported by a peer."""
    q = from_i64(q64)
    row = conn.execute(
        "SELECT intent_id FROM log WHERE device = ? AND seq = ?", (d, q64)
    ).fetchone()
    if row is not None and bytes(row[0]) != i:
        return Clone(d, q, bytes(row[0]), own_fog_id, i, fog_id)
    row = conn.execute(
        "SELECT intent_id, fog_id FROM peer_seen WHERE device = ? AND seq = ?", (d, q64)
    ).fetchone()
    if row is not None and bytes(row[0]) != i:
        return Clone(d, q, bytes(row[0]), str(row[1]), i, fog_id)
    return None


def suspend(conn: sqlite3.Connection, clone: Clone, now_ms: int) -> int:
    """Suspend the device here (inside the caller's transaction); 1 if newly suspended."""
    return conn.execute(
        "INSERT INTO suspended (device, seq, intent_a, fog_a, intent_b, fog_b, at_ms) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device) DO NOTHING",
        (
            clone.device,
            to_i64(clone.seq),
            clone.intent_a,
            clone.fog_a,
            clone.intent_b,
            clone.fog_b,
            now_ms,
        ),
    ).rowcount


def suspended(conn: sqlite3.Connection) -> list[tuple[bytes, int, str]]:
    """(device, q of the collision, description) of every suspended device."""
    rows = conn.execute(
        "SELECT device, seq, intent_a, fog_a, intent_b, fog_b FROM suspended ORDER BY at_ms"
    ).fetchall()
    return [
        (
            bytes(d),
            from_i64(q),
            Clone(bytes(d), from_i64(q), bytes(ia), str(fa), bytes(ib), str(fb)).describe(),
        )
        for d, q, ia, fa, ib, fb in rows
    ]


# ---- what this fog sends --------------------------------------------------------------------


def cursor(conn: sqlite3.Connection) -> int:
    """The last log index sent in a ``seen`` (0: none yet)."""
    row = conn.execute("SELECT n FROM gossip_cursor WHERE name = ?", (_CURSOR,)).fetchone()
    return 0 if row is None else int(row[0])


def set_cursor(conn: sqlite3.Connection, n: int) -> None:
    with transaction(conn):
        conn.execute(
            "INSERT INTO gossip_cursor (name, n) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET n = excluded.n WHERE excluded.n > gossip_cursor.n",
            (_CURSOR, n),
        )


def authorized_after(
    conn: sqlite3.Connection, after_n: int, limit: int = SEEN_ROUND_ENTRIES_MAX
) -> list[tuple[int, SeenEntry]]:
    """The log's records after index ``after_n``, in order, at most ``limit``: (n, entry)."""
    rows = conn.execute(
        "SELECT n, device, seq, intent_id FROM log WHERE n > ? ORDER BY n LIMIT ?",
        (after_n, limit),
    ).fetchall()
    return [(int(n), SeenEntry(bytes(d), from_i64(q), bytes(i))) for n, d, q, i in rows]


def prune_seen(conn: sqlite3.Connection, *, now_ms: int) -> int:
    """Forget peers' reports older than ``PEER_SEEN_KEEP_MS`` (a few hundred per call); the
    high-water marks stay."""
    with transaction(conn):
        return int(
            conn.execute(
                "DELETE FROM peer_seen WHERE (device, seq) IN (SELECT device, seq FROM "
                "peer_seen WHERE at_ms < ? ORDER BY at_ms LIMIT ?)",
                (now_ms - PEER_SEEN_KEEP_MS, PEER_SEEN_PRUNE_ROWS),
            ).rowcount
        )
