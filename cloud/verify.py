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

The result (``CheckedBatch``) is the batch decoded and checked once: the header's fields, the
records without a fault as columns (``Draws``), the faulty ones with their fault, and every
record's bytes as received (``record_bytes``: what the ``records`` table keeps as evidence).
The booking process uses it as it is and never decodes the wire again. It crosses a process
boundary, so it is compact: a few tuples pickle in a fraction of the time of one object per
record.
"""

import enum
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from msgpack import unpackb

from protocol import merkle
from protocol.batch import decode_batch, decode_record
from protocol.errors import Declined
from protocol.messages import STATUS_OK, BatchHeader, Intent, Receipt, decode_body
from protocol.reasons import Reason
from protocol.signing import open_envelope, open_message, signing_input, verify_signed


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
    """One record's verdict: what ``check_record`` returns; a batch keeps them as columns
    (``CheckedBatch``) and the records' bytes apart (``CheckedBatch.record_bytes``)."""

    position: int
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
class Draws:
    """The records without a fault, one column per field, in position order. Batches cross
    process boundaries: a few lists pickle and unpickle in a fraction of the time of one
    object per record."""

    positions: tuple[int, ...]
    intent_ids: tuple[bytes, ...]
    devices: tuple[bytes, ...]
    seqs: tuple[int, ...]
    payee_ids: tuple[str, ...]
    amounts: tuple[int, ...]
    currencies: tuple[str, ...]
    lease_ids: tuple[bytes, ...]
    times: tuple[int, ...]  # the receipts' t

    def __len__(self) -> int:
        return len(self.positions)


NO_DRAWS: Final = Draws((), (), (), (), (), (), (), (), ())


@dataclass(frozen=True, slots=True)
class CheckedBatch:
    header: CheckedHeader
    faults: tuple[CheckedRecord, ...]  # records with a fault (position, fault, intent_id)
    draws: Draws
    # every record's bytes as received, in position order (empty only where a test builds
    # verdicts without a wire)
    record_bytes: tuple[bytes, ...] = ()

    @classmethod
    def of(
        cls,
        header: CheckedHeader,
        records: Iterable[CheckedRecord],
        record_bytes: tuple[bytes, ...] = (),
    ) -> "CheckedBatch":
        faults: list[CheckedRecord] = []
        good: list[CheckedRecord] = []
        for r in records:
            (good if r.fault is None else faults).append(r)
        if not good:
            return cls(header, tuple(faults), NO_DRAWS, record_bytes)
        positions, _, intent_ids, *rest = zip(*good, strict=True)  # one tuple per field
        return cls(header, tuple(faults), Draws(positions, intent_ids, *rest), record_bytes)

    @property
    def count(self) -> int:
        return len(self.faults) + len(self.draws)

    def records(self) -> list[CheckedRecord]:
        """Every record's verdict, in position order."""
        d = self.draws
        good = [
            CheckedRecord(p, None, *rest)
            for p, *rest in zip(
                d.positions,
                d.intent_ids,
                d.devices,
                d.seqs,
                d.payee_ids,
                d.amounts,
                d.currencies,
                d.lease_ids,
                d.times,
                strict=True,
            )
        ]
        return sorted([*self.faults, *good], key=lambda r: r.position)

    def intent_ids(self) -> list[bytes | None]:
        """Each position's intent id (None where the intent did not open)."""
        out: list[bytes | None] = [None] * self.count
        for p, i in zip(self.draws.positions, self.draws.intent_ids, strict=True):
            out[p] = i
        for r in self.faults:
            out[r.position] = r.intent_id
        return out


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
    return check_records(header, records)


# The usual encoding of a record's two envelopes (see ``check_records``): an array of 4, the
# type as a fixstr, then a bin 8 body.
_INTENT_HEAD: Final = b"\x94\xa6" + Intent.TYPE.encode() + b"\xc4"
_RECEIPT_HEAD: Final = b"\x94\xa7" + Receipt.TYPE.encode() + b"\xc4"
_INTENT_SIGNED: Final = signing_input(Intent.TYPE, b"")
_RECEIPT_SIGNED: Final = signing_input(Receipt.TYPE, b"")
_KEY_TAG: Final = b"\xc4\x20"  # bin 8 of 32: the signer
_SIG_TAG: Final = b"\xc4\x40"  # bin 8 of 64: the signature
_RECEIPT_ENVELOPE_MIN: Final = 111  # array, fixstr "receipt", bin 8 empty body, key, sig
_RECORD_BYTES_MIN: Final = 5 + 110 + _RECEIPT_ENVELOPE_MIN  # [bin 8, bin 8], empty bodies


