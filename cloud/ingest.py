"""Batch ingest: verify a fog's batch, chain it, book it once, and sign the ack.

``Ingestor.ingest_batch(wire)`` takes a batch's wire bytes as they came off
``fogpay/1/up/{fog_id}/batch`` and returns an ``IngestOutcome`` with what to publish (the
retained ack, revocations of suspended devices, leases to clear). The MQTT shell stays thin.

The chain (spec section 7): batch ``b`` of a fog is booked only after ``b - 1``, and only if
its ``h`` is the id of the header booked as ``b - 1`` and its ``s`` continues the log. A
batch from the future is *held* (stored, verified, not booked) until the gap fills; one
that contradicts the chain (same ``b``, other header; or ``h`` not the previous id) is a
*fork*: refused, and an alarm. A batch already booked is a *duplicate*: answered with the
current ack, nothing changes. The ack names the highest batch booked with all before it.

Verification (``cloud.verify.check_batch``) is pure and CPU-bound; pass ``verifier`` to run
it in a process pool. Booking (``cloud.booking.plan``) is pure too; this module only loads
state, applies the plan and signs, in one transaction, durable before the ack is returned.
"""

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Final

import nacl.signing
import structlog

from cloud import booking, leases, registry
from cloud.booking import ALARM_FORK, Alarm, BindingRow, BookState, LeaseRow, Plan, Transfer
from cloud.metrics import Metrics
from cloud.store import Store, StoreConflict, Tx, fetch_in
from cloud.verify import CheckedBatch, CheckedHeader, check_batch, check_header
from protocol import topics
from protocol.batch import decode_batch
from protocol.errors import Declined
from protocol.messages import ZERO_HASH, Ack
from protocol.reasons import Reason
from protocol.signing import seal_signed

log = structlog.get_logger()

HELD_BATCHES_MAX: Final = 64  # per fog: a gap longer than this is refused until it fills
SUSPEND_REASON: Final = "suspended: cloned key (two intents at one q)"


class Status(enum.StrEnum):
    BOOKED = "booked"
    DUPLICATE = "duplicate"
    HELD = "held"
    FORK = "fork"
    REFUSED = "refused"
    DEFERRED = "deferred"  # the store gave up under contention; nothing written, no ack


@dataclass(slots=True)
class IngestOutcome:
    status: Status
    fog_id: str = ""
    number: int = 0
    reason: Reason | None = None
    booked: int = 0
    duplicates: int = 0
    rejected: int = 0
    alarms: list[str] = field(default_factory=list)
    publish: list[tuple[str, bytes]] = field(default_factory=list)  # (topic, payload) retained

    @property
    def ack(self) -> bytes | None:
        for topic, payload in self.publish:
            if topic.endswith("/ack"):
                return payload
        return None


@dataclass(slots=True)
class Chain:
    number: int
    header_id: bytes
    next_index: int


Verifier = Callable[[bytes], Awaitable[CheckedBatch]]


async def verify_inline(wire: bytes) -> CheckedBatch:
    return check_batch(wire)


