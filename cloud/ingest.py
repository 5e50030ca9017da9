"""Batch ingest: a batch verified once, chained, booked once, acked: the cloud core's batch half.

``Ingestor.handle(BatchArrived)`` returns the core's outputs for one batch (``cloud.events``):
exactly one ``BatchJudged``, the ``Publish``es (the retained ack, revocations of suspended
devices, leases to clear) and an ``AlarmRaised`` per new alarm. ``ingest_batch(wire)`` wraps
it for callers that want one ``IngestOutcome`` (the command line, tests, the bench).

The path of a batch:

1. ``verifier(wire)`` (``cloud.verify.check_batch``, pure and CPU-bound, in a process pool
   when configured) decodes and verifies the batch once and hands back everything later
   steps need: the header's fields, each record's verdict and decoded fields, and each
   record's bytes. Nothing after it decodes the wire again. A batch that does not verify is
   refused whole; one whose header names another fog than the topic it came on is dropped.
2. One transaction (``_ingest``): read the fog's key and chain; ``cloud.chain.step`` (pure)
   says duplicate, fork, hold, too far, or link; for a link ``cloud.ledger.booking_state``
   reads what booking looks at, ``cloud.booking.book`` (pure) returns the rows and the
   decision, and ``cloud.ledger.write`` writes them; alarms, suspensions, the new chain,
   leases the chain now closes, and the signed ack, durable before anything is returned.
3. A link may release a batch held behind it: the transaction names the next held batch,
   which is verified (again: a held batch is verified when it arrives, before it is stored,
   and when it is booked, perhaps after a restart) and booked in a transaction of its own,
   up to ``HELD_BATCHES_MAX`` of them; the outputs are merged (the last ack wins).

The chain (spec section 7, ``cloud.chain``): a batch from the future is *held* (stored,
verified, not booked) until the gap fills; one that contradicts the chain is a *fork*:
refused, and an alarm; a batch already booked is a *duplicate*: answered with the current
ack, nothing changes. The ack names the highest batch booked with all before it.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import nacl.signing
import structlog

from cloud import leases, ledger, registry
from cloud.booking import ALARM_FORK, Alarm, book
from cloud.chain import HELD_BATCHES_MAX, Chain, Step, step
from cloud.events import AlarmRaised, BatchArrived, BatchJudged, Output, Publish, Status
from cloud.metrics import Metrics
from cloud.store import Store, StoreConflict, Tx
from cloud.verify import CheckedBatch, CheckedHeader, check_batch
from protocol import topics
from protocol.errors import Declined
from protocol.messages import Ack
from protocol.reasons import Reason
from protocol.signing import seal_signed

__all__ = ["HELD_BATCHES_MAX", "IngestOutcome", "Ingestor", "Status", "Verifier", "verify_inline"]

log = structlog.get_logger()

SUSPEND_REASON: Final = "suspended: cloned key (two intents at one q)"
ALARM_RECORD_REJECTED: Final = "record_rejected"
ALARM_UNREGISTERED_FOG_KEY: Final = "unregistered_fog_key"


class UnregisteredSigner(Declined):
    """A batch signed validly by a key the registry does not hold for its fog: a fog acting
    on a fog credential published around the registry (or its key replaced by hand). Its
    devices hold ok receipts nobody will be charged for, so the refusal is an alarm too."""

    def __init__(self, registered: bytes | None) -> None:
        super().__init__(Reason.BAD_SIGNATURE, "batch: signer is not the fog's key")
        self.registered = registered


def unregistered_alarm(h: CheckedHeader, registered: bytes | None, records: int) -> Alarm:
    """One alarm per fog and signing key (subject ``FOG:SIGNER16``), however many batches
    it signs: the evidence is the first batch's number, header id and record count."""
    known = "none" if registered is None else registered.hex()
    detail = (
        f"fog={h.fog_id} signer={h.signer.hex()} registered={known} batch={h.number} "
        f"header={h.header_id.hex()} records={records}"
    )
    return Alarm(ALARM_UNREGISTERED_FOG_KEY, f"{h.fog_id}:{h.signer.hex()[:16]}", detail)


def rejected_alarm(h: CheckedHeader, position: int, intent_id: bytes | None, fault: str) -> Alarm:
    """A record of an accepted batch the cloud does not book: money a fog may have paid out
    (an ok receipt) that no one will collect. One alarm per record, its evidence the fog,
    batch, position, intent id and reason (``unknown_device``: trust the cloud never
    registered; ``lease_mismatch``, ``unknown_lease``, ...). Subject ``FOG:BATCH:POSITION``."""
    intent = "-" if intent_id is None else intent_id.hex()
    detail = f"fog={h.fog_id} batch={h.number} position={position} intent={intent} reason={fault}"
    return Alarm(ALARM_RECORD_REJECTED, f"{h.fog_id}:{h.number}:{position}", detail)


