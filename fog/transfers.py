"""Peer transfers at the fog (docs/protocol.md 18.2): the giver's durable debit and the
receiver's idempotent credit, as SQL on the fog's connection (``FogStore`` wraps them), and
the asking side's small state machine (``TransferAsks``, in memory, pure).

Giver (``give``). A peer's ``xreq`` (signed by a fog credential of a peer, for this fog): if
this request id was answered before, the stored ``xfer`` again (same bytes); else the live,
unreported lease of the owner and currency with the most room gives ``min(a, room // 2)``,
and in ONE transaction its drawn amount grows by that much (compare-and-set: nothing given
can be drawn here again) and the signed ``xfer`` is stored in ``transfers_out``. Only then may
it leave. The parent's report counts it: ``given_on`` is added to the log's draws (``u``).

Receiver (``receive``). A peer's ``xfer`` for this fog: stored as a lease of the owner with id
``x`` (the sub-lease), amount ``a``, expiry ``na``, in ONE transaction with its row in
``transfers_in``; the same ``x`` again is a duplicate (never credited twice), another content
under a known ``x`` is refused. The sub-lease is then drawn and reported as any lease (13.1,
14.4). One already expired is not stored: the caller reports it unused (``u`` = 0), as a lease
arriving expired (14.4). One whose signer is not (yet) a fog credential of the giver known here
is refused ("unverified"); when that copy is the cloud's retained one on this fog's lease topic,
the cloud holds the sub-lease in escrow, and the caller reports it unused too, or nothing would
ever close it (found by tests/sim: the credential arrived after both copies).
"""

import sqlite3
from dataclasses import dataclass, field
from typing import Final

import nacl.signing

from fog.batcher import transaction
from fog.peers import fog_key_valid
from protocol.errors import Declined
from protocol.reasons import Reason
from protocol.signing import open_envelope, seal_signed
from protocol.transfer import Transfer, TransferRequest, request_topic, transfer_id

TRANSFER_BYTES_MAX: Final = 1_024
ASK_TIMEOUT_MS: Final = 2_000  # an unanswered xreq is resent after this
ASK_ATTEMPTS_MAX: Final = 3  # sends to one peer, then the next peer
ASKS_OUTSTANDING_MAX: Final = 10_000

