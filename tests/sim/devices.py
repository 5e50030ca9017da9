"""Simulated devices: real keys, real signed intents, receipts verified under the fog's key.

A device does what ``edge.device`` does, minus MQTT and files: one payment in flight, the
same bytes retransmitted on timeout (``RETRIES_MAX`` times, then given up), ``q`` strictly
increasing over the device's life (it may pay at several fogs). It keeps every ok receipt that
verifies under the fog's key and answers an intent it sent: its proof of payment, which the
invariants hold the fog and the cloud to.
"""

from dataclasses import dataclass, field
from typing import Final

import nacl.signing

from protocol import topics
from protocol.batch import encode_record
from protocol.errors import Declined
from protocol.held import HELD_RECORDS_MAX, HeldAck, encode_held
from protocol.messages import Intent, Receipt
from protocol.signing import open_envelope, public_key, seal_signed
from protocol.voucher import (
    Payment as D2D,
)
from protocol.voucher import (
    VoucherError,
    check_bundle,
    encode_bundle,
    open_voucher,
)

RETRIES_MAX: Final = 4
RETRY_MS: Final = 1_500


@dataclass(slots=True)
class Payment:
    fog_id: str
    raw: bytes
    intent_id: bytes
    seq: int
    amount_micros: int
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class Held:
    """An ok receipt the device holds."""

    fog_id: str
    intent_id: bytes
    seq: int
    amount_micros: int
    log_index: int
    lease_id: bytes
    time_ms: int
    record: bytes = b""  # [intent envelope, receipt envelope]: what a held upload hands in


@dataclass(slots=True)
class Voucher:
    """A voucher the payer holds (``edge.voucher.Payer``'s state, in memory): the fog
    credential and the ``vch`` it shows a payee, the last ``s`` and the cumulative ``u``."""

    credential: bytes
    vch: bytes
    voucher_id: bytes
    amount_micros: int
    not_after_ms: int
    seq: int = 0
    spent_micros: int = 0


@dataclass(frozen=True, slots=True)
class Signed:
    """A d2d payment a payer signed, as the simulation remembers it."""

    payment_id: bytes
    voucher_id: bytes
    seq: int
    amount_micros: int
    payee: str  # the payee device's name