Verifier = Callable[[bytes], Awaitable[CheckedBatch]]


async def verify_inline(wire: bytes) -> CheckedBatch:
    return check_batch(wire)


@dataclass(slots=True)
class IngestOutcome:
    """One batch's outputs in one object (``IngestOutcome.of(outputs)``)."""

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

    @classmethod
    def of(cls, outputs: list[Output]) -> "IngestOutcome":
        [judged] = [o for o in outputs if isinstance(o, BatchJudged)]
        return cls(
            judged.status,
            judged.fog_id,
            judged.number,
            judged.reason,
            judged.booked,
            judged.duplicates,
            judged.rejected,
            [o.kind for o in outputs if isinstance(o, AlarmRaised)],
            [(o.topic, o.payload) for o in outputs if isinstance(o, Publish)],
        )


@dataclass(slots=True)
class _Done:
    """What one ingest transaction did (merged over the held batches a link releases)."""

    status: Status
    booked: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    alarms: list[AlarmRaised] = field(default_factory=list)
    publish: list[Publish] = field(default_factory=list)
    next_held: bytes | None = None  # the held batch this link released, to book next

    def merge(self, later: "_Done") -> None:
        self.booked += later.booked
        self.duplicates += later.duplicates
        self.rejected += later.rejected
        self.batches += later.batches
        self.alarms.extend(later.alarms)
        later_topics = {p.topic for p in later.publish}
        self.publish = [p for p in self.publish if p.topic not in later_topics]
        self.publish.extend(later.publish)
        self.next_held = later.next_held


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
        """``clock`` stamps ``ingest_batch``'s input; ``handle`` reads no clock."""
        self._store = store
        self._issuer = issuer
        self._clock = clock
        self._verifier = verifier
        self.metrics = metrics or Metrics()
        # which fogs this process books (None: all); cloud/partition.py sets it
        self.owns: Callable[[str], bool] | None = None

    async def ingest_batch(self, wire: bytes, *, topic: str | None = None) -> IngestOutcome:
        """Idempotent: the same bytes again change nothing and get the same ack."""
        event = BatchArrived(wire=wire, now_ms=self._clock(), topic=topic)
        return IngestOutcome.of(await self.handle(event))

    async def handle(self, event: BatchArrived) -> list[Output]:
        try:
            batch = await self._verifier(event.wire)
        except Declined as exc:
            return [self._refused(exc, None)]
        h = batch.header
        if event.relayed_by is not None:  # a replica holder's relay: the header's fog counts
            self.metrics.inc("batch_relayed")
            log.info("batch_relayed", fog_id=h.fog_id, batch=h.number, carrier=event.relayed_by)
        elif event.topic is not None and event.topic != topics.batch_topic(h.fog_id):
            self.metrics.inc("batch_dropped_topic_mismatch")  # the shell counts batch_dropped
            log.warning("batch_dropped", cause="topic_mismatch", topic=event.topic[:120])
            judged = BatchJudged(
                status=Status.DROPPED,
                fog_id=h.fog_id,
                number=h.number,
                reason=Reason.TOPIC_MISMATCH,
            )
            return [judged]
        if self.owns is not None and not self.owns(h.fog_id):  # a relay: another partition's
            self.metrics.inc("batch_dropped_partition")
            log.debug("batch_dropped", cause="partition", fog_id=h.fog_id, batch=h.number)
            return [BatchJudged(status=Status.DROPPED, fog_id=h.fog_id, number=h.number)]
        try:
            done = await self._transact(batch, event.wire, event.now_ms, from_held=False)
            for _ in range(HELD_BATCHES_MAX):  # the held batches this one releases
                if done.next_held is None:
                    break
                held_wire, done.next_held = done.next_held, None
                later = await self._book_held(held_wire, h.fog_id, event.now_ms)
                if later is None:
                    break
                done.merge(later)
        except UnregisteredSigner as exc:
            return [self._refused(exc, h), *await self._unregistered(batch, exc, event.now_ms)]
        except Declined as exc:
            return [self._refused(exc, h)]
        except StoreConflict:
            self.metrics.inc("batch_deferred")
            log.warning("batch_deferred", fog_id=h.fog_id, batch=h.number)
            return [BatchJudged(status=Status.DEFERRED, fog_id=h.fog_id, number=h.number)]
        return self._judged(h, done)

    async def _transact(
        self, batch: CheckedBatch, wire: bytes, now_ms: int, *, from_held: bool
    ) -> _Done:
        done: _Done = await self._store.transact(
            lambda tx: self._ingest(tx, batch, wire, now_ms, from_held)
        )
        return done

    async def _book_held(self, wire: bytes, fog_id: str, now_ms: int) -> _Done | None:
        """Book a held batch a link released (None: it is gone, or no longer verifies)."""
        try:
            batch = await self._verifier(wire)
        except Declined as exc:  # our own row: only a damaged store gets here
            log.error("held_batch_refused", fog_id=fog_id, reason=str(exc.reason))
            return None
        if batch.header.fog_id != fog_id:
            log.error("held_batch_refused", fog_id=fog_id, reason="wrong_fog")
            return None
        try:
            return await self._transact(batch, wire, now_ms, from_held=True)
        except (Declined, StoreConflict) as exc:  # it stays held: the next batch retries
            log.warning("held_batch_deferred", fog_id=fog_id, error=type(exc).__name__)
            return None

    def _judged(self, h: CheckedHeader, done: _Done) -> list[Output]:
        judged = BatchJudged(
            status=done.status,
            fog_id=h.fog_id,
            number=h.number,
            booked=done.booked,
            duplicates=done.duplicates,
            rejected=done.rejected,
            batches=done.batches,
        )
        self.metrics.inc(f"batch_{done.status}")
        self.metrics.inc("records_booked", done.booked)
        self.metrics.inc("records_rejected", done.rejected)
        for alarm in done.alarms:
            self.metrics.inc(f"alarm_{alarm.kind}")
        log.info(
            "batch_ingested",
            fog_id=h.fog_id,
            batch=h.number,
            status=str(done.status),
            booked=done.booked,
            duplicates=done.duplicates,
            rejected=done.rejected,
            batches=done.batches,
        )
        return [judged, *done.alarms, *done.publish]

    def _refused(self, exc: Declined, header: CheckedHeader | None) -> BatchJudged:
        self.metrics.inc(f"batch_refused_{exc.reason}")
        fog_id = "" if header is None else header.fog_id
        number = 0 if header is None else header.number
        log.warning("batch_refused", fog_id=fog_id, batch=number, reason=str(exc.reason))
        return BatchJudged(status=Status.REFUSED, fog_id=fog_id, number=number, reason=exc.reason)

    async def _unregistered(
        self, batch: CheckedBatch, exc: UnregisteredSigner, now_ms: int
    ) -> list[AlarmRaised]:
        """The alarm of a batch refused for its signer, in a transaction of its own (the
        refusal wrote nothing). A conflict leaves it to the fog's next resend."""
        h, done = batch.header, _Done(Status.REFUSED)
        alarm = unregistered_alarm(h, exc.registered, h.count)

        async def fn(tx: Tx) -> None:
            await self._alarm(tx, alarm, h.fog_id, now_ms, done)

        try:
            await self._store.transact(fn)
        except StoreConflict:
            return []
        for raised in done.alarms:
            self.metrics.inc(f"alarm_{raised.kind}")
        return done.alarms

    # ---- the transaction --------------------------------------------------------------

    async def _ingest(
        self, tx: Tx, batch: CheckedBatch, wire: bytes, now_ms: int, from_held: bool
    ) -> _Done:
        h = batch.header
        key = await registry.fog_key(tx, h.fog_id)
        if key is None or key != h.signer:
            raise UnregisteredSigner(key)
        if from_held:
            await _unhold(tx, h.fog_id, h.number)
        chain = await load_chain(tx, h.fog_id)
        booked_id = await _booked_header_id(tx, h) if h.number <= chain.number else None
        where, detail = step(h, chain, booked_id)
        done = _Done(Status.BOOKED)
        if where is Step.DUPLICATE:
            done.status = Status.DUPLICATE
        elif where is Step.FORK:
            done.status = Status.FORK
            alarm = Alarm(ALARM_FORK, f"{h.fog_id}:{h.number}:{h.header_id.hex()[:16]}", detail)
            await self._alarm(tx, alarm, h.fog_id, now_ms, done)
        elif where is Step.TOO_FAR:
            raise Declined(Reason.RATE_LIMITED, detail)
        elif where is Step.HOLD:
            done.status = Status.HELD
            await _hold(tx, h, wire)
        else:
            chain = await self._link(tx, batch, chain, now_ms, done)
        if chain.number > 0:
            done.publish.append(await self._ack(tx, h.fog_id, chain))
        return done

    async def _link(
        self, tx: Tx, batch: CheckedBatch, chain: Chain, now_ms: int, done: _Done
    ) -> Chain:
        """Book ``batch``, the next on ``chain``; returns the chain after it."""
        h = batch.header
        state, keys = await ledger.booking_state(tx, batch)
        booking = book(batch, state, chain, now_ms=now_ms, keys=keys)
        await ledger.write(tx, booking)
        p = booking.plan
        done.booked, done.duplicates, done.rejected = (
            len(p.transfers),
            p.duplicates,
            len(p.rejected),
        )
        done.batches = 1
        for alarm in p.alarms:
            await self._alarm(tx, alarm, h.fog_id, now_ms, done)
        for position, intent_id, fault in p.rejected:
            await self._alarm(
                tx, rejected_alarm(h, position, intent_id, fault), h.fog_id, now_ms, done
            )
        for device in sorted(p.suspend):
            await self._suspend(tx, device, h.fog_id, now_ms, done)
        chain = booking.chain
        await save_chain(tx, h.fog_id, chain)
        cleared = await leases.close_reported(tx, h.fog_id, chain.number, now_ms=now_ms)
        done.publish.extend(Publish(topic=t, payload=b"") for t in cleared)
        await tx.execute("DELETE FROM held WHERE fog_id = ? AND number <= ?", (h.fog_id, h.number))
        row = await tx.fetchone(
            "SELECT wire FROM held WHERE fog_id = ? AND number = ?", (h.fog_id, h.number + 1)
        )
        done.next_held = None if row is None else bytes(row[0])
        return chain

    async def _alarm(self, tx: Tx, alarm: Alarm, fog_id: str, now_ms: int, done: _Done) -> None:
        if await leases.add_alarm(tx, alarm, fog_id=fog_id, now_ms=now_ms):
            done.alarms.append(
                AlarmRaised(
                    kind=alarm.kind, subject=alarm.subject, fog_id=fog_id, detail=alarm.detail
                )
            )

    async def _suspend(self, tx: Tx, device: bytes, fog_id: str, now_ms: int, done: _Done) -> None:
        published = await suspend_device(tx, self._issuer, device, fog_id=fog_id, now_ms=now_ms)
        if published is not None:
            done.publish.append(published)

    async def _ack(self, tx: Tx, fog_id: str, chain: Chain) -> Publish:
        """The fog's ack for ``chain``; Ed25519 is deterministic, so an unchanged chain gives
        the stored bytes again and nothing is written."""
        topic = topics.ack_topic(fog_id)
        ack = Ack(fog_id=fog_id, number=chain.number, header_id=chain.header_id)
        raw = seal_signed(ack, self._issuer).raw
        row = await tx.fetchone("SELECT payload FROM retained WHERE topic = ?", (topic,))
        if row is None or bytes(row[0]) != raw:
            await registry.put_retained(tx, topic, raw)
        return Publish(topic=topic, payload=raw)


