"""Leases: replicated credit budgets, granted, drawn, reported and returned.

An owner's credit limit bounds its **exposure**, the sum of

- every lease not yet closed, counted at ``max(amount, drawn)``: until the fog reports, the
  cloud cannot know what was drawn offline, so the whole lease stays in escrow, even after
  it expired; a fog that overdrew is counted at what it drew;
- every booked, unsettled transfer drawn on a closed lease;
- the settlement carry (below one minor unit) the owner still owes.

A lease is granted only if ``exposure + amount <= limit``, inside the transaction that
records it, so **outstanding leases + authorized-but-unsettled <= credit limit** holds after
every transaction (unless a fog overdraws: that is flagged, and the overdraft counted).

A lease closes when its fog's ``lrep`` says what it drew (``u``) up to batch ``b``, the cloud
holds that fog's batches up to ``b`` and the booked draws on the lease equal ``u``; then its
unused part is free. The report may come before the lease's ``na`` (the fog gave it back
early, docs/protocol.md 18.1): the same rules apply. A report that disagrees raises
``lease_report_mismatch`` and the lease stays in escrow for an operator; if what was missing
arrives later (the fog's ``xfer`` or batch overtaken by its report) and the lease closes, the
alarm is cleared (``alarm_cleared``). Settlement frees the
closed leases' booked transfers.
"""

import os
from dataclasses import dataclass
from typing import Final

import nacl.signing
import structlog

from cloud import registry
from cloud.booking import ALARM_LEASE_REPORT, Alarm
from cloud.store import Tx, clamp_ms
from protocol import limits, topics
from protocol.errors import Declined
from protocol.leasing import LeaseRecall, LeaseReport, LeaseRequest
from protocol.messages import Lease, decode_body
from protocol.reasons import Reason
from protocol.signing import open_envelope, seal_signed, split_envelope

log = structlog.get_logger()

STATE_OPEN: Final = "open"
STATE_CLOSED: Final = "closed"
OPEN_LEASES_PER_FOG_OWNER_MAX: Final = 4
# micros peer transfers carved out of lease ``l`` (docs/protocol.md 18.2), as SQL
_GIVEN: Final = (
    "COALESCE((SELECT SUM(p.amount_micros) FROM peer_transfers p "
    "WHERE p.parent_id = l.lease_id), 0)"
)


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    initial_micros: int = 10_000_000  # the lease a fog gets when it first sees an owner
    request_micros_max: int = 100_000_000  # most one request may obtain
    lease_ms: int = 3_600_000
    # a lease request that finds no credit asks other fogs to give the owner's idle leases
    # back (``rbal``, docs/protocol.md 18.5), at most once per lease in this time; 0: never
    recall_every_ms: int = 30_000

    def __post_init__(self) -> None:
        assert 0 < self.initial_micros <= self.request_micros_max <= limits.AMOUNT_MICROS_MAX
        assert self.lease_ms > 0
        assert 0 <= self.recall_every_ms <= 86_400_000, "recall_every_ms: 0 .. 86400000"


@dataclass(frozen=True, slots=True)
class Granted:
    lease: Lease
    envelope: bytes
    topic: str


async def exposure(tx: Tx, owner_id: str) -> int:
    # an open lease at max(amount - given, drawn): what it gave to peers (18.2) counts in
    # the sub-leases, open leases of their receivers, so a transfer adds nothing
    row = await tx.fetchone(
        "SELECT CAST(COALESCE(SUM(CASE WHEN l.drawn_micros > l.amount_micros - "
        f"{_GIVEN} THEN l.drawn_micros ELSE l.amount_micros - {_GIVEN} END), 0) AS BIGINT) "
        "FROM leases l WHERE l.owner_id = ? AND l.state = ?",
        (owner_id, STATE_OPEN),
    )
    closed = await tx.fetchone(
        "SELECT CAST(COALESCE(SUM(t.amount_micros), 0) AS BIGINT) FROM transfers t "
        "JOIN leases l ON l.lease_id = t.lease_id "
        "WHERE t.debit = ? AND l.state = ? AND t.period IS NULL",
        (owner_id, STATE_CLOSED),
    )
    carry = await tx.fetchone(
        "SELECT CAST(COALESCE(SUM(charge_micros), 0) AS BIGINT) FROM carries WHERE owner_id = ?",
        (owner_id,),
    )
    assert row is not None and closed is not None and carry is not None
    return int(row[0]) + int(closed[0]) + int(carry[0])