# The bodies' fast path (``_intent_fields``, ``_receipt_fields``): a plain ``msgpack.unpackb``
# and each field tested by the schema's own check, for the usual bodies only (the required
# keys; a receipt's ok keys); any other body, or any doubt, goes to ``decode_body``. The
# keys they expect are pinned here against the schemas: if a schema changes, they step aside.
_INTENT_CHECKS: Final = {f.key: f.check for f in Intent.SCHEMA}
_RECEIPT_CHECKS: Final = {f.key: f.check for f in Receipt.SCHEMA}
_INTENT_KEYS: Final = frozenset("dfqpact")
_RECEIPT_KEYS: Final = frozenset("idqsnlt")  # an ok receipt: n and l, no r
FAST_BODIES: Final = (
    {f.key for f in Intent.SCHEMA if not f.optional} == _INTENT_KEYS
    and {f.key for f in Receipt.SCHEMA if not f.optional} == _RECEIPT_KEYS - {"n", "l"}
    and {f.key for f in Receipt.SCHEMA if f.optional} == {"r", "n", "l"}
)
_I_KEY, _I_FOG, _I_SEQ, _I_PAYEE, _I_AMOUNT, _I_CURRENCY, _I_TIME = (
    _INTENT_CHECKS[k] for k in "dfqpact"
)
_R_ID, _R_KEY, _R_SEQ, _R_STATUS, _R_INDEX, _R_LEASE, _R_TIME = (
    _RECEIPT_CHECKS[k] for k in "idqsnlt"
)
# strings a check accepted (fog ids, payee ids, currencies repeat): the check is a pure
# function of the string, so a string seen to pass passes; bounded, then no longer added to
_passed: dict[Callable[[object], bool], set[str]] = {
    _I_FOG: set(),
    _I_PAYEE: set(),
    _I_CURRENCY: set(),
}
PASSED_MAX: Final = 4096


def _passes(check: Callable[[object], bool], value: object) -> bool:
    if type(value) is not str:
        return check(value)
    seen = _passed[check]
    if value in seen:
        return True
    if not check(value):
        return False
    if len(seen) < PASSED_MAX:
        seen.add(value)
    return True


def _intent_fields(body: bytes) -> tuple[bytes, str, int, str, int, str] | None:
    """``(d, f, q, p, a, c)`` as ``decode_body(Intent, body)`` returns them; None if it
    raises. A body of the seven required keys in a fixmap is read here (no optional key, so
    ``Intent.validate`` has nothing to refuse); any other is decoded by ``decode_body``."""
    if FAST_BODIES and body and body[0] == 0x87:
        try:
            m = unpackb(body)  # no limit can bite: a body is at most 255 bytes here
        except Exception:  # malformed: decode_body says so
            m = None
        if type(m) is dict and len(m) == 7 and m.keys() == _INTENT_KEYS:  # no duplicate key
            d, f, q, p, a, c = m["d"], m["f"], m["q"], m["p"], m["a"], m["c"]
            if (
                _I_KEY(d)
                and _passes(_I_FOG, f)
                and _I_SEQ(q)
                and _passes(_I_PAYEE, p)
                and _I_AMOUNT(a)
                and _passes(_I_CURRENCY, c)
                and _I_TIME(m["t"])
            ):
                return d, f, q, p, a, c
    return intent_decoded(body)


def intent_decoded(body: bytes) -> tuple[bytes, str, int, str, int, str] | None:
    """``_intent_fields`` the thorough way: ``decode_body`` (its fallback, and the tests'
    reference)."""
    try:
        i = decode_body(Intent, body)
    except Declined:
        return None
    return i.device, i.fog_id, i.seq, i.payee_id, i.amount_micros, i.currency