@dataclass(slots=True)
class SimDevice:
    name: str
    key: nacl.signing.SigningKey
    owner_id: str
    currency: str
    fogs: list[str]
    seq: int = 0
    inflight: Payment | None = None
    sent: dict[bytes, Payment] = field(default_factory=dict)
    held: dict[bytes, Held] = field(default_factory=dict)
    declined: dict[str, int] = field(default_factory=dict)
    revoked_ms: int | None = None
    # a clone's original (the same key): a clone pays with the sequence numbers the
    # original used, at another fog (tests/sim/simulation.py ``_clone_act``)
    clone_of: "SimDevice | None" = None
    # held uploads (docs/protocol.md 17.7): intent ids to hand in, and the cloud's answers
    to_upload: set[bytes] = field(default_factory=set)
    hacked: set[bytes] = field(default_factory=set)  # listed as booked by a hack
    faults: dict[bytes, str] = field(default_factory=dict)  # listed as not booked, and why
    uploads: int = 0
    # vouchers (docs/protocol.md 18.3): as a payer, what it holds and signed; as a payee, the
    # bundles it accepted (payment id -> the held record [vch, d2d]) and per voucher (s, a, u)
    vouchers: dict[bytes, Voucher] = field(default_factory=dict)
    d2d_signed: list[Signed] = field(default_factory=list)
    d2d_in: dict[bytes, bytes] = field(default_factory=dict)
    d2d_kept: dict[bytes, dict[bytes, tuple[int, int, int]]] = field(default_factory=dict)
    d2d_refused: dict[str, int] = field(default_factory=dict)  # offline checks that failed

    @property
    def payee_id(self) -> str:
        """This device's payee_id when another device pays it offline."""
        return f"p-{self.public.hex()[:16]}"

    def pay_again(
        self, fog_id: str, seq: int, amount_micros: int, payee: str, *, now_ms: int
    ) -> tuple[str, bytes]:
        """A clone's payment: ``seq`` (one its original used) at ``fog_id``."""
        self.seq = seq - 1
        return self.pay(fog_id, amount_micros, payee, now_ms=now_ms)

    def upload(self, intent_ids: set[bytes]) -> None:
        """Hand in these held receipts (again, until a ``hack`` lists them)."""
        known = self.held.keys() | self.d2d_in.keys()
        self.to_upload |= {i for i in intent_ids if i in known and i not in self.hacked}

    def held_payloads(self) -> list[bytes]:
        """The ``held`` payloads of what is still to upload, 16 records each (ok receipts,
        and the device-to-device payments it accepted as a payee)."""
        ids = sorted(self.to_upload)
        records = [self.held[i].record if i in self.held else self.d2d_in[i] for i in ids]
        return [
            encode_held(records[k : k + HELD_RECORDS_MAX])
            for k in range(0, len(records), HELD_RECORDS_MAX)
        ]

    # ---- vouchers (docs/protocol.md 18.3) ---------------------------------------------------

    def voucher(self, fog_id: str, fog_key: bytes, payload: bytes, credential: bytes) -> str:
        """A ``vch`` on the receipt topic: kept if signed by the fog's key for a voucher
        intent this device sent there."""
        try:
            v = open_voucher(payload, fog_key).msg
        except VoucherError:
            return "receipt_bad"
        p = self.sent.get(v.voucher_id)
        if p is None or p.fog_id != fog_id or v.device != self.public or not credential:
            return "vch_foreign"
        if v.voucher_id not in self.vouchers:
            self.vouchers[v.voucher_id] = Voucher(
                credential, payload, v.voucher_id, v.amount_micros, v.not_after_ms
            )
        return f"vch {v.amount_micros}"

    def pay_d2d(
        self,
        payee: "SimDevice",
        amount_micros: int,
        *,
        now_ms: int,
        voucher_id: bytes | None = None,
    ) -> bytes | None:
        """Sign a payment against the voucher with room that expires first (``Payer.pay``);
        the bundle for the payee, or None when no voucher has room."""
        room = [
            v
            for v in self.vouchers.values()
            if v.amount_micros - v.spent_micros >= amount_micros
            and now_ms <= v.not_after_ms
            and voucher_id in (None, v.voucher_id)
        ]
        if not room:
            return None
        v = min(room, key=lambda x: (x.not_after_ms, x.voucher_id))
        v.seq += 1
        v.spent_micros += amount_micros
        payment = D2D(
            voucher_id=v.voucher_id,
            seq=v.seq,
            payee_id=payee.payee_id,
            amount_micros=amount_micros,
            spent_micros=v.spent_micros,
            time_ms=now_ms,
        )
        signed = seal_signed(payment, self.key)
        self.d2d_signed.append(Signed(signed.id, v.voucher_id, v.seq, amount_micros, payee.name))
        return encode_bundle(v.credential, v.vch, signed.raw)

    def accept(self, bundle: bytes, *, issuer_key: bytes, now_ms: int) -> str:
        """The payee's check (``Payee.accept``: ``check_bundle`` with the issuer key alone,
        then against the payments of the voucher it holds), kept and handed in later."""
        try:
            checked = check_bundle(
                bundle, issuer_key=issuer_key, payee_id=self.payee_id, now_ms=now_ms
            )
        except VoucherError as exc:
            self.d2d_refused[exc.code] = self.d2d_refused.get(exc.code, 0) + 1
            return f"refused {exc.code}"
        p, pid = checked.payment.msg, checked.payment.id
        kept = self.d2d_kept.setdefault(p.voucher_id, {})
        for s, a, u in kept.values() if pid not in kept else ():
            conflict = s == p.seq or (s < p.seq and p.spent_micros - p.amount_micros < u)
            if conflict or (s > p.seq and u - a < p.spent_micros):
                code = "voucher_seq_conflict" if s == p.seq else "voucher_overspent"
                self.d2d_refused[code] = self.d2d_refused.get(code, 0) + 1
                return f"refused {code}"
        kept[pid] = (p.seq, p.amount_micros, p.spent_micros)
        self.d2d_in[pid] = checked.record
        self.upload({pid})
        return f"accepted {p.amount_micros} (s={p.seq})"

    def hack(self, issuer_key: bytes, payload: bytes) -> str:
        """The cloud's answer to an upload (issuer-signed); a word for the trace."""
        try:
            ack = open_envelope(payload, HeldAck, signer=issuer_key).msg
        except Declined:
            return "hack_bad"
        if ack.device != self.public:
            return "hack_foreign"
        self.hacked |= set(ack.booked)
        self.to_upload -= set(ack.booked)
        for intent_id, fault in ack.faults:
            self.faults[intent_id] = fault
            self.to_upload.discard(intent_id)
        return f"hack booked={len(ack.booked)} refused={len(ack.faults)}"

    @property
    def public(self) -> bytes:
        return public_key(self.key)

    def pay(self, fog_id: str, amount_micros: int, payee: str, *, now_ms: int) -> tuple[str, bytes]:
        assert self.inflight is None
        self.seq += 1
        intent = Intent(
            device=self.public,
            fog_id=fog_id,
            seq=self.seq,
            payee_id=payee,
            amount_micros=amount_micros,
            currency=self.currency,
            time_ms=now_ms,
        )
        signed = seal_signed(intent, self.key)
        p = Payment(fog_id, signed.raw, signed.id, self.seq, amount_micros)
        self.inflight = p
        self.sent[signed.id] = p
        return topics.intent_topic(fog_id, self.public), signed.raw

    def retry(self) -> tuple[str, bytes] | None:
        """The in-flight intent again (same bytes), or None once given up."""
        p = self.inflight
        if p is None:
            return None
        if p.attempts > RETRIES_MAX:
            self.inflight = None
            return None
        p.attempts += 1
        return topics.intent_topic(p.fog_id, self.public), p.raw

    def receipt(self, fog_id: str, fog_key: bytes, payload: bytes, credential: bytes = b"") -> str:
        """A receipt arrived; returns a word for the trace. Bad or foreign ones are ignored.
        A ``vch`` (after the ok receipt of a voucher intent, 18.3) is kept with ``credential``
        (the fog's credential, as the device read it from its retained trust topic)."""
        try:
            r = open_envelope(payload, Receipt, signer=fog_key).msg
        except Declined:
            return self.voucher(fog_id, fog_key, payload, credential)
        p = self.sent.get(r.intent_id)
        if p is None or p.fog_id != fog_id or r.device != self.public or r.seq != p.seq:
            return "receipt_foreign"
        if self.inflight is not None and self.inflight.intent_id == r.intent_id:
            self.inflight = None
        if r.status != "ok":
            reason = str(r.reason)
            self.declined[reason] = self.declined.get(reason, 0) + 1
            return f"declined {reason}"
        assert r.log_index is not None and r.lease_id is not None
        record = encode_record(p.raw, payload)
        self.held.setdefault(
            r.intent_id,
            Held(
                fog_id,
                r.intent_id,
                r.seq,
                p.amount_micros,
                r.log_index,
                r.lease_id,
                r.time_ms,
                record,
            ),
        )
        return f"ok n={r.log_index}"