async def available(tx: Tx, owner_id: str) -> int:
    owner = await registry.get_owner(tx, owner_id)
    if owner is None:
        return 0
    return max(0, owner.limit_micros - await exposure(tx, owner_id))


async def grant(
    tx: Tx,
    issuer: nacl.signing.SigningKey,
    *,
    owner_id: str,
    fog_id: str,
    amount_micros: int,
    now_ms: int,
    policy: LeasePolicy,
) -> Granted:
    """Grant up to ``amount_micros`` (less if the owner's credit is short); raises
    Declined(INSUFFICIENT_BUDGET) when nothing can be granted."""
    owner = await registry.get_owner(tx, owner_id)
    if owner is None or owner.status != registry.STATUS_ACTIVE:
        raise Declined(Reason.UNKNOWN_DEVICE, f"no active owner {owner_id!r}")
    if await registry.fog_key(tx, fog_id) is None:
        raise Declined(Reason.WRONG_FOG, f"no fog {fog_id!r}")
    open_n = await tx.fetchone(
        "SELECT COUNT(*) FROM leases WHERE owner_id = ? AND fog_id = ? AND state = ? "
        "AND not_after_ms > ?",
        (owner_id, fog_id, STATE_OPEN, now_ms),
    )
    assert open_n is not None
    if open_n[0] >= OPEN_LEASES_PER_FOG_OWNER_MAX:
        raise Declined(Reason.RATE_LIMITED, "fog holds the most live leases for this owner")
    amount = min(amount_micros, policy.request_micros_max, await available(tx, owner_id))
    if amount <= 0:
        raise Declined(Reason.INSUFFICIENT_BUDGET, f"owner {owner_id!r} has no credit left")
    lease = Lease(
        lease_id=os.urandom(limits.LEASE_ID_BYTES),
        owner_id=owner_id,
        fog_id=fog_id,
        amount_micros=amount,
        currency=owner.currency,
        not_after_ms=now_ms + policy.lease_ms,
    )
    raw = seal_signed(lease, issuer).raw
    await tx.execute(
        "INSERT INTO leases (lease_id, owner_id, fog_id, currency, amount_micros, not_after_ms, "
        "granted_ms, state, drawn_micros, envelope) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
        (
            *(lease.lease_id, owner_id, fog_id, lease.currency, amount),
            *(clamp_ms(lease.not_after_ms), now_ms, STATE_OPEN, raw),
        ),
    )
    topic = topics.lease_topic(fog_id, lease.lease_id)
    await registry.put_retained(tx, topic, raw)
    assert await exposure(tx, owner_id) <= owner.limit_micros
    return Granted(lease, raw, topic)


