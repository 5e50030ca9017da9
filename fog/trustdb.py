"""Trust material and leases: verified, checked and stored (docs/protocol.md, section 13.3).

``put`` opens the envelope (the issuer must sign owner and fog credentials and leases; any
key may sign bindings and revocations, whose worth is decided when they are used), refuses
what can never count (keys that are not valid points, a lease for another fog, material
already expired, a lease id reused with other terms), and stores the rest in one
transaction, idempotent by message id: the envelope in ``trust`` (republished after a
restart) and the message's fields in the table the store queries.
"""

import sqlite3
from dataclasses import dataclass
from typing import Final, Literal

from fog.batcher import transaction
from fog.sqlints import clamp_ms
from protocol.errors import Declined
from protocol.messages import Binding, FogCredential, Lease, Message, OwnerCredential, Revocation
from protocol.reasons import Reason
from protocol.signing import Signed, is_valid_public_key, open_envelope

TRUST_TYPES: Final = ("owner", "fog", "bind", "revoke", "lease")
TRUST_CLASSES: Final[dict[str, type[Message]]] = {
    "owner": OwnerCredential,
    "fog": FogCredential,
    "bind": Binding,
    "revoke": Revocation,
    "lease": Lease,
}
ISSUER_SIGNED: Final = frozenset({"owner", "fog", "lease"})
TRUST_ROWS_MAX: Final = 1_000_000  # trust and lease envelopes kept
DETAIL_CHARS_MAX: Final = 200  # of a decline's detail, for the log line


@dataclass(frozen=True, slots=True)
class TrustOutcome:
    status: Literal["accepted", "duplicate", "refused"]
    reason: Reason | None  # when refused
    detail: str  # short description for the log line
    msg_id: bytes | None = None  # message id when the envelope verified
    # an accepted lease: its (owner_id, currency), the budget it answers (no second decode)
    lease_pair: tuple[str, str] | None = None
    # a lease of this fog that arrived already expired: its id (the fog reports it unused,
    # or the cloud would hold its amount in escrow for good)
    expired_lease: bytes | None = None


def put(
    conn: sqlite3.Connection,
    msg_type: str,
    envelope: bytes,
    *,
    issuer: bytes,
    fog_id: str,
    now_ms: int,
    full: bool,
) -> TrustOutcome:
    """Verify and store one envelope of ``msg_type`` (in TRUST_TYPES); ``full``: the store
    holds TRUST_ROWS_MAX rows already (new material refused)."""
    cls = TRUST_CLASSES.get(msg_type)
    if cls is None:
        return TrustOutcome("refused", Reason.MALFORMED, f"unknown trust type {msg_type!r}")
    signer = issuer if msg_type in ISSUER_SIGNED else None
    try:
        signed = open_envelope(envelope, cls, signer=signer)
    except Declined as exc:
        return TrustOutcome("refused", exc.reason, exc.detail[:DETAIL_CHARS_MAX])
    problem = _trust_problem(signed, fog_id=fog_id, now_ms=now_ms)
    if problem is not None:
        ours_expired = isinstance(signed.msg, Lease) and problem[0] is Reason.EXPIRED
        expired = signed.msg.lease_id if isinstance(signed.msg, Lease) and ours_expired else None
        return TrustOutcome("refused", problem[0], problem[1], signed.id, expired_lease=expired)
    with transaction(conn):
        return _store(conn, msg_type, signed, now_ms, full)


def _store(
    c: sqlite3.Connection, msg_type: str, signed: Signed[Message], now_ms: int, full: bool
) -> TrustOutcome:
    if c.execute("SELECT 1 FROM trust WHERE id = ?", (signed.id,)).fetchone() is not None:
        return TrustOutcome("duplicate", None, f"{msg_type} already stored", signed.id)
    msg = signed.msg
    if isinstance(msg, Lease):
        other = c.execute("SELECT 1 FROM leases WHERE lease_id = ?", (msg.lease_id,))
        if other.fetchone() is not None:
            return TrustOutcome(
                "refused", Reason.MALFORMED, "lease id reused with other terms", signed.id
            )
        reported = c.execute("SELECT 1 FROM lease_reports WHERE lease_id = ?", (msg.lease_id,))
        if reported.fetchone() is not None:  # reported unused: a promise never to draw on it
            return TrustOutcome("refused", Reason.EXPIRED, "lease reported already", signed.id)
    if full:
        return TrustOutcome("refused", Reason.MALFORMED, "trust store full", signed.id)
    c.execute(
        "INSERT INTO trust (id, type, envelope, received_ms) VALUES (?, ?, ?, ?)",
        (signed.id, msg_type, signed.raw, now_ms),
    )
    _insert_trust_row(c, signed)
    pair = (msg.owner_id, msg.currency) if isinstance(msg, Lease) else None
    return TrustOutcome("accepted", None, _describe(msg), signed.id, pair)


