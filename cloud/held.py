"""Records devices hand in (docs/protocol.md 17.7, 17.8): the cloud core's ``held`` half.

A device keeps every ok receipt with its intent until the cloud says it is booked, and hands
them in on ``fogpay/1/held/{device_hex}/records`` (``protocol.held``). A fog that lost its
disk lost the records it had not replicated; the devices still hold them, and this is how
their payees get paid.

``HeldBooker.handle(HeldArrived)``:

1. ``check_held`` (pure): the payload decodes (else it is refused whole, unanswered); per
   record the checks of 15.3 that need no batch: the intent opens, signed by its ``d``,
   which must be the topic's device (else ``malformed``); the receipt opens, answers the
   intent (``i``, ``d``, ``q``), is ``ok`` and names a lease.
2. One transaction: a record whose intent id is booked already (from a batch, or an earlier
   upload) is listed as booked and changes nothing. The receipt's signer must be the
   registered key of the intent's ``f``, whose fog credential is valid at the receipt's
   ``t`` (else ``receipt_signer``). The rest is booked exactly as a batch record is
   (``cloud.booking.plan``: binding at the receipt's time, currency, lease of that fog and
   owner, ``cloned_key``, ``lease_overdrawn``, ``lease_drawn_late``) and written by
   ``cloud.ledger.write_held``: transfers with batch number 0, the records as evidence
   (``held_records``), the lease draws, the account moves. Reported leases of the fogs
   touched are closed if their booked draws now match the report.
3. The ``hack``, signed by the issuer, on ``fogpay/1/held/{device_hex}/ack`` (not retained):
   ``i`` the intent ids now booked, ``x`` the others with their fault.

When the fog's batch later brings a record booked here, the record is a duplicate (booked
once, whatever path); the transfer is then pointed at the batch (``cloud.ledger.write``).

A record refused for what the registry says (``unknown_device``, ``currency``,
``unknown_lease``, ``lease_mismatch``: a receipt the fog signed and nobody is charged for)
raises ``record_rejected`` with subject ``held:DEVICE:UPLOAD:POSITION``. Other faults (the
record does not prove itself) are counted and logged only: anyone may publish garbage.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import nacl.signing
import structlog

from cloud import leases, ledger, registry, vouchers
from cloud.booking import Alarm, plan
from cloud.events import AlarmRaised, HeldArrived, HeldJudged, Output, Publish
from cloud.ingest import ALARM_RECORD_REJECTED, load_chain, suspend_device
from cloud.metrics import Metrics
from cloud.store import Store, StoreConflict, Tx, fetch_in
from cloud.verify import CheckedBatch, CheckedHeader, CheckedRecord, Fault
from cloud.vouchers import D2DVerdict, check_d2d
from protocol import topics
from protocol.batch import decode_record
from protocol.errors import Declined
from protocol.held import FAULT_MALFORMED, HeldAck, decode_held
from protocol.messages import ZERO_HASH, FogCredential, Intent, Receipt
from protocol.signing import open_envelope, open_message, seal_signed
from protocol.voucher import is_voucher_record

log = structlog.get_logger()

# faults booking finds against the registry: a fog-signed ok receipt nobody is charged for
_ALARMED: Final = frozenset(
    {Fault.UNKNOWN_DEVICE, Fault.CURRENCY, Fault.UNKNOWN_LEASE, Fault.LEASE_MISMATCH}
)


@dataclass(frozen=True, slots=True)
class HeldVerdict:
    """One record of a held payload after the checks that need no store."""

    position: int
    record: bytes
    fault: str | None = None
    intent_id: bytes | None = None
    fog_id: str = ""
    signer: bytes = b""  # the receipt's signer
    checked: CheckedRecord | None = None  # booking's view, when no fault
    d2d: D2DVerdict | None = None  # a device-to-device payment [vch, d2d] (18.3)


def check_held(payload: bytes, device: bytes) -> list[HeldVerdict]:
    """Each record's verdict; raises Declined(MALFORMED) for a payload that does not decode."""
    return [check_record(i, r, device) for i, r in enumerate(decode_held(payload))]