async def handle_request(
    tx: Tx, issuer: nacl.signing.SigningKey, wire: bytes, *, now_ms: int, policy: LeasePolicy
) -> Granted | None:
    """Answer a fog's signed ``lreq``. Idempotent by request id: at most one lease per request
    (a copy gets the same lease; None once that lease is closed). A copy of a request that
    found no credit is tried again: credit may have come back since (a report, a settlement,
    a lease given back on the cloud's ask, 18.5). Raises Declined for a request that is not
    the fog's or not well-formed (nothing is stored then)."""
    signed = open_envelope(wire, LeaseRequest)
    req = signed.msg
    key = await registry.fog_key(tx, req.fog_id)
    if key is None or key != signed.signer:
        raise Declined(Reason.BAD_SIGNATURE, "lreq: signer is not the fog's key")
    prior = await tx.fetchone(
        "SELECT r.lease_id, l.envelope, l.state FROM lease_requests r "
        "LEFT JOIN leases l ON l.lease_id = r.lease_id WHERE r.request_id = ?",
        (signed.id,),
    )
    if prior is not None and prior[0] is not None:
        if prior[2] == STATE_CLOSED:
            # the lease it got is closed: a resent request must not put a closed lease back
            # on the retained topic the cloud cleared
            return None
        lease = open_envelope(bytes(prior[1]), Lease).msg
        return Granted(lease, bytes(prior[1]), topics.lease_topic(lease.fog_id, lease.lease_id))
    owner = await registry.get_owner(tx, req.owner_id)
    if owner is None or owner.currency != req.currency:
        raise Declined(Reason.CURRENCY, "lreq: no such owner in that currency")
    amount = req.amount_micros if req.amount_micros is not None else policy.initial_micros
    try:
        granted: Granted | None = await grant(
            tx,
            issuer,
            owner_id=req.owner_id,
            fog_id=req.fog_id,
            amount_micros=amount,
            now_ms=now_ms,
            policy=policy,
        )
    except Declined as exc:
        log.info("lease_refused", fog_id=req.fog_id, owner=req.owner_id, reason=exc.reason)
        granted = None
    lease_id = None if granted is None else granted.lease.lease_id
    if prior is not None:  # refused before: granted now, or refused again
        if lease_id is not None:
            await tx.execute(
                "UPDATE lease_requests SET lease_id = ? WHERE request_id = ?", (lease_id, signed.id)
            )
        return granted
    await tx.execute(
        "INSERT INTO lease_requests (request_id, fog_id, owner_id, lease_id) VALUES (?, ?, ?, ?)",
        (signed.id, req.fog_id, req.owner_id, lease_id),
    )
    return granted


RECALLS_PER_REQUEST_MAX: Final = 4


async def recalls(
    tx: Tx, issuer: nacl.signing.SigningKey, wire: bytes, *, now_ms: int, policy: LeasePolicy
) -> list[tuple[str, bytes]]:
    """Rebalancing (docs/protocol.md 18.5): the ``lreq`` ``wire`` (verified by
    ``handle_request`` in this transaction) found no credit. Ask the fogs holding the
    owner's other open, unreported, live leases with room (most room first, at most
    ``RECALLS_PER_REQUEST_MAX``, each lease at most once per ``policy.recall_every_ms``) to
    give them back: issuer-signed ``rbal`` messages, (topic, envelope) to publish NOT
    retained on each lease's topic. A fog gives the lease back only if the owner is idle
    there; the credit returns when the cloud closes it by its report (14.4), and the asking
    fog's next request is granted from it."""
    if not policy.recall_every_ms:
        return []
    req = decode_body(
        LeaseRequest, split_envelope(wire, bytes_max=LeaseRequest.ENVELOPE_BYTES_MAX).body
    )
    rows = await tx.fetchall(
        "SELECT l.lease_id, l.fog_id, l.amount_micros - l.drawn_micros - "
        f"CAST({_GIVEN} AS BIGINT) AS room FROM leases l WHERE l.owner_id = ? "
        "AND l.currency = ? AND l.state = ? AND l.fog_id <> ? AND l.reported_micros IS NULL "
        "AND l.not_after_ms > ? AND NOT EXISTS (SELECT 1 FROM lease_recalls r "
        "WHERE r.lease_id = l.lease_id AND r.asked_ms > ?) "
        "ORDER BY room DESC, l.lease_id LIMIT ?",
        (
            req.owner_id,
            req.currency,
            STATE_OPEN,
            req.fog_id,
            now_ms,
            now_ms - policy.recall_every_ms,
            RECALLS_PER_REQUEST_MAX,
        ),
    )
    out = []
    for lease_id, fog_id, room in rows:
        if int(room) <= 0:
            continue
        lease_id = bytes(lease_id)
        await tx.execute(
            "INSERT INTO lease_recalls (lease_id, asked_ms) VALUES (?, ?) "
            "ON CONFLICT (lease_id) DO UPDATE SET asked_ms = excluded.asked_ms",
            (lease_id, now_ms),
        )
        recall = LeaseRecall(
            lease_id=lease_id,
            fog_id=str(fog_id),
            owner_id=req.owner_id,
            requester=req.fog_id,
            time_ms=max(now_ms, 1),
        )
        out.append((topics.lease_topic(str(fog_id), lease_id), seal_signed(recall, issuer).raw))
        log.info(
            "lease_recalled",
            fog_id=str(fog_id),
            owner=req.owner_id,
            lease=lease_id.hex(),
            room_micros=int(room),
            requester=req.fog_id,
        )
    return out


