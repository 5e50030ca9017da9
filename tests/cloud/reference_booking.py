"""``cloud.booking.plan`` as it was before it read columns (commit f48db37): one record at a
time, helper by helper. The reference the current plan must agree with
(tests/cloud/test_booking_property.py). Only the key of ``BookState.seqs`` changed: dseq."""

from cloud.booking import (
    ALARM_CLONED_KEY,
    ALARM_LEASE_LATE,
    ALARM_LEASE_OVERDRAWN,
    Alarm,
    BindingRow,
    BookState,
    LeaseRow,
    Plan,
    Transfer,
)
from cloud.store import seq_bytes
from cloud.verify import CheckedBatch, CheckedRecord, Fault


def plan(batch: CheckedBatch, state: BookState) -> Plan:
    out = Plan()
    for rec in batch.records():
        if rec.fault is not None:
            out.rejected.append((rec.position, rec.intent_id, rec.fault))
            continue
        assert rec.intent_id is not None
        if rec.intent_id in state.booked:
            out.duplicates += 1
            out.duplicate_ids.append((rec.position, rec.intent_id))
            continue
        fault = _book(batch.header.fog_id, rec, state, out)
        if fault is not None:
            out.rejected.append((rec.position, rec.intent_id, fault))
    return out


def _binding(rec: CheckedRecord, state: BookState) -> BindingRow | None:
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
            rec.device + seq_bytes(rec.seq),
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
    key = rec.device + seq_bytes(rec.seq)
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