def check_record(position: int, record: bytes, device: bytes) -> HeldVerdict:
    try:
        intent_env, receipt_env = decode_record(record)
    except Declined:
        return HeldVerdict(position, record, Fault.BAD_RECORD)
    if is_voucher_record(intent_env):  # a payee's device-to-device payment (18.3)
        d2d = check_d2d(position, record)
        return HeldVerdict(position, record, d2d.fault, d2d.payment_id, d2d=d2d)
    try:
        i, intent_id, _ = open_message(intent_env, Intent)
    except Declined:
        return HeldVerdict(position, record, Fault.BAD_INTENT)
    if i.device != device:
        return HeldVerdict(position, record, FAULT_MALFORMED, intent_id)
    try:
        r, _, signer = open_message(receipt_env, Receipt)
    except Declined:
        return HeldVerdict(position, record, Fault.BAD_RECEIPT, intent_id)
    if r.intent_id != intent_id or r.device != i.device or r.seq != i.seq:
        return HeldVerdict(position, record, Fault.RECEIPT_MISMATCH, intent_id)
    if not r.ok or r.lease_id is None:
        return HeldVerdict(position, record, Fault.RECEIPT_NOT_OK, intent_id)
    checked = CheckedRecord(
        position,
        None,
        intent_id,
        i.device,
        i.seq,
        i.payee_id,
        i.amount_micros,
        i.currency,
        r.lease_id,
        r.time_ms,
    )
    return HeldVerdict(position, record, None, intent_id, i.fog_id, signer, checked)


def upload_id(payload: bytes) -> str:
    """The name of an upload in alarms and logs: 16 hex digits of its SHA-256."""
    return hashlib.sha256(payload).hexdigest()[:16]


@dataclass(slots=True)
class _Done:
    booked: list[bytes] = field(default_factory=list)  # by this upload
    already: list[bytes] = field(default_factory=list)  # before it
    refused: list[tuple[int, bytes | None, str]] = field(default_factory=list)
    alarms: list[AlarmRaised] = field(default_factory=list)
    publish: list[Publish] = field(default_factory=list)
    hack: bytes = b""
    d2d_pending: int = 0  # d2d payments whose voucher intent is not booked yet (18.3)