async def handle_report(tx: Tx, wire: bytes, *, now_ms: int = 0) -> list[str]:
    """Record a fog's signed ``lrep`` and close what can be closed; returns the retained
    topics to clear (closed leases). Idempotent by lease id."""
    signed = open_envelope(wire, LeaseReport)
    rep = signed.msg
    row = await tx.fetchone(
        "SELECT fog_id FROM leases WHERE lease_id = ?",
        (rep.lease_id,),
    )
    key = await registry.fog_key(tx, rep.fog_id)
    if row is None or row[0] != rep.fog_id or key != signed.signer:
        raise Declined(Reason.BAD_SIGNATURE, "lrep: not the lease's fog")
    inserted = await tx.execute(
        "INSERT INTO lease_reports (lease_id, fog_id, drawn_micros, batch, envelope) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (lease_id) DO NOTHING",
        (rep.lease_id, rep.fog_id, rep.drawn_micros, clamp_ms(rep.last_batch), wire),
    )
    if inserted:
        await tx.execute(
            "UPDATE leases SET reported_micros = ?, report_batch = ? WHERE lease_id = ?",
            (rep.drawn_micros, clamp_ms(rep.last_batch), rep.lease_id),
        )
    chain = await tx.fetchone("SELECT number FROM chains WHERE fog_id = ?", (rep.fog_id,))
    number = 0 if chain is None else chain[0]
    cleared = await close_reported(tx, rep.fog_id, number, now_ms=now_ms)
    topic = topics.lease_topic(rep.fog_id, rep.lease_id)
    state = await tx.fetchone("SELECT state FROM leases WHERE lease_id = ?", (rep.lease_id,))
    if topic not in cleared and state is not None and state[0] == STATE_CLOSED:
        cleared.append(topic)  # closed before: clear again (the fog may have missed it)
    return cleared


async def close_reported(tx: Tx, fog_id: str, chain_number: int, *, now_ms: int = 0) -> list[str]:
    """Close the fog's reported leases whose batches are all held; returns retained topics
    to clear. A report that disagrees with the booked draws leaves the lease in escrow."""
    rows = await tx.fetchall(
        "SELECT l.lease_id, l.drawn_micros, l.reported_micros, l.owner_id, l.amount_micros, "
        f"l.not_after_ms, CAST({_GIVEN} AS BIGINT) FROM leases l "
        "WHERE l.fog_id = ? AND l.state = ? AND l.reported_micros IS NOT NULL "
        "AND l.report_batch <= ?",
        (fog_id, STATE_OPEN, chain_number),
    )
    cleared = []
    for lease_id, booked, reported, owner_id, amount, not_after, given in rows:
        # what the fog drew on it, as the cloud knows it: booked draws plus what it gave to
        # peers (18.2); a report waiting for an xfer closes when that arrives
        drawn = int(booked) + int(given)
        lease_id = bytes(lease_id)
        if drawn != reported:
            await add_alarm(
                tx,
                Alarm(ALARM_LEASE_REPORT, lease_id.hex(), f"reported {reported}, booked {drawn}"),
                fog_id=fog_id,
                now_ms=now_ms,
            )
            continue
        await tx.execute("UPDATE leases SET state = ? WHERE lease_id = ?", (STATE_CLOSED, lease_id))
        await _clear_explained(tx, lease_id, fog_id)
        topic = topics.lease_topic(fog_id, lease_id)
        await tx.execute("DELETE FROM retained WHERE topic = ?", (topic,))
        cleared.append(topic)
        # early: the fog gave it back before its na (docs/protocol.md 18.1)
        log.info(
            "lease_closed",
            fog_id=fog_id,
            owner=owner_id,
            lease=lease_id.hex(),
            drawn=drawn,
            returned=max(0, amount - drawn),
            given=int(given),
            early=bool(now_ms) and now_ms <= not_after,
        )
    return cleared


