"""Batches on the wire: records and the [header, [records]] array, strictly decoded."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import limits
from protocol.batch import decode_batch, decode_record, encode_batch, encode_record
from protocol.codec import pack
from protocol.errors import Declined
from protocol.reasons import Reason
from tests.protocol.common import FEW

envelopes = st.binary(min_size=1, max_size=limits.INTENT_ENVELOPE_BYTES_MAX)


@FEW
@given(intent=envelopes, receipt=envelopes)
def test_record_round_trip(intent: bytes, receipt: bytes) -> None:
    record = encode_record(intent, receipt)
    assert record == pack([intent, receipt])
    assert decode_record(record) == (intent, receipt)


@FEW
@given(header=st.binary(max_size=1024), records=st.lists(st.binary(max_size=64), min_size=1))
def test_batch_round_trip(header: bytes, records: list[bytes]) -> None:
    assert decode_batch(encode_batch(header, records)) == (header, records)


def refused(data: bytes, decode: object = decode_batch) -> None:
    with pytest.raises(Declined) as e:
        decode(data)  # type: ignore[operator]
    assert e.value.reason is Reason.MALFORMED


@pytest.mark.parametrize(
    "obj",
    [
        [b"h"],
        [b"h", [b"r"], b"x"],
        ["h", [b"r"]],
        [b"h", b"r"],
        [b"h", []],
        [b"h", [b"r", "s"]],
        {"h": [b"r"]},
    ],
)
def test_bad_batches_are_refused(obj: object) -> None:
    refused(pack(obj))


def test_batch_limits() -> None:
    full = [b""] * limits.BATCH_RECORDS_MAX
    assert len(decode_batch(encode_batch(b"h", full))[1]) == limits.BATCH_RECORDS_MAX
    refused(pack([b"h", [*full, b""]]))
    refused(pack([b"h", [b"x" * limits.BATCH_WIRE_BYTES_MAX]]))
    refused(encode_batch(b"h", [b"r"]) + b"\x00")


def test_bad_records_are_refused() -> None:
    for obj in ([b"i"], [b"i", b"r", b"x"], [b"i", "r"], b"ir"):
        refused(pack(obj), decode_record)
    refused(pack([b"i", b"x" * 2 * limits.INTENT_ENVELOPE_BYTES_MAX]), decode_record)


@FEW
@given(data=st.binary(max_size=2048))
def test_random_bytes_raise_only_declined(data: bytes) -> None:
    for decode in (decode_batch, decode_record):
        try:
            decode(data)
        except Declined as e:
            assert e.reason is Reason.MALFORMED