class Ingestor:
    def __init__(
        self,
        *,
        store: Store,
        issuer: nacl.signing.SigningKey,
        clock: Callable[[], int],
        verifier: Verifier = verify_inline,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._issuer = issuer
        self._clock = clock
        self._verifier = verifier
        self.metrics = metrics or Metrics()

    async def ingest_batch(self, wire: bytes) -> IngestOutcome:
        """Idempotent: the same bytes again change nothing and get the same ack."""
        try:
            checked = await self._verifier(wire)
        except Declined as exc:
            return self._refused(exc, None)
        try:
            out = await self._store.transact(lambda tx: self._ingest(tx, checked, wire))
        except Declined as exc:
            return self._refused(exc, checked.header)
        except StoreConflict:
            self.metrics.inc("batch_deferred")
            h = checked.header
            log.warning("batch_deferred", fog_id=h.fog_id, batch=h.number)
            return IngestOutcome(Status.DEFERRED, h.fog_id, h.number)
        self.metrics.inc(f"batch_{out.status}")
        self.metrics.inc("records_booked", out.booked)
        self.metrics.inc("records_rejected", out.rejected)
        for kind in out.alarms:
            self.metrics.inc(f"alarm_{kind}")
        log.info(
            "batch_ingested",
            fog_id=out.fog_id,
            batch=out.number,
            status=str(out.status),
            booked=out.booked,
            duplicates=out.duplicates,
            rejected=out.rejected,
        )
        return out

    def _refused(self, exc: Declined, header: CheckedHeader | None) -> IngestOutcome:
        self.metrics.inc(f"batch_refused_{exc.reason}")
        fog_id = "" if header is None else header.fog_id
        number = 0 if header is None else header.number
        log.warning("batch_refused", fog_id=fog_id, batch=number, reason=str(exc.reason))
        return IngestOutcome(Status.REFUSED, fog_id, number, reason=exc.reason)

    async def _ingest(self, tx: Tx, batch: CheckedBatch, wire: bytes) -> IngestOutcome:
        h = batch.header
        key = await registry.fog_key(tx, h.fog_id)
        if key is None or key != h.signer:
            raise Declined(Reason.BAD_SIGNATURE, "batch: signer is not the fog's key")
        out = IngestOutcome(Status.BOOKED, h.fog_id, h.number)
        chain = await load_chain(tx, h.fog_id)
        if h.number <= chain.number:
            await self._past(tx, h, out)
        elif h.number > chain.number + 1:
            await self._hold(tx, h, chain, wire, out)
        elif not await self._link(tx, chain, batch, wire, out):
            out.status = Status.FORK
        else:
            await self._drain_held(tx, chain, out)
        if chain.number > 0:
            out.publish.append(await self._ack(tx, h.fog_id, chain))
        return out

    async def _past(self, tx: Tx, h: CheckedHeader, out: IngestOutcome) -> None:
        row = await tx.fetchone(
            "SELECT header_id FROM batches WHERE fog_id = ? AND number = ?", (h.fog_id, h.number)
        )
        if row is not None and bytes(row[0]) == h.header_id:
            out.status = Status.DUPLICATE
            return
        out.status = Status.FORK
        await self._fork(tx, h, "another header already booked at this number", out)

    async def _fork(self, tx: Tx, h: CheckedHeader, detail: str, out: IngestOutcome) -> None:
        alarm = Alarm(ALARM_FORK, f"{h.fog_id}:{h.number}:{h.header_id.hex()[:16]}", detail)
        if await leases.add_alarm(tx, alarm, fog_id=h.fog_id, now_ms=self._clock()):
            out.alarms.append(ALARM_FORK)

    async def _hold(
        self, tx: Tx, h: CheckedHeader, chain: Chain, wire: bytes, out: IngestOutcome
    ) -> None:
        out.status = Status.HELD
        if h.number - chain.number > HELD_BATCHES_MAX:
            raise Declined(Reason.RATE_LIMITED, "batch: too far ahead of the chain")
        await tx.execute(
            "INSERT INTO held (fog_id, number, header_id, wire) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (fog_id, number) DO NOTHING",
            (h.fog_id, h.number, h.header_id, wire),
        )

    async def _link(
        self, tx: Tx, chain: Chain, batch: CheckedBatch, wire: bytes, out: IngestOutcome
    ) -> bool:
        """Book ``batch`` (checked from ``wire``) if it continues ``chain`` (advanced in
        place); False on a fork."""
        h = batch.header
        if h.prev_id != chain.header_id or h.first_index != chain.next_index:
            await self._fork(tx, h, "h or s does not continue the chain", out)
            return False
        state, keys = await load_state(tx, batch)
        plan = booking.plan(batch, state, keys)
        await self._apply(tx, batch, wire, plan, out)
        chain.number, chain.header_id = h.number, h.header_id
        chain.next_index = h.first_index + h.count
        await save_chain(tx, h.fog_id, chain)
        cleared = await leases.close_reported(tx, h.fog_id, chain.number)
        out.publish.extend((t, b"") for t in cleared)
        return True

    async def _drain_held(self, tx: Tx, chain: Chain, out: IngestOutcome) -> None:
        fog_id = out.fog_id
        for _ in range(HELD_BATCHES_MAX):
            row = await tx.fetchone(
                "SELECT wire FROM held WHERE fog_id = ? AND number = ?", (fog_id, chain.number + 1)
            )
            if row is None:
                return
            await tx.execute(
                "DELETE FROM held WHERE fog_id = ? AND number = ?", (fog_id, chain.number + 1)
            )
            wire = bytes(row[0])
            if not await self._link(tx, chain, check_batch(wire), wire, out):
                return
        await tx.execute(
            "DELETE FROM held WHERE fog_id = ? AND number <= ?", (fog_id, chain.number)
        )

    async def _apply(
        self, tx: Tx, batch: CheckedBatch, wire: bytes, plan: Plan, out: IngestOutcome
    ) -> None:
        h, now = batch.header, self._clock()
        _, records = decode_batch(wire)  # the bytes check_batch verified: kept as evidence
        assert len(records) == h.count == batch.count
        await tx.execute(
            "INSERT INTO batches (fog_id, number, header_id, header, first_index, count, "
            "received_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (h.fog_id, h.number, h.header_id, h.raw, h.first_index, h.count, now),
        )
        ids = [b"" if i is None else i for i in batch.intent_ids()]
        await tx.insert_rows(
            "records",
            ("fog_id", "number", "position", "intent_id", "record"),
            list(zip(repeat(h.fog_id), repeat(h.number), range(len(records)), ids, records)),
        )
        tail = (h.fog_id, h.number, now)
        await tx.insert_rows(
            "transfers",
            (*Transfer._fields, "fog_id", "number", "booked_ms"),
            [t + tail for t in plan.transfers],
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
        await tx.executemany(
            "INSERT INTO rejected (fog_id, number, position, intent_id, reason) "
            "VALUES (?, ?, ?, ?, ?)",
            [(h.fog_id, h.number, p, i, str(f)) for p, i, f in plan.rejected],
        )
        await self._alarms(tx, h.fog_id, plan, out)
        out.booked += len(plan.transfers)
        out.duplicates += plan.duplicates
        out.rejected += len(plan.rejected)

    async def _alarms(self, tx: Tx, fog_id: str, plan: Plan, out: IngestOutcome) -> None:
        now = self._clock()
        for alarm in plan.alarms:
            if await leases.add_alarm(tx, alarm, fog_id=fog_id, now_ms=now):
                out.alarms.append(alarm.kind)
        for device in sorted(plan.suspend):
            if await registry.is_revoked(tx, device):
                continue
            await registry.issuer_revoke(
                tx, self._issuer, device, reason=SUSPEND_REASON, now_ms=now
            )
            row = await tx.fetchone(
                "SELECT payload FROM retained WHERE topic = ?", (topics.revoke_topic(device),)
            )
            assert row is not None
            out.publish.append((topics.revoke_topic(device), bytes(row[0])))
            log.warning("device_suspended", fog_id=fog_id, device=device.hex()[:16])

    async def _ack(self, tx: Tx, fog_id: str, chain: Chain) -> tuple[str, bytes]:
        """The fog's ack for ``chain``; Ed25519 is deterministic, so an unchanged chain gives
        the stored bytes again and nothing is written."""
        topic = topics.ack_topic(fog_id)
        ack = Ack(fog_id=fog_id, number=chain.number, header_id=chain.header_id)
        raw = seal_signed(ack, self._issuer).raw
        row = await tx.fetchone("SELECT payload FROM retained WHERE topic = ?", (topic,))
        if row is None or bytes(row[0]) != raw:
            await registry.put_retained(tx, topic, raw)
        return topic, raw


async def load_chain(tx: Tx, fog_id: str) -> Chain:
    row = await tx.fetchone(
        "SELECT number, header_id, next_index FROM chains WHERE fog_id = ?", (fog_id,)
    )
    if row is None:
        return Chain(0, ZERO_HASH, 1)
    return Chain(row[0], bytes(row[1]), row[2])


async def save_chain(tx: Tx, fog_id: str, chain: Chain) -> None:
    await tx.execute(
        "INSERT INTO chains (fog_id, number, header_id, next_index) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (fog_id) DO UPDATE SET number = excluded.number, "
        "header_id = excluded.header_id, next_index = excluded.next_index",
        (fog_id, chain.number, chain.header_id, chain.next_index),
    )


async def load_state(tx: Tx, batch: CheckedBatch) -> tuple[BookState, list[bytes]]:
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


def batch_fog_id(wire: bytes) -> str:
    """The fog a batch claims to come from (for logging before verification)."""
    header, _ = decode_batch(wire)
    return check_header(header).fog_id
