"""Booking plan: the pure decision of what a verified batch changes in the ledger.

``plan(batch, state)`` looks at the verified records and at the slice of the store they touch
(``BookState``: bindings of their devices, their leases, intents already booked, sequence
numbers already used) and says which transfers to insert, which records to reject with which
fault, how much each lease was drawn, how each account moves, and which alarms to raise.
``book(batch, state, chain, now_ms=...)`` turns that into the rows to write (``Booking``:
the batch, its records as evidence, transfers, lease draws, account moves, rejections) and
the chain after the batch. No I/O: ``cloud.ledger`` reads the state (``booking_state``) and
writes the rows (``write``), in the one transaction ``cloud.ingest`` runs.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Final, NamedTuple

from cloud.chain import Chain
from cloud.store import seq_bytes
from cloud.verify import CheckedBatch, Fault

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
    seqs: dict[bytes, bytes]  # dseq (device + seq_bytes(q)) -> a booked intent id


@dataclass(frozen=True, slots=True)
class Alarm:
    kind: str
    subject: str  # hex of the device, lease or batch the alarm is about
    detail: str


class Transfer(NamedTuple):
    """A transfer to insert (a NamedTuple: the row's leading columns, as they are written)."""

    intent_id: bytes
    device: bytes
    dseq: bytes  # device + seq_bytes(q)
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
    # (position, intent id) of the duplicates: a transfer booked from a device's upload
    # (number 0) is pointed at the batch that brings its record (section 17.8)
    duplicate_ids: list[tuple[int, bytes]] = field(default_factory=list)
    lease_draws: dict[bytes, int] = field(default_factory=lambda: defaultdict(int))
    balances: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    alarms: list[Alarm] = field(default_factory=list)
    suspend: set[bytes] = field(default_factory=set)


def dseqs(batch: CheckedBatch) -> list[bytes]:
    """Each draw's device + seq_bytes(q), in the order of ``batch.draws``."""
    d = batch.draws
    return [dev + seq_bytes(q) for dev, q in zip(d.devices, d.seqs, strict=True)]


def plan(batch: CheckedBatch, state: BookState, keys: list[bytes] | None = None) -> Plan:
    """``keys``: ``dseqs(batch)`` if the caller has it already."""
    out = Plan()
    out.rejected.extend((r.position, r.intent_id, r.fault) for r in batch.faults if r.fault)
    fog_id = batch.header.fog_id
    d = batch.draws
    rows = zip(
        d.positions,
        d.intent_ids,
        d.devices,
        dseqs(batch) if keys is None else keys,
        d.seqs,
        d.payee_ids,
        d.amounts,
        d.currencies,
        d.lease_ids,
        d.times,
        strict=True,
    )
    booked, seqs, leases, bindings = state.booked, state.seqs, state.leases, state.bindings
    transfers, balances, draws = out.transfers, out.balances, out.lease_draws
    faults = 0
    for position, intent_id, device, dseq, seq, payee, amount, currency, lease_id, t in rows:
        if intent_id in booked:  # booked once, whatever path, however often
            out.duplicates += 1
            out.duplicate_ids.append((position, intent_id))
            continue
        # a binding valid at the receipt's time, one in the intent's currency first
        binding = None
        for b in bindings.get(device, ()):
            if b.valid_at(t):
                if b.currency == currency:
                    binding = b
                    break
                if binding is None:
                    binding = b
        if binding is None:
            fault = Fault.UNKNOWN_DEVICE
        elif binding.currency != currency:
            fault = Fault.CURRENCY
        elif (lease := leases.get(lease_id)) is None:
            fault = Fault.UNKNOWN_LEASE
        elif (lease.fog_id, lease.owner_id, lease.currency) != (
            fog_id,
            binding.owner_id,
            currency,
        ):
            fault = Fault.LEASE_MISMATCH
        else:
            other = seqs.setdefault(dseq, intent_id)
            if other != intent_id:
                detail = f"q={seq} intents {other.hex()[:16]} and {intent_id.hex()[:16]}"
                out.alarms.append(Alarm(ALARM_CLONED_KEY, device.hex(), detail))
                out.suspend.add(device)
            draws[lease_id] += amount
            drawn = lease.drawn_micros + draws[lease_id]
            if drawn > lease.amount_micros:
                detail = f"drawn {drawn} > amount {lease.amount_micros}"
                out.alarms.append(Alarm(ALARM_LEASE_OVERDRAWN, lease_id.hex(), detail))
            if t > lease.not_after_ms:
                detail = f"receipt t={t} > na={lease.not_after_ms}"
                out.alarms.append(Alarm(ALARM_LEASE_LATE, lease_id.hex(), detail))
            booked.add(intent_id)
            owner = binding.owner_id
            transfers.append(
                Transfer(
                    intent_id, device, dseq, owner, payee, currency, amount, lease_id, position
                )
            )
            balances[(owner, currency)] -= amount
            balances[(payee, currency)] += amount
            continue
        out.rejected.append((position, intent_id, fault))
        faults += 1
    if faults and batch.faults:
        out.rejected.sort(key=lambda r: r[0])  # position order
    return out


@dataclass(frozen=True, slots=True)
class Booking:
    """Everything booking one batch writes, as rows (``cloud.ledger.write``), and the
    decision they carry (``plan``: counts, alarms, devices to suspend)."""

    plan: Plan
    chain: Chain  # the fog's chain once the batch is booked
    batch_row: tuple[str, int, bytes, bytes, int, int, int]  # the batches table's columns
    record_rows: list[tuple[str, int, int, bytes, bytes]]  # fog, number, position, intent, record
    transfer_rows: list[Sequence[object]]  # Transfer's fields, then fog, number, booked_ms
    draw_rows: list[tuple[int, bytes]]  # (amount drawn now, lease id), by lease id
    account_rows: list[tuple[str, str, int]]  # (account, currency, delta), sorted
    rejected_rows: list[tuple[str, int, int, bytes | None, str]]
    # (number, position, intent id, fog): duplicates whose transfer came from an upload
    relink_rows: list[tuple[int, int, bytes, str]] = field(default_factory=list)


def book(
    batch: CheckedBatch,
    state: BookState,
    chain: Chain,
    *,
    now_ms: int,
    keys: list[bytes] | None = None,
) -> Booking:
    """Book ``batch``, the next on ``chain`` (``cloud.chain.step`` said ``LINK``), against
    ``state`` (read in the same transaction). ``state`` is updated as ``plan`` does."""
    h = batch.header
    assert len(batch.record_bytes) == h.count == batch.count
    p = plan(batch, state, keys)
    ids = [b"" if i is None else i for i in batch.intent_ids()]
    tail = (h.fog_id, h.number, now_ms)
    return Booking(
        plan=p,
        chain=chain.after(h),
        batch_row=(h.fog_id, h.number, h.header_id, h.raw, h.first_index, h.count, now_ms),
        record_rows=list(
            zip(repeat(h.fog_id), repeat(h.number), range(h.count), ids, batch.record_bytes)
        ),
        transfer_rows=[t + tail for t in p.transfers],
        draw_rows=[(amount, lease_id) for lease_id, amount in sorted(p.lease_draws.items())],
        account_rows=[(a, c, d) for (a, c), d in sorted(p.balances.items())],
        rejected_rows=[(h.fog_id, h.number, pos, i, str(f)) for pos, i, f in p.rejected],
        relink_rows=[(h.number, pos, i, h.fog_id) for pos, i in p.duplicate_ids],
    )