async def _clear_explained(tx: Tx, lease_id: bytes, fog_id: str) -> None:
    """The lease closes because its report now agrees with the books: a mismatch raised
    earlier was a report that overtook its fog's ``xfer`` (18.2) or batches, not money
    missing. The alarm goes; the log line keeps what it said."""
    subject = lease_id.hex()
    row = await tx.fetchone(
        "SELECT detail FROM alarms WHERE kind = ? AND subject = ?", (ALARM_LEASE_REPORT, subject)
    )
    if row is None:
        return
    await tx.execute(
        "DELETE FROM alarms WHERE kind = ? AND subject = ?", (ALARM_LEASE_REPORT, subject)
    )
    log.info(
        "alarm_cleared",
        kind=ALARM_LEASE_REPORT,
        fog_id=fog_id,
        lease=subject,
        was=str(row[0]),
        cause="the lease closed: its report agrees with the books now",
    )


async def add_alarm(tx: Tx, alarm: Alarm, *, fog_id: str, now_ms: int = 0) -> bool:
    n = await tx.execute(
        "INSERT INTO alarms (kind, subject, fog_id, detail, time_ms) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (kind, subject) DO NOTHING",
        (alarm.kind, alarm.subject, fog_id, alarm.detail, now_ms),
    )
    if n:
        log.warning("alarm_raised", kind=alarm.kind, fog_id=fog_id, subject=alarm.subject[:16])
    return n == 1


@dataclass(frozen=True, slots=True)
class ForceClosed:
    """A lease ``close_fog_leases`` closed (or would close)."""

    lease_id: bytes
    owner_id: str
    currency: str
    amount_micros: int
    drawn_micros: int  # booked draws: what the lease closes at
    not_after_ms: int
    topic: str  # the retained lease topic cleared
    given_micros: int = 0  # carved out by peer transfers: the sub-leases still count (18.2)

    @property
    def returned_micros(self) -> int:
        """What returns to the owner's credit: the lease no longer counts, its booked
        draws do (as transfers on a closed lease, 14.5), and what it gave to peers does (as
        the receivers' sub-leases)."""
        return max(0, self.amount_micros - self.drawn_micros - self.given_micros)


async def open_fog_leases(tx: Tx, fog_id: str) -> list[ForceClosed]:
    rows = await tx.fetchall(
        "SELECT l.lease_id, l.owner_id, l.currency, l.amount_micros, l.drawn_micros, "
        f"l.not_after_ms, CAST({_GIVEN} AS BIGINT) FROM leases l "
        "WHERE l.fog_id = ? AND l.state = ? ORDER BY l.granted_ms, l.lease_id",
        (fog_id, STATE_OPEN),
    )
    return [
        ForceClosed(
            bytes(r[0]),
            r[1],
            r[2],
            int(r[3]),
            int(r[4]),
            int(r[5]),
            topics.lease_topic(fog_id, bytes(r[0])),
            int(r[6]),
        )
        for r in rows
    ]


async def close_fog_leases(tx: Tx, fog_id: str) -> list[ForceClosed]:
    """Close every open lease of ``fog_id`` at its booked draws, as if the fog had reported
    ``u`` = booked (docs/protocol.md 17.8: a fog that lost its disk cannot report, and its
    restored self never draws on the old leases). Clears the retained lease topics (the
    service publishes the clearings within a second). Draws that arrive later (a relay, a
    device's upload) are still booked, on a closed lease (14.5)."""
    closed = await open_fog_leases(tx, fog_id)
    chain = await tx.fetchone("SELECT number FROM chains WHERE fog_id = ?", (fog_id,))
    number = 0 if chain is None else int(chain[0])
    for lease in closed:
        await tx.execute(
            "UPDATE leases SET state = ?, reported_micros = COALESCE(reported_micros, ?), "
            "report_batch = COALESCE(report_batch, ?) WHERE lease_id = ?",
            (STATE_CLOSED, lease.drawn_micros + lease.given_micros, number, lease.lease_id),
        )
        await tx.execute("DELETE FROM retained WHERE topic = ?", (lease.topic,))
        log.warning(
            "lease_force_closed",
            fog_id=fog_id,
            owner=lease.owner_id,
            lease=lease.lease_id.hex(),
            drawn=lease.drawn_micros,
            returned=lease.returned_micros,
        )
    return closed
