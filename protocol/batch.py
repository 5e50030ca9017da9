"""Batches on the wire (spec section 7): ``[header envelope: bin, [record: bin, ...]]``.

A record is the msgpack array ``[intent envelope: bin, receipt envelope: bin]``; the Merkle
leaf data is the record's bytes. Records are not compressed in protocol v1 of this project
(docs/protocol.md): a batch is exactly this two-element array.
"""

from collections.abc import Sequence

from protocol import limits
from protocol.codec import pack, unpack_strict
from protocol.errors import Declined
from protocol.reasons import Reason


def encode_record(intent_envelope: bytes, receipt_envelope: bytes) -> bytes:
    return pack([intent_envelope, receipt_envelope])


def decode_record(record: bytes) -> tuple[bytes, bytes]:
    # The usual encoding, [bin 8, bin 8] with nothing after, read directly (a third of the
    # time): exactly what the strict decoder returns for these bytes (two envelopes of at
    # most 255 bytes each). Anything else goes the strict way.
    if type(record) is bytes and len(record) > 4 and record[0] == 0x92 and record[1] == 0xC4:
        end = 3 + record[2]
        if (
            end + 2 <= len(record)
            and record[end] == 0xC4
            and end + 2 + record[end + 1] == len(record)
        ):
            return record[3:end], record[end + 2 :]
    obj = unpack_strict(
        record, bytes_max=2 * limits.INTENT_ENVELOPE_BYTES_MAX + 16, items_max=2, what="record"
    )
    if type(obj) is not list or len(obj) != 2 or not all(type(x) is bytes for x in obj):
        raise Declined(Reason.MALFORMED, "record: not [bin, bin]")
    if any(len(x) > limits.INTENT_ENVELOPE_BYTES_MAX for x in obj):
        raise Declined(Reason.MALFORMED, "record: an envelope exceeds 512 bytes")
    return obj[0], obj[1]


def encode_batch(header_envelope: bytes, records: Sequence[bytes]) -> bytes:
    assert 1 <= len(records) <= limits.BATCH_RECORDS_MAX
    data = pack([header_envelope, list(records)])
    assert len(data) <= limits.BATCH_WIRE_BYTES_MAX
    return data


def decode_batch(data: bytes) -> tuple[bytes, list[bytes]]:
    """Split a batch into its header envelope and its records; raises Declined(MALFORMED)."""
    obj = unpack_strict(
        data,
        bytes_max=limits.BATCH_WIRE_BYTES_MAX,
        items_max=limits.BATCH_RECORDS_MAX,
        what="batch",
    )
    if type(obj) is not list or len(obj) != 2:
        raise Declined(Reason.MALFORMED, "batch: not a 2-element array")
    header, records = obj
    if type(header) is not bytes or type(records) is not list:
        raise Declined(Reason.MALFORMED, "batch: not [bin, array]")
    if not 1 <= len(records) <= limits.BATCH_RECORDS_MAX:
        raise Declined(Reason.MALFORMED, f"batch: {len(records)} records")
    if not all(type(r) is bytes for r in records):
        raise Declined(Reason.MALFORMED, "batch: a record is not bin")
    return header, records
