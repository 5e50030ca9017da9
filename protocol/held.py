"""Receipts held by devices: the ``held`` payload and the issuer's ``hack`` (docs/protocol.md
section 17.7).

A device keeps every ok receipt it got, with its intent, until the cloud says it has booked
it. It hands them in on ``fogpay/1/held/{device_hex}/records`` (any fog's broker bridged to
the cloud, or the cloud's broker) as a ``held`` payload: the msgpack array
``[record: bin, ...]`` of 1..16 records, each exactly a batch record of section 10
(``[intent envelope: bin, receipt envelope: bin]``, the receipt ``ok``). The payload is not
signed as a whole: each record proves itself (the device's signature on the intent, the fog's
on the receipt).

The cloud answers each payload with one ``hack`` on ``fogpay/1/held/{device_hex}/ack``,
signed by the issuer: the intent ids now booked (``i``: by this upload or before) and the
records it will not book with their fault (``x``).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from protocol import limits
from protocol.codec import pack, unpack_strict
from protocol.errors import Declined
from protocol.messages import KEY, UINT, Field, Message, is_id
from protocol.reasons import Reason

HELD_TYPE: Final = "hack"
HELD_BYTES_MAX: Final = 20_480  # a held payload
HELD_RECORDS_MAX: Final = 16  # records in one held payload
HELD_RECORD_BYTES_MAX: Final = 2 * limits.INTENT_ENVELOPE_BYTES_MAX + 16  # [bin 512, bin 512]
HACK_ENVELOPE_BYTES_MAX: Final = 4_096
# the fault of a record that is not acceptable on its topic (its intent is another device's)
FAULT_MALFORMED: Final = "malformed"


def encode_held(records: Sequence[bytes]) -> bytes:
    """A held payload of ``records`` (each ``protocol.batch.encode_record``'s bytes)."""
    if not 1 <= len(records) <= HELD_RECORDS_MAX:
        raise Declined(Reason.MALFORMED, f"held: {len(records)} records, not 1..16")
    if any(type(r) is not bytes or len(r) > HELD_RECORD_BYTES_MAX for r in records):
        raise Declined(Reason.MALFORMED, "held: a record is not bin or too large")
    data = pack(list(records))
    assert len(data) <= HELD_BYTES_MAX  # 16 records of at most 1,040 bytes, plus headers
    return data


def decode_held(data: bytes) -> list[bytes]:
    """The records of a held payload; raises Declined(MALFORMED) for anything but an array of
    1..16 bin of at most 1,040 bytes each, in at most 20,480 bytes. Each record is then
    checked on its own (a bad one is refused with its fault, the others still count)."""
    if type(data) is not bytes or len(data) > HELD_BYTES_MAX:
        raise Declined(Reason.MALFORMED, "held: larger than 20,480 bytes")
    obj = unpack_strict(
        data, bytes_max=HELD_BYTES_MAX, items_max=HELD_RECORDS_MAX, what="held payload"
    )
    if type(obj) is not list or not 1 <= len(obj) <= HELD_RECORDS_MAX:
        raise Declined(Reason.MALFORMED, "held: not an array of 1..16 records")
    if not all(type(r) is bytes and len(r) <= HELD_RECORD_BYTES_MAX for r in obj):
        raise Declined(Reason.MALFORMED, "held: a record is not bin of at most 1,040 bytes")
    return list(obj)


def _is_id_list(v: object) -> bool:
    return (
        type(v) in (list, tuple)
        and len(v) <= HELD_RECORDS_MAX  # type: ignore[arg-type]
        and all(type(x) is bytes and len(x) == limits.HASH_BYTES for x in v)  # type: ignore[attr-defined]
    )


def _is_fault(v: object) -> bool:
    return (
        type(v) in (list, tuple)
        and len(v) == 2  # type: ignore[arg-type]
        and type(v[0]) is bytes  # type: ignore[index]
        and len(v[0]) == limits.HASH_BYTES  # type: ignore[index]
        and is_id(v[1])  # type: ignore[index]
    )


def _is_fault_list(v: object) -> bool:
    return (
        type(v) in (list, tuple)
        and len(v) <= HELD_RECORDS_MAX  # type: ignore[arg-type]
        and all(_is_fault(x) for x in v)  # type: ignore[attr-defined]
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldAck(Message):
    """``hack``: the issuer's answer to one held payload."""

    TYPE: ClassVar[str] = HELD_TYPE
    SCHEMA: ClassVar[tuple[Field, ...]]
    ENVELOPE_BYTES_MAX: ClassVar[int] = HACK_ENVELOPE_BYTES_MAX
    device: bytes
    booked: tuple[bytes, ...]  # intent ids now booked (by this upload or before)
    # (intent id, fault) of records not booked; decoded pairs may be lists: use ``faults``
    refused: tuple[Sequence[bytes | str], ...]
    time_ms: int

    @property
    def faults(self) -> list[tuple[bytes, str]]:
        """``refused`` as (intent id, fault) tuples."""
        return [(bytes(x[0]), str(x[1])) for x in self.refused]  # type: ignore[arg-type]

    def validate(self) -> None:
        ids = [*self.booked, *(x[0] for x in self.refused)]
        if len(set(ids)) != len(ids):
            raise Declined(Reason.MALFORMED, "hack: an intent id is listed twice")


HeldAck.SCHEMA = (
    Field("d", "device", KEY),
    Field("i", "booked", _is_id_list),
    Field("x", "refused", _is_fault_list),
    Field("t", "time_ms", UINT),
)