def _receipt_fields(body: bytes) -> tuple[bytes, bytes, int, int, bytes, int] | None:
    """``(i, d, q, n, l, t)`` of an ok receipt as ``decode_body(Receipt, body)`` returns
    them; None if it raises or the receipt is not ok (``check_record`` then says which). An
    ok receipt's seven keys in a fixmap are read here (``Receipt.validate``'s rules for ok:
    n and l, no r, q not 0); any other body is decoded by ``decode_body``."""
    if FAST_BODIES and body and body[0] == 0x87:
        try:
            m = unpackb(body)
        except Exception:
            m = None
        if type(m) is dict and len(m) == 7 and m.keys() == _RECEIPT_KEYS:
            i, d, q, s, n, lease, t = m["i"], m["d"], m["q"], m["s"], m["n"], m["l"], m["t"]
            if (
                s == STATUS_OK
                and _R_STATUS(s)
                and _R_ID(i)
                and _R_KEY(d)
                and _R_SEQ(q)
                and q != 0
                and _R_INDEX(n)
                and _R_LEASE(lease)
                and _R_TIME(t)
            ):
                return i, d, q, n, lease, t
    return receipt_decoded(body)


def receipt_decoded(body: bytes) -> tuple[bytes, bytes, int, int, bytes, int] | None:
    """``_receipt_fields`` the thorough way: ``decode_body`` (its fallback, and the tests'
    reference); None unless an ok receipt."""
    try:
        r = decode_body(Receipt, body)
    except Declined:
        return None
    if not r.ok or r.lease_id is None or r.log_index is None:
        return None
    return r.intent_id, r.device, r.seq, r.log_index, r.lease_id, r.time_ms


def check_records(header: CheckedHeader, records: list[bytes]) -> CheckedBatch:
    """``check_record`` for every record, in the time of little more than the two verifies.

    A record in the usual encoding (``[bin 8, bin 8]`` of two envelopes of the usual shape,
    the one ``protocol.signing._split`` reads directly) is split here in place, its bodies
    decoded by ``decode_body``, its cross-checks made, and its two signatures verified with
    the batch's others in one loop (``verify_signed``). Only a record that passes all of
    it is taken from this path; any other (another encoding, a bad signature, a failed
    check) is judged again by ``check_record`` alone, whose verdict (its Fault) is the one
    kept: this path decides nothing that ``check_record`` would decide otherwise.
    """
    fog_id, fog_key, first = header.fog_id, header.signer, header.first_index
    positions: list[int] = []
    intent_ids: list[bytes] = []
    devices: list[bytes] = []
    seqs: list[int] = []
    payee_ids: list[str] = []
    amounts: list[int] = []
    currencies: list[str] = []
    lease_ids: list[bytes] = []
    times: list[int] = []
    keys: list[bytes] = []  # two per record taken: the device's, then the fog's
    signed: list[bytes] = []  # signature + signing input, as keys
    slow: list[int] = []
    sha256 = hashlib.sha256
    for position, rec in enumerate(records):
        n = len(rec)
        if n < _RECORD_BYTES_MIN or rec[0] != 0x92 or rec[1] != 0xC4:
            slow.append(position)
            continue
        # every index read is inside rec (a slice may not be): n >= 226 covers rec[12];
        # o + 2 + 111 <= n covers rec[o], rec[o + 1] and rec[o + 12]
        o = 3 + rec[2]  # the receipt envelope's bin 8 tag; the intent envelope is rec[3:o]
        b = 13 + rec[12]  # the intent body is rec[13:b]
        if not (
            o + 2 + _RECEIPT_ENVELOPE_MIN <= n
            and rec[o] == 0xC4
            and o + 2 + rec[o + 1] == n
            and o == b + 100
            and rec[3:12] == _INTENT_HEAD
            and rec[b : b + 2] == _KEY_TAG
            and rec[b + 34 : b + 36] == _SIG_TAG
        ):
            slow.append(position)
            continue
        o += 2  # the receipt envelope is rec[o:n], at least 111 bytes
        rb = o + 11 + rec[o + 10]  # its body is rec[o + 11 : rb]
        if not (
            rb + 100 == n
            and rec[o : o + 10] == _RECEIPT_HEAD
            and rec[rb : rb + 2] == _KEY_TAG
            and rec[rb + 34 : rb + 36] == _SIG_TAG
            and rec[rb + 2 : rb + 34] == fog_key
        ):
            slow.append(position)
            continue
        body = rec[13:b]
        device = rec[b + 2 : b + 34]
        intent_input = _INTENT_SIGNED + body
        receipt_body = rec[o + 11 : rb]
        i = _intent_fields(body)
        r = _receipt_fields(receipt_body)
        if i is None or r is None:
            slow.append(position)
            continue
        intent_id = sha256(intent_input).digest()
        d, f, q, p, a, c = i
        if not (
            d == device
            and r[0] == intent_id
            and r[1] == device
            and r[2] == q
            and f == fog_id
            and r[3] == first + position
        ):
            slow.append(position)
            continue
        keys.append(device)
        signed.append(rec[b + 36 : o - 2] + intent_input)
        keys.append(fog_key)
        signed.append(rec[rb + 36 : n] + _RECEIPT_SIGNED + receipt_body)
        positions.append(position)
        intent_ids.append(intent_id)
        devices.append(device)
        seqs.append(q)
        payee_ids.append(p)
        amounts.append(a)
        currencies.append(c)
        lease_ids.append(r[4])
        times.append(r[5])
    verified = verify_signed(keys, signed)
    columns = (
        positions,
        intent_ids,
        devices,
        seqs,
        payee_ids,
        amounts,
        currencies,
        lease_ids,
        times,
    )
    if slow or not all(verified):
        return _with_slow(header, records, columns, slow, verified)
    if not positions:
        return CheckedBatch(header, (), NO_DRAWS, tuple(records))
    draws = Draws(
        tuple(positions),
        tuple(intent_ids),
        tuple(devices),
        tuple(seqs),
        tuple(payee_ids),
        tuple(amounts),
        tuple(currencies),
        tuple(lease_ids),
        tuple(times),
    )
    return CheckedBatch(header, (), draws, tuple(records))


