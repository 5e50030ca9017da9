"""Booking plan: the pure decision of what a verified batch changes in the ledger.

``plan(batch, state)`` looks at the verified records and at the slice of the store they touch
(``BookState``: bindings of their devices, their leases, intents already booked, sequence
numbers already used) and says which transfers to insert, which records to reject with which
fault, how much each lease was drawn, how each account moves, and which alarms to raise. No
I/O: ``cloud.ingest`` loads the state and applies the plan in one transaction.

Rules (docs/protocol.md, section 15):
- an intent id already booked is skipped (booked once, whatever path, however often);
- the record must have a binding valid at the receipt's fog time, whose owner credential was
  valid then too, in the intent's currency; a revocation does not unbook: a receipt a fog
  issued before it learned of a revocation stands;
- the lease must be the batch's fog's, the binding owner's, in the intent's currency;
- a draw beyond the lease's amount or after its expiry is booked (the payee was served on
  the fog's word) and raises ``lease_overdrawn`` / ``lease_drawn_late`` against the fog;
- a second intent at a (device, q) already used is booked and raises ``cloned_key``: the
  device is suspended (the issuer revokes its key).
"""

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Final

from cloud.store import seq_bytes
from cloud.verify import CheckedBatch, CheckedRecord, Fault

ALARM_CLONED_KEY: Final = "cloned_key"
ALARM_LEASE_OVERDRAWN: Final = "lease_overdrawn"
ALARM_LEASE_LATE: Final = "lease_drawn_late"
ALARM_FORK: Final = "chain_fork"
ALARM_LEASE_REPORT: Final = "lease_report_mismatch"


@dataclass(frozen=True, slots=True)
class BindingRow:
    owner_id: str
    currency: str
    not_before_ms: int
    not_after_ms: int
    owner_not_before_ms: int
    owner_not_after_ms: int

    def valid_at(self, t: int) -> bool:
        return (
            self.not_before_ms <= t <= self.not_after_ms
            and self.owner_not_before_ms <= t <= self.owner_not_after_ms
        )


@dataclass(frozen=True, slots=True)
class LeaseRow:
    owner_id: str
    fog_id: str
    currency: str
    amount_micros: int
    not_after_ms: int
    drawn_micros: int


@dataclass(slots=True)
class BookState:
    bindings: dict[bytes, list[BindingRow]]
    leases: dict[bytes, LeaseRow]
    booked: set[bytes]  # intent ids already booked
    seqs: dict[tuple[bytes, bytes], bytes]  # (device, seq bytes) -> booked intent id


@dataclass(frozen=True, slots=True)
class Alarm:
    kind: str
    subject: str  # hex of the device, lease or batch the alarm is about
    detail: str


@dataclass(frozen=True, slots=True)
class Transfer:
    intent_id: bytes
    device: bytes
    seq: bytes
    debit: str
    credit: str
    currency: str
    amount_micros: int
    lease_id: bytes
    position: int


@dataclass(slots=True)
class Plan:
    transfers: list[Transfer] = field(default_factory=list)
    rejected: list[tuple[int, bytes | None, Fault]] = field(default_factory=list)
    duplicates: int = 0
    lease_draws: dict[bytes, int] = field(default_factory=lambda: defaultdict(int))
    balances: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    alarms: list[Alarm] = field(default_factory=list)
    suspend: set[bytes] = field(default_factory=set)


def plan(batch: CheckedBatch, state: BookState) -> Plan:
    out = Plan()
    for rec in batch.records:
        if rec.fault is not None:
            out.rejected.append((rec.position, rec.intent_id, rec.fault))
            continue
        assert rec.intent_id is not None
        if rec.intent_id in state.booked:
            out.duplicates += 1
            continue
        fault = _book(batch.header.fog_id, rec, state, out)
        if fault is not None:
            out.rejected.append((rec.position, rec.intent_id, fault))
    return out


def _binding(rec: CheckedRecord, state: BookState) -> BindingRow | None:
    """A binding valid at the receipt's time, one in the intent's currency first."""
    valid = [b for b in state.bindings.get(rec.device, ()) if b.valid_at(rec.receipt_time_ms)]
    valid.sort(key=lambda b: b.currency != rec.currency)
    return valid[0] if valid else None


def _book(fog_id: str, rec: CheckedRecord, state: BookState, out: Plan) -> Fault | None:
    assert rec.intent_id is not None
    binding = _binding(rec, state)
    if binding is None:
        return Fault.UNKNOWN_DEVICE
    if binding.currency != rec.currency:
        return Fault.CURRENCY
    lease = state.leases.get(rec.lease_id)
    if lease is None:
        return Fault.UNKNOWN_LEASE
    if (lease.fog_id, lease.owner_id, lease.currency) != (fog_id, binding.owner_id, rec.currency):
        return Fault.LEASE_MISMATCH
    _check_seq(rec, state, out)
    _draw(rec, lease, out)
    state.booked.add(rec.intent_id)
    out.transfers.append(
        Transfer(
            rec.intent_id,
            rec.device,
            seq_bytes(rec.seq),
            binding.owner_id,
            rec.payee_id,
            rec.currency,
            rec.amount_micros,
            rec.lease_id,
            rec.position,
        )
    )
    out.balances[(binding.owner_id, rec.currency)] -= rec.amount_micros
    out.balances[(rec.payee_id, rec.currency)] += rec.amount_micros
    return None


def _check_seq(rec: CheckedRecord, state: BookState, out: Plan) -> None:
    assert rec.intent_id is not None
    key = (rec.device, seq_bytes(rec.seq))
    other = state.seqs.setdefault(key, rec.intent_id)
    if other != rec.intent_id:
        detail = f"q={rec.seq} intents {other.hex()[:16]} and {rec.intent_id.hex()[:16]}"
        out.alarms.append(Alarm(ALARM_CLONED_KEY, rec.device.hex(), detail))
        out.suspend.add(rec.device)


def _draw(rec: CheckedRecord, lease: LeaseRow, out: Plan) -> None:
    out.lease_draws[rec.lease_id] += rec.amount_micros
    drawn = lease.drawn_micros + out.lease_draws[rec.lease_id]
    if drawn > lease.amount_micros:
        detail = f"drawn {drawn} > amount {lease.amount_micros}"
        out.alarms.append(Alarm(ALARM_LEASE_OVERDRAWN, rec.lease_id.hex(), detail))
    if rec.receipt_time_ms > lease.not_after_ms:
        detail = f"receipt t={rec.receipt_time_ms} > na={lease.not_after_ms}"
        out.alarms.append(Alarm(ALARM_LEASE_LATE, rec.lease_id.hex(), detail))