async def suspend_device(
    tx: Tx,
    issuer: nacl.signing.SigningKey,
    device: bytes,
    *,
    fog_id: str,
    now_ms: int,
    reason: str = SUSPEND_REASON,
) -> Publish | None:
    """The issuer revokes a cloned device's key (15.3); the revocation to publish, or None
    if the key was revoked before."""
    if await registry.is_revoked(tx, device):
        return None
    await registry.issuer_revoke(tx, issuer, device, reason=reason, now_ms=now_ms)
    topic = topics.revoke_topic(device)
    row = await tx.fetchone("SELECT payload FROM retained WHERE topic = ?", (topic,))
    assert row is not None
    log.warning("device_suspended", fog_id=fog_id, device=device.hex()[:16])
    return Publish(topic=topic, payload=bytes(row[0]))


async def load_chain(tx: Tx, fog_id: str) -> Chain:
    row = await tx.fetchone(
        "SELECT number, header_id, next_index FROM chains WHERE fog_id = ?", (fog_id,)
    )
    if row is None:
        return Chain()
    return Chain(row[0], bytes(row[1]), row[2])


async def save_chain(tx: Tx, fog_id: str, chain: Chain) -> None:
    await tx.execute(
        "INSERT INTO chains (fog_id, number, header_id, next_index) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (fog_id) DO UPDATE SET number = excluded.number, "
        "header_id = excluded.header_id, next_index = excluded.next_index",
        (fog_id, chain.number, chain.header_id, chain.next_index),
    )


async def _booked_header_id(tx: Tx, h: CheckedHeader) -> bytes | None:
    row = await tx.fetchone(
        "SELECT header_id FROM batches WHERE fog_id = ? AND number = ?", (h.fog_id, h.number)
    )
    return None if row is None else bytes(row[0])


async def _hold(tx: Tx, h: CheckedHeader, wire: bytes) -> None:
    """Keep a verified batch from the future, as it came, until its gap fills."""
    await tx.execute(
        "INSERT INTO held (fog_id, number, header_id, wire) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (fog_id, number) DO NOTHING",
        (h.fog_id, h.number, h.header_id, wire),
    )


async def _unhold(tx: Tx, fog_id: str, number: int) -> None:
    await tx.execute("DELETE FROM held WHERE fog_id = ? AND number = ?", (fog_id, number))
