"""Pure verification of a batch's bytes: the CPU-bound half of ingest.

``check_batch(wire)`` needs no store, clock or key registry, so it can run in a
``ProcessPoolExecutor``: it opens the header envelope (the fog's signature over its own body),
recomputes the Merkle root over the records as received, and opens every record's intent
(device signature, signer == ``d``) and receipt (signature by its signer) and checks them
against each other and the header. What needs the registry (is the header's signer the
fog's key? the binding valid at the time? the lease?) is booking's job (``cloud.booking``).

A batch whose header or Merkle root is wrong is refused whole (``Declined``): it proves
nothing. A record that fails inside a well-signed batch is the fog's fault, not the
transport's: it is kept as ``CheckedRecord.fault`` so booking can reject it with evidence.
"""

import enum
from dataclasses import dataclass
from typing import NamedTuple

from protocol import merkle
from protocol.batch import decode_batch, decode_record
from protocol.errors import Declined
from protocol.messages import BatchHeader, Intent, Receipt
from protocol.reasons import Reason
from protocol.signing import open_envelope


class Fault(enum.StrEnum):
    """Why a record inside an authentic batch is not booked (stable: stored and logged)."""

    BAD_RECORD = "bad_record"  # not [bin, bin]
    BAD_INTENT = "bad_intent"  # malformed or bad device signature
    BAD_RECEIPT = "bad_receipt"  # malformed or bad signature
    RECEIPT_MISMATCH = "receipt_mismatch"  # i, d or q differ from the intent's
    RECEIPT_NOT_OK = "receipt_not_ok"
    RECEIPT_SIGNER = "receipt_signer"  # not the batch's fog
    WRONG_FOG = "wrong_fog"  # intent f is not the batch's fog
    LOG_INDEX = "log_index"  # n is not s + position
    UNKNOWN_DEVICE = "unknown_device"  # no binding valid at the receipt's time
    CURRENCY = "currency"
    UNKNOWN_LEASE = "unknown_lease"
    LEASE_MISMATCH = "lease_mismatch"  # lease of another fog, owner or currency


@dataclass(frozen=True, slots=True)
class CheckedHeader:
    fog_id: str
    number: int
    prev_id: bytes
    first_index: int
    count: int
    root: bytes
    time_ms: int
    header_id: bytes
    signer: bytes
    raw: bytes


class CheckedRecord(NamedTuple):
    """One record's verdict. A NamedTuple, not a dataclass: batches cross process
    boundaries, and a slots dataclass pickles ~4x slower per record."""

    position: int
    record: bytes
    fault: Fault | None = None
    intent_id: bytes | None = None
    device: bytes = b""
    seq: int = 0
    payee_id: str = ""
    amount_micros: int = 0
    currency: str = ""
    lease_id: bytes = b""
    receipt_time_ms: int = 0


@dataclass(frozen=True, slots=True)
class CheckedBatch:
    header: CheckedHeader
    records: tuple[CheckedRecord, ...]

    @property
    def draws(self) -> list[CheckedRecord]:
        return [r for r in self.records if r.fault is None]


def check_header(header_envelope: bytes) -> CheckedHeader:
    signed = open_envelope(header_envelope, BatchHeader)
    h = signed.msg
    return CheckedHeader(
        h.fog_id,
        h.number,
        h.prev_id,
        h.first_index,
        h.count,
        h.root,
        h.time_ms,
        signed.id,
        signed.signer,
        signed.raw,
    )


def check_batch(wire: bytes) -> CheckedBatch:
    """Verify a batch's bytes; raises Declined(MALFORMED or BAD_SIGNATURE) for the batch."""
    header_env, records = decode_batch(wire)
    header = check_header(header_env)
    if header.count != len(records):
        raise Declined(Reason.MALFORMED, f"batch: n={header.count}, {len(records)} records")
    if merkle.root_of_records(records) != header.root:
        raise Declined(Reason.MALFORMED, "batch: Merkle root does not match the records")
    checked = tuple(check_record(header, i, r) for i, r in enumerate(records))
    return CheckedBatch(header, checked)


def check_record(header: CheckedHeader, position: int, record: bytes) -> CheckedRecord:
    def fault(f: Fault, intent_id: bytes | None = None) -> CheckedRecord:
        return CheckedRecord(position, record, f, intent_id)

    try:
        intent_env, receipt_env = decode_record(record)
    except Declined:
        return fault(Fault.BAD_RECORD)
    try:
        intent = open_envelope(intent_env, Intent)
    except Declined:
        return fault(Fault.BAD_INTENT)
    try:
        receipt = open_envelope(receipt_env, Receipt)
    except Declined:
        return fault(Fault.BAD_RECEIPT, intent.id)
    i, r = intent.msg, receipt.msg
    if receipt.signer != header.signer:
        return fault(Fault.RECEIPT_SIGNER, intent.id)
    if r.intent_id != intent.id or r.device != i.device or r.seq != i.seq:
        return fault(Fault.RECEIPT_MISMATCH, intent.id)
    if not r.ok or r.lease_id is None:
        return fault(Fault.RECEIPT_NOT_OK, intent.id)
    if i.fog_id != header.fog_id:
        return fault(Fault.WRONG_FOG, intent.id)
    if r.log_index != header.first_index + position:
        return fault(Fault.LOG_INDEX, intent.id)
    return CheckedRecord(
        position,
        record,
        None,
        intent.id,
        i.device,
        i.seq,
        i.payee_id,
        i.amount_micros,
        i.currency,
        r.lease_id,
        r.time_ms,
    )