def envelopes(conn: sqlite3.Connection) -> list[tuple[str, bytes]]:
    """All stored trust and lease envelopes as (type, bytes), in arrival order."""
    rows = conn.execute("SELECT type, envelope FROM trust ORDER BY rowid").fetchall()
    return [(str(t), bytes(e)) for t, e in rows]


def _trust_problem(
    signed: Signed[Message], *, fog_id: str, now_ms: int
) -> tuple[Reason, str] | None:
    """Why verified trust material is refused, or None: keys that are not valid points,
    leases for another fog, material already past its validity."""
    msg = signed.msg
    if not is_valid_public_key(signed.signer):
        return Reason.MALFORMED, f"{msg.TYPE}: signer is not a valid public key"
    key = msg.device if isinstance(msg, Binding) else getattr(msg, "key", None)
    if key is not None and not is_valid_public_key(key):
        return Reason.MALFORMED, f"{msg.TYPE}: key is not a valid public key"
    if isinstance(msg, Lease) and msg.fog_id != fog_id:
        return Reason.WRONG_FOG, f"lease for fog {msg.fog_id}"
    not_after = getattr(msg, "not_after_ms", None)
    if not_after is not None and not_after < now_ms:
        return Reason.EXPIRED, f"{msg.TYPE}: expired"
    return None


def _insert_trust_row(c: sqlite3.Connection, signed: Signed[Message]) -> None:
    msg, i = signed.msg, signed.id
    if isinstance(msg, OwnerCredential):
        c.execute(
            "INSERT INTO owners (id, owner_id, key, nb, na, body) VALUES (?, ?, ?, ?, ?, ?)",
            (
                i,
                msg.owner_id,
                msg.key,
                clamp_ms(msg.not_before_ms),
                clamp_ms(msg.not_after_ms),
                signed.body,
            ),
        )
    elif isinstance(msg, FogCredential):
        c.execute("INSERT INTO fogs (id, fog_id, key) VALUES (?, ?, ?)", (i, msg.fog_id, msg.key))
    elif isinstance(msg, Binding):
        c.execute(
            "INSERT INTO bindings (id, device, owner_id, signer, nb, na, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                i,
                msg.device,
                msg.owner_id,
                signed.signer,
                clamp_ms(msg.not_before_ms),
                clamp_ms(msg.not_after_ms),
                signed.body,
            ),
        )
    elif isinstance(msg, Revocation):
        c.execute(
            "INSERT INTO revocations (id, key, signer) VALUES (?, ?, ?)",
            (i, msg.key, signed.signer),
        )
    else:
        assert isinstance(msg, Lease)
        c.execute(
            "INSERT INTO leases (lease_id, id, owner_id, currency, amount_micros, not_after_ms) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                msg.lease_id,
                i,
                msg.owner_id,
                msg.currency,
                msg.amount_micros,
                clamp_ms(msg.not_after_ms),
            ),
        )


def _describe(msg: Message) -> str:
    """A short description for the log line: ids, never keys in full."""
    if isinstance(msg, OwnerCredential):
        return f"owner {msg.owner_id} key {msg.key.hex()[:16]}"
    if isinstance(msg, FogCredential):
        return f"fog {msg.fog_id} key {msg.key.hex()[:16]}"
    if isinstance(msg, Binding):
        return f"binding device {msg.device.hex()[:16]} owner {msg.owner_id}"
    if isinstance(msg, Revocation):
        return f"revocation of {msg.key.hex()[:16]}"
    assert isinstance(msg, Lease)
    return f"lease {msg.lease_id.hex()} owner {msg.owner_id} {msg.amount_micros} {msg.currency}"