def _with_slow(
    header: CheckedHeader,
    records: list[bytes],
    columns: tuple[list[Any], ...],
    slow: list[int],
    verified: list[bool],
) -> CheckedBatch:
    """The verdicts when some records left the fast path, or one of their signatures did not
    verify: each of those judged by ``check_record``, the others as the fast path found."""
    verdicts = [check_record(header, p, records[p]) for p in slow]
    for k, (position, *rest) in enumerate(zip(*columns, strict=True)):
        if verified[2 * k] and verified[2 * k + 1]:
            verdicts.append(CheckedRecord(position, None, *rest))
        else:
            verdicts.append(check_record(header, position, records[position]))
    verdicts.sort(key=lambda r: r.position)
    return CheckedBatch.of(header, verdicts, tuple(records))


def check_record(header: CheckedHeader, position: int, record: bytes) -> CheckedRecord:
    try:
        intent_env, receipt_env = decode_record(record)
    except Declined:
        return CheckedRecord(position, Fault.BAD_RECORD)
    try:
        i, intent_id, _ = open_message(intent_env, Intent)
    except Declined:
        return CheckedRecord(position, Fault.BAD_INTENT)
    try:
        r, _, receipt_signer = open_message(receipt_env, Receipt)
    except Declined:
        return CheckedRecord(position, Fault.BAD_RECEIPT, intent_id)
    if receipt_signer != header.signer:
        return CheckedRecord(position, Fault.RECEIPT_SIGNER, intent_id)
    if r.intent_id != intent_id or r.device != i.device or r.seq != i.seq:
        return CheckedRecord(position, Fault.RECEIPT_MISMATCH, intent_id)
    if not r.ok or r.lease_id is None:
        return CheckedRecord(position, Fault.RECEIPT_NOT_OK, intent_id)
    if i.fog_id != header.fog_id:
        return CheckedRecord(position, Fault.WRONG_FOG, intent_id)
    if r.log_index != header.first_index + position:
        return CheckedRecord(position, Fault.LOG_INDEX, intent_id)
    return CheckedRecord(
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
