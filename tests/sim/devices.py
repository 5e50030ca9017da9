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

    def pay_again(
        self, fog_id: str, seq: int, amount_micros: int, payee: str, *, now_ms: int
    ) -> tuple[str, bytes]:
        """A clone's payment: ``seq`` (one its original used) at ``fog_id``."""
        self.seq = seq - 1
        return self.pay(fog_id, amount_micros, payee, now_ms=now_ms)

    def upload(self, intent_ids: set[bytes]) -> None:
        """Hand in these held receipts (again, until a ``hack`` lists them)."""
        self.to_upload |= {i for i in intent_ids if i in self.held and i not in self.hacked}

    def held_payloads(self) -> list[bytes]:
        """The ``held`` payloads of what is still to upload, 16 records each."""
        ids = sorted(self.to_upload)
        return [
            encode_held([self.held[i].record for i in ids[k : k + HELD_RECORDS_MAX]])
            for k in range(0, len(ids), HELD_RECORDS_MAX)
        ]

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

    def receipt(self, fog_id: str, fog_key: bytes, payload: bytes) -> str:
        """A receipt arrived; returns a word for the trace. Bad or foreign ones are ignored."""
        try:
            r = open_envelope(payload, Receipt, signer=fog_key).msg
        except Declined:
            return "receipt_bad"
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
