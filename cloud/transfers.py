"""Peer transfers at the cloud (docs/protocol.md 18.2): an ``xfer`` a fog made or got, learnt
from ``fogpay/1/up/{fog}/xfer`` (the giver and the receiver both send it up, byte for byte).

Accepted once per transfer id, in one transaction: the sub-lease becomes a lease of the
receiver (id ``x``, amount ``a``, expiry ``na``, state open) and the transfer is recorded as
**given** on its parent (``peer_transfers``). The cloud then

- publishes the ``xfer`` retained on the receiver's lease topic of ``x``, so a receiver that
  never got it from the giver gets it from the cloud (and reports it unused if it expired);
  the topic is cleared when the sub-lease closes, as any lease's (14.4);
- closes the parent if its report was waiting for this transfer: a parent closes when its
  booked draws plus what it gave equal its report's ``u`` (``cloud.leases.close_reported``).

Exposure (``cloud.leases.exposure``) counts an open parent at ``max(a - given, booked)`` and an
open sub-lease at ``max(a_x, booked_x)``: a transfer moves budget, it adds none (18.4).
"""

import structlog

from cloud import leases, registry
from cloud.store import Tx, clamp_ms
from protocol import topics
from protocol.errors import Declined
from protocol.reasons import Reason
from protocol.signing import open_envelope
from protocol.transfer import Transfer

log = structlog.get_logger()


async def given_on(tx: Tx, lease_id: bytes) -> int:
    """Micros carved out of ``lease_id`` by the transfers the cloud knows."""
    row = await tx.fetchone(
        "SELECT CAST(COALESCE(SUM(amount_micros), 0) AS BIGINT) FROM peer_transfers "
        "WHERE parent_id = ?",
        (lease_id,),
    )
    assert row is not None
    return int(row[0])


async def handle_transfer(tx: Tx, wire: bytes, *, now_ms: int) -> list[tuple[str, bytes]]:
    """Record a fog's ``xfer``; returns the retained topics to publish (the sub-lease, and the
    clearing of a parent it closes). Raises Declined for one that is not well-formed, not
    signed by the registered key of its giver, or that does not fit its parent (nothing is
    stored then). Idempotent by transfer id."""
    signed = open_envelope(wire, Transfer)
    x = signed.msg
    key = await registry.fog_key(tx, x.fog_id)
    if key is None or key != signed.signer:
        raise Declined(Reason.BAD_SIGNATURE, "xfer: signer is not the giver's key")
    known = await tx.fetchone(
        "SELECT envelope FROM peer_transfers WHERE transfer_id = ?", (x.transfer_id,)
    )
    if known is not None:
        if bytes(known[0]) != wire:
            raise Declined(Reason.MALFORMED, "xfer: transfer id known with other content")
        return []  # a copy (the receiver's after the giver's, a resend): nothing changes
    parent = await tx.fetchone(
        "SELECT fog_id, owner_id, currency, not_after_ms FROM leases WHERE lease_id = ?",
        (x.lease_id,),
    )
    if parent is None or (parent[0], parent[1], parent[2]) != (x.fog_id, x.owner_id, x.currency):
        raise Declined(Reason.WRONG_FOG, "xfer: not carved from a lease of its giver")
    if clamp_ms(x.not_after_ms) > int(parent[3]):
        raise Declined(Reason.MALFORMED, "xfer: outlives its parent lease")
    if await registry.fog_key(tx, x.receiver_id) is None:
        raise Declined(Reason.WRONG_FOG, f"xfer: no fog {x.receiver_id!r}")
    clash = await tx.fetchone("SELECT 1 FROM leases WHERE lease_id = ?", (x.transfer_id,))
    if clash is not None:
        raise Declined(Reason.MALFORMED, "xfer: transfer id of a known lease")
    await tx.execute(
        "INSERT INTO leases (lease_id, owner_id, fog_id, currency, amount_micros, not_after_ms, "
        "granted_ms, state, drawn_micros, envelope) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
        (
            *(x.transfer_id, x.owner_id, x.receiver_id, x.currency, x.amount_micros),
            *(clamp_ms(x.not_after_ms), now_ms, leases.STATE_OPEN, wire),
        ),
    )
    await tx.execute(
        "INSERT INTO peer_transfers (transfer_id, parent_id, giver, receiver, owner_id, "
        "amount_micros, envelope, time_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            *(x.transfer_id, x.lease_id, x.fog_id, x.receiver_id, x.owner_id),
            *(x.amount_micros, wire, now_ms),
        ),
    )
    topic = topics.lease_topic(x.receiver_id, x.transfer_id)
    await registry.put_retained(tx, topic, wire)
    log.info(
        "transfer_recorded",
        giver=x.fog_id,
        receiver=x.receiver_id,
        owner=x.owner_id,
        transfer=x.transfer_id.hex(),
        parent=x.lease_id.hex(),
        amount_micros=x.amount_micros,
    )
    chain = await tx.fetchone("SELECT number FROM chains WHERE fog_id = ?", (x.fog_id,))
    number = 0 if chain is None else int(chain[0])
    cleared = await leases.close_reported(tx, x.fog_id, number, now_ms=now_ms)
    return [(topic, wire), *((t, b"") for t in cleared)]


TRANSFERS_LISTED_MAX = 100


async def of_owner(tx: Tx, owner_id: str) -> dict[str, object]:
    """What ``fogpay cloud owner show`` prints as ``transfers``: how many peer transfers moved
    the owner's budget, how much per currency, how many sub-leases are still open, and the
    latest ones (at most ``TRANSFERS_LISTED_MAX``, newest first) with their state."""
    rows = await tx.fetchall(
        "SELECT p.transfer_id, p.parent_id, p.giver, p.receiver, p.amount_micros, p.time_ms, "
        "l.state, l.currency, l.drawn_micros FROM peer_transfers p "
        "JOIN leases l ON l.lease_id = p.transfer_id WHERE p.owner_id = ? "
        "ORDER BY p.time_ms DESC, p.transfer_id",
        (owner_id,),
    )
    moved: dict[str, int] = {}
    still_open = 0
    for r in rows:
        moved[str(r[7])] = moved.get(str(r[7]), 0) + int(r[4])
        still_open += r[6] == leases.STATE_OPEN
    latest = [
        {
            "transfer": bytes(r[0]).hex(),
            "parent": bytes(r[1]).hex(),
            "giver": str(r[2]),
            "receiver": str(r[3]),
            "currency": str(r[7]),
            "amount_micros": int(r[4]),
            "drawn_micros": int(r[8]),
            "state": str(r[6]),
            "time_ms": int(r[5]),
        }
        for r in rows[:TRANSFERS_LISTED_MAX]
    ]
    return {"count": len(rows), "moved_micros": moved, "open": still_open, "latest": latest}