class HeldBooker:
    def __init__(
        self, *, store: Store, issuer: nacl.signing.SigningKey, metrics: Metrics | None = None
    ) -> None:
        self._store, self._issuer = store, issuer
        self.metrics = metrics or Metrics()

    async def handle(self, event: HeldArrived) -> list[Output]:
        self.metrics.inc("held_received")
        device, upload = event.device, upload_id(event.payload)
        try:
            verdicts = check_held(event.payload, device)
        except Declined as exc:
            self.metrics.inc("held_refused")
            log.warning(
                "held_refused", device=device.hex()[:16], upload=upload, reason=str(exc.reason)
            )
            return [HeldJudged(device=device, refused=True)]
        try:
            done: _Done = await self._store.transact(
                lambda tx: self._book(tx, device, upload, verdicts, event.now_ms)
            )
        except StoreConflict:
            self.metrics.inc("held_deferred")
            log.warning("held_deferred", device=device.hex()[:16], upload=upload)
            return [HeldJudged(device=device, deferred=True)]
        for position, intent_id, fault in done.refused:
            log.warning(
                "held_record_refused",
                device=device.hex()[:16],
                upload=upload,
                position=position,
                intent="-" if intent_id is None else intent_id.hex()[:16],
                fault=fault,
            )
        self.metrics.inc("held_records_booked", len(done.booked))
        self.metrics.inc("held_records_already", len(done.already))
        self.metrics.inc("held_records_refused", len(done.refused))
        for alarm in done.alarms:
            self.metrics.inc(f"alarm_{alarm.kind}")
        log.info(
            "held_ingested",
            device=device.hex()[:16],
            upload=upload,
            booked=len(done.booked),
            already=len(done.already),
            refused=len(done.refused),
            d2d_pending=done.d2d_pending,
        )
        judged = HeldJudged(
            device=device,
            booked=len(done.booked),
            already=len(done.already),
            rejected=len(done.refused),
        )
        hack = Publish(topic=topics.held_ack_topic(device), payload=done.hack, retain=False)
        return [judged, *done.alarms, *done.publish, hack]

    # ---- the transaction --------------------------------------------------------------

    async def _book(
        self, tx: Tx, device: bytes, upload: str, verdicts: Sequence[HeldVerdict], now_ms: int
    ) -> _Done:
        done = _Done()
        seen: set[bytes] = set()
        ids = sorted({v.intent_id for v in verdicts if v.intent_id is not None})
        rows = await fetch_in(tx, "SELECT intent_id FROM transfers WHERE intent_id IN ({in})", ids)
        booked_before = {bytes(r[0]) for r in rows}
        by_fog: dict[str, list[HeldVerdict]] = {}
        d2d: list[D2DVerdict] = []
        for v in verdicts:
            if v.intent_id is not None:
                if v.intent_id in seen:  # the same record twice in one upload
                    continue
                seen.add(v.intent_id)
            if v.d2d is not None:
                d2d.append(v.d2d)
            elif v.intent_id in booked_before:
                done.already.append(v.intent_id)
            elif v.fault is not None:
                done.refused.append((v.position, v.intent_id, v.fault))
            elif not await _fog_signed(tx, v):
                done.refused.append((v.position, v.intent_id, Fault.RECEIPT_SIGNER))
            else:
                by_fog.setdefault(v.fog_id, []).append(v)
        for fog_id, good in sorted(by_fog.items()):
            await self._book_fog(tx, fog_id, good, device, upload, now_ms, done)
        if d2d:
            await self._book_d2d(tx, d2d, now_ms, done)
        done.refused.sort()
        ack = HeldAck(
            device=device,
            booked=tuple(done.booked + done.already),
            refused=tuple((i, str(f)) for _, i, f in done.refused if i is not None),
            time_ms=now_ms,
        )
        done.hack = seal_signed(ack, self._issuer).raw
        return done

    async def _book_fog(
        self,
        tx: Tx,
        fog_id: str,
        good: list[HeldVerdict],
        device: bytes,
        upload: str,
        now_ms: int,
        done: _Done,
    ) -> None:
        """Book one fog's records of the upload, as ``cloud.booking.plan`` books a batch's."""
        header = CheckedHeader(
            fog_id, 0, ZERO_HASH, 1, len(good), ZERO_HASH, now_ms, ZERO_HASH, b"", b""
        )
        batch = CheckedBatch.of(header, [v.checked for v in good if v.checked is not None])
        state, keys = await ledger.booking_state(tx, batch)
        p = plan(batch, state, keys)
        records = {v.intent_id: v.record for v in good if v.intent_id is not None}
        await ledger.write_held(tx, fog_id, p, records, now_ms=now_ms)
        done.booked.extend(t.intent_id for t in p.transfers)
        for alarm in p.alarms:
            await self._alarm(tx, alarm, fog_id, now_ms, done)
        for position, intent_id, fault in p.rejected:
            done.refused.append((position, intent_id, fault))
            if fault in _ALARMED:
                intent = "-" if intent_id is None else intent_id.hex()
                detail = (
                    f"device={device.hex()} upload={upload} position={position} "
                    f"fog={fog_id} intent={intent} reason={fault}"
                )
                subject = f"held:{device.hex()}:{upload}:{position}"
                alarm = Alarm(ALARM_RECORD_REJECTED, subject, detail)
                await self._alarm(tx, alarm, fog_id, now_ms, done)
        for suspended in sorted(p.suspend):
            published = await suspend_device(
                tx, self._issuer, suspended, fog_id=fog_id, now_ms=now_ms
            )
            if published is not None:
                done.publish.append(published)
        if p.transfers:  # a reported lease may now hold the draws its report states
            chain = await load_chain(tx, fog_id)
            cleared = await leases.close_reported(tx, fog_id, chain.number, now_ms=now_ms)
            done.publish.extend(Publish(topic=t, payload=b"") for t in cleared)

    async def _book_d2d(self, tx: Tx, d2d: list[D2DVerdict], now_ms: int, done: _Done) -> None:
        """Device-to-device payments handed in (``cloud.vouchers``): booked once, at most
        the voucher's amount; a voucher spent twice suspends its device."""
        booked = await vouchers.book(tx, d2d, now_ms=now_ms)
        done.booked.extend(booked.booked)
        done.already.extend(booked.already)
        done.refused.extend(booked.refused)
        done.d2d_pending += len(booked.pending)
        for fog_id, alarm in booked.alarms:
            await self._alarm(tx, alarm, fog_id, now_ms, done)
        for suspended, fog_id in sorted(booked.suspend.items()):
            published = await suspend_device(
                tx,
                self._issuer,
                suspended,
                fog_id=fog_id,
                now_ms=now_ms,
                reason=vouchers.SUSPEND_REASON,
            )
            if published is not None:
                done.publish.append(published)

    async def _alarm(self, tx: Tx, alarm: Alarm, fog_id: str, now_ms: int, done: _Done) -> None:
        if await leases.add_alarm(tx, alarm, fog_id=fog_id, now_ms=now_ms):
            done.alarms.append(
                AlarmRaised(
                    kind=alarm.kind, subject=alarm.subject, fog_id=fog_id, detail=alarm.detail
                )
            )


async def _fog_signed(tx: Tx, v: HeldVerdict) -> bool:
    """The receipt is signed by the registered key of the intent's fog, whose credential is
    valid at the receipt's time."""
    assert v.checked is not None
    credential = await registry.fog_credential(tx, v.fog_id)
    if credential is None:
        return False
    cred = open_envelope(credential, FogCredential).msg
    t = v.checked.receipt_time_ms
    return cred.key == v.signer and cred.not_before_ms <= t <= cred.not_after_ms