DDL: Final = (
    """CREATE TABLE IF NOT EXISTS transfers_out (
        transfer_id BLOB PRIMARY KEY,
        request_id BLOB NOT NULL UNIQUE,   -- the xreq it answers (idempotent by it)
        lease_id BLOB NOT NULL,            -- the parent, debited by amount_micros
        receiver TEXT NOT NULL,
        amount_micros INTEGER NOT NULL CHECK (amount_micros > 0),
        envelope BLOB NOT NULL,            -- the signed xfer, sent again as is
        given_ms INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS transfers_out_lease ON transfers_out (lease_id)",
    """CREATE TABLE IF NOT EXISTS transfers_in (
        transfer_id BLOB PRIMARY KEY,      -- = the sub-lease's lease_id
        id BLOB NOT NULL UNIQUE,           -- the xfer's message id
        giver TEXT NOT NULL,
        lease_id BLOB NOT NULL,            -- the giver's parent lease
        envelope BLOB NOT NULL,
        received_ms INTEGER NOT NULL
    )""",
)


@dataclass(frozen=True, slots=True)
class Given:
    """The giver's answer: the ``xfer`` to publish (to ``receiver`` and up to the cloud)."""

    status: str  # "given" | "again" (answered before: the same bytes) | "refused" | "none"
    envelope: bytes = b""
    receiver: str = ""
    amount_micros: int = 0
    lease_id: bytes = b""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Received:
    status: str  # "accepted" | "duplicate" | "refused" | "expired" | "unverified"
    transfer_id: bytes = b""
    owner_id: str = ""
    currency: str = ""
    amount_micros: int = 0
    giver: str = ""
    reason: Reason | None = None
    detail: str = ""


def init(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        for sql in DDL:
            conn.execute(sql)


def given_on(conn: sqlite3.Connection, lease_id: bytes) -> int:
    """Micros carved out of ``lease_id`` by transfers (part of its drawn amount and of its
    report's ``u``)."""
    row = conn.execute(
        "SELECT coalesce(sum(amount_micros), 0) FROM transfers_out WHERE lease_id = ?",
        (lease_id,),
    ).fetchone()
    return int(row[0])


def outgoing(conn: sqlite3.Connection, lease_id: bytes) -> list[bytes]:
    """The ``xfer``s carved from ``lease_id``, oldest first (they go up before its report)."""
    rows = conn.execute(
        "SELECT envelope FROM transfers_out WHERE lease_id = ? ORDER BY given_ms, transfer_id",
        (lease_id,),
    ).fetchall()
    return [bytes(r[0]) for r in rows]


def received_open(conn: sqlite3.Connection, *, limit: int = 64) -> list[bytes]:
    """The ``xfer``s of sub-leases received and not closed yet (the cloud has not cleared
    them): sent up before the batches that may hold draws on them."""
    rows = conn.execute(
        "SELECT envelope FROM transfers_in WHERE transfer_id NOT IN "
        "(SELECT lease_id FROM lease_reports WHERE closed_ms IS NOT NULL) "
        "ORDER BY received_ms, transfer_id LIMIT ?",
        (limit,),
    ).fetchall()
    return [bytes(r[0]) for r in rows]


def give(
    conn: sqlite3.Connection,
    envelope: bytes,
    *,
    own_fog_id: str,
    peers: tuple[str, ...],
    issuer: bytes,
    key: nacl.signing.SigningKey,
    now_ms: int,
) -> Given:
    """Answer a peer's ``xreq`` (docs/protocol.md 18.2): debit and store, then the caller sends."""
    if len(envelope) > TRANSFER_BYTES_MAX:
        return Given("refused", detail="too large")
    try:
        signed = open_envelope(envelope, TransferRequest)
    except Declined as exc:
        return Given("refused", detail=f"{exc.reason}: {exc.detail}"[:200])
    req = signed.msg
    if req.giver_id != own_fog_id or req.fog_id not in peers:
        return Given("refused", detail=f"xreq of {req.fog_id} for {req.giver_id}: not a peer's")
    if not fog_key_valid(conn, req.fog_id, signed.signer, issuer=issuer, now_ms=now_ms):
        return Given("refused", detail=f"not signed by a fog credential of {req.fog_id}")
    xid = transfer_id(signed.id)
    with transaction(conn):
        row = conn.execute(
            "SELECT envelope, receiver, amount_micros, lease_id FROM transfers_out "
            "WHERE request_id = ?",
            (signed.id,),
        ).fetchone()
        if row is not None:
            return Given("again", bytes(row[0]), str(row[1]), int(row[2]), bytes(row[3]))
        lease = conn.execute(
            "SELECT lease_id, amount_micros, drawn_micros, not_after_ms FROM leases "
            "WHERE owner_id = ? AND currency = ? AND not_after_ms >= ? "
            "AND drawn_micros < amount_micros AND lease_id NOT IN "
            "(SELECT lease_id FROM lease_reports) "
            "ORDER BY amount_micros - drawn_micros DESC, not_after_ms DESC, lease_id LIMIT 1",
            (req.owner_id, req.currency, now_ms),
        ).fetchone()
        if lease is None:
            return Given("none", detail="no live lease of that owner and currency")
        lease_id, amount, drawn, not_after = bytes(lease[0]), lease[1], lease[2], lease[3]
        give_micros = min(req.amount_micros, (amount - drawn) // 2)
        if give_micros < 1:
            return Given("none", detail="too little room to share")
        xfer = Transfer(
            transfer_id=xid,
            lease_id=lease_id,
            fog_id=own_fog_id,
            receiver_id=req.fog_id,
            owner_id=req.owner_id,
            currency=req.currency,
            amount_micros=give_micros,
            not_after_ms=not_after,
            time_ms=max(now_ms, 1),
        )
        wire = seal_signed(xfer, key).raw
        debited = conn.execute(
            "UPDATE leases SET drawn_micros = ? WHERE lease_id = ? AND drawn_micros = ?",
            (drawn + give_micros, lease_id, drawn),
        ).rowcount
        assert debited == 1, "the parent lease changed under its debit"
        conn.execute(
            "INSERT INTO transfers_out (transfer_id, request_id, lease_id, receiver, "
            "amount_micros, envelope, given_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (xid, signed.id, lease_id, req.fog_id, give_micros, wire, now_ms),
        )
    return Given("given", wire, req.fog_id, give_micros, lease_id)


def receive(
    conn: sqlite3.Connection, envelope: bytes, *, own_fog_id: str, issuer: bytes, now_ms: int
) -> Received:
    """Store a peer's ``xfer`` for this fog as a sub-lease, once per transfer id."""
    if len(envelope) > TRANSFER_BYTES_MAX:
        return Received("refused", reason=Reason.MALFORMED, detail="too large")
    try:
        signed = open_envelope(envelope, Transfer)
    except Declined as exc:
        return Received("refused", reason=exc.reason, detail=exc.detail[:200])
    x = signed.msg
    if x.receiver_id != own_fog_id:
        return Received("refused", reason=Reason.WRONG_FOG, detail=f"for {x.receiver_id}")
    if not fog_key_valid(conn, x.fog_id, signed.signer, issuer=issuer, now_ms=now_ms):
        # refused: nothing is stored and nothing may be drawn; "unverified" tells the caller
        # the transfer id, so that a copy the cloud holds can be reported unused (18.2)
        return Received(
            "unverified",
            x.transfer_id,
            x.owner_id,
            x.currency,
            0,
            x.fog_id,
            reason=Reason.BAD_SIGNATURE,
            detail=f"not signed by a fog credential of {x.fog_id}",
        )
    out = Received("accepted", x.transfer_id, x.owner_id, x.currency, x.amount_micros, x.fog_id)
    with transaction(conn):
        known = conn.execute(
            "SELECT id FROM transfers_in WHERE transfer_id = ?", (x.transfer_id,)
        ).fetchone()
        if known is not None:
            if bytes(known[0]) == signed.id:
                return Received("duplicate", x.transfer_id, x.owner_id, x.currency, 0, x.fog_id)
            return Received("refused", reason=Reason.MALFORMED, detail="transfer id reused")
        clash = conn.execute(
            "SELECT 1 FROM leases WHERE lease_id = ? UNION ALL "
            "SELECT 1 FROM lease_reports WHERE lease_id = ?",
            (x.transfer_id, x.transfer_id),
        ).fetchone()
        if clash is not None:
            return Received("refused", reason=Reason.MALFORMED, detail="id of a known lease")
        if x.not_after_ms < now_ms:  # expired on arrival: the caller reports it unused
            return Received("expired", x.transfer_id, x.owner_id, x.currency, 0, x.fog_id)
        conn.execute(
            "INSERT INTO transfers_in (transfer_id, id, giver, lease_id, envelope, "
            "received_ms) VALUES (?, ?, ?, ?, ?, ?)",
            (x.transfer_id, signed.id, x.fog_id, x.lease_id, envelope, now_ms),
        )
        conn.execute(
            "INSERT INTO leases (lease_id, id, owner_id, currency, amount_micros, not_after_ms) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (x.transfer_id, signed.id, x.owner_id, x.currency, x.amount_micros, x.not_after_ms),
        )
    return out


@dataclass(slots=True)
class _Ask:
    wire: bytes
    peer: int  # index in the peers list
    amount: int
    next_ms: int
    attempts: int = 1


@dataclass(slots=True)
class TransferAsks:
    """The asking side: at most one ``xreq`` outstanding per (owner, currency), resent (same
    bytes) every ``timeout_ms`` up to ``ASK_ATTEMPTS_MAX`` times, then to the next peer; the
    last peer unanswered: forgotten. Answered when a transfer of the pair arrives. Pure."""

    fog_id: str
    key: nacl.signing.SigningKey
    peers: tuple[str, ...]
    timeout_ms: int = ASK_TIMEOUT_MS
    pending: dict[tuple[str, str], _Ask] = field(default_factory=dict)

    def ask(
        self, pair: tuple[str, str], amount: int, *, now_ms: int, mono_ms: int
    ) -> tuple[str, bytes] | None:
        if not self.peers or pair in self.pending or len(self.pending) >= ASKS_OUTSTANDING_MAX:
            return None
        return self._send(pair, 0, amount, now_ms, mono_ms)

    def _send(
        self, pair: tuple[str, str], peer: int, amount: int, now_ms: int, mono_ms: int
    ) -> tuple[str, bytes]:
        giver = self.peers[peer]
        req = TransferRequest(
            fog_id=self.fog_id,
            giver_id=giver,
            owner_id=pair[0],
            currency=pair[1],
            amount_micros=amount,
            time_ms=max(now_ms, 1),
        )
        wire = seal_signed(req, self.key).raw
        self.pending[pair] = _Ask(wire, peer, amount, mono_ms + self.timeout_ms)
        return request_topic(giver), wire

    def answered(self, pair: tuple[str, str]) -> bool:
        return self.pending.pop(pair, None) is not None

    def due(self, *, now_ms: int, mono_ms: int) -> list[tuple[str, bytes]]:
        out = []
        for pair, a in list(self.pending.items()):
            if mono_ms < a.next_ms:
                continue
            if a.attempts < ASK_ATTEMPTS_MAX:
                a.attempts += 1
                a.next_ms = mono_ms + self.timeout_ms
                out.append((request_topic(self.peers[a.peer]), a.wire))
            elif a.peer + 1 < len(self.peers):
                out.append(self._send(pair, a.peer + 1, a.amount, now_ms, mono_ms))
            else:
                del self.pending[pair]
        return out
