"""check_batch's fast path (``check_records``) judges every record as ``check_record`` does.

``check_records`` splits the usual encoding in place and verifies a batch's signatures in one
loop; any record it does not take whole goes to ``check_record``. These tests hold it to the
reference: the same ``CheckedBatch`` (the same faults, draws and bytes) as
``CheckedBatch.of(header, [check_record(...) for each record])``, for good records, for each
kind of fault, for other encodings of the same messages and for arbitrary corruptions.
"""

import msgpack
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.verify import (  # the bodies' fast path
    FAST_BODIES,
    CheckedBatch,
    CheckedHeader,
    Fault,
    _intent_fields,
    _receipt_fields,
    check_batch,
    check_header,
    check_record,
    check_records,
    intent_decoded,
    receipt_decoded,
)
from protocol.batch import decode_batch, decode_record, encode_record
from protocol.messages import Intent, Receipt
from protocol.signing import public_key, seal, seal_signed, split_envelope
from tests.cloud.world import T0, FogLog, new_key

LEASE = bytes(range(16))
FOG = FogLog("fog-a", nacl.signing.SigningKey(bytes(32 * [7])))
DEVICES = [nacl.signing.SigningKey(bytes(32 * [k])) for k in (1, 2, 3)]


def good_batch(n: int = 6) -> tuple[CheckedHeader, list[bytes]]:
    fog = FogLog("fog-a", FOG.key)
    records = [
        fog.authorize(DEVICES[k % 3], seq=k + 1, lease_id=LEASE, amount=100 + k) for k in range(n)
    ]
    header_env, records = decode_batch(fog.cut(records))
    return check_header(header_env), records


HEADER, RECORDS = good_batch()


def reference(header: CheckedHeader, records: list[bytes]) -> CheckedBatch:
    verdicts = [check_record(header, p, r) for p, r in enumerate(records)]
    return CheckedBatch.of(header, verdicts, tuple(records))


def same_as_reference(records: list[bytes]) -> CheckedBatch:
    got = check_records(HEADER, records)
    assert got == reference(HEADER, records)
    return got


def receipt(position: int, **changes: object) -> bytes:
    """The receipt envelope of ``RECORDS[position]`` re-signed with ``changes``."""
    _, receipt_env = decode_record(RECORDS[position])
    fields = dict(
        intent_id=b"",
        device=b"",
        seq=0,
        status="ok",
        log_index=HEADER.first_index + position,
        lease_id=LEASE,
        time_ms=T0,
    )
    body = msgpack.unpackb(split_envelope(receipt_env, bytes_max=512).body)
    fields.update(intent_id=body["i"], device=body["d"], seq=body["q"])
    key = changes.pop("key", FOG.key)
    fields.update(changes)
    return seal(Receipt(**fields), key)  # type: ignore[arg-type]


def intent_of(position: int) -> bytes:
    return decode_record(RECORDS[position])[0]


def test_good_records_all_draws_no_fault() -> None:
    got = same_as_reference(RECORDS)
    assert got.faults == () and list(got.draws.positions) == list(range(len(RECORDS)))
    assert got.record_bytes == tuple(RECORDS)


def test_a_whole_batch_as_check_batch_returns_it() -> None:
    fog = FogLog("fog-a", FOG.key)
    records = [fog.authorize(DEVICES[0], seq=q, lease_id=LEASE) for q in (1, 2)]
    wire = fog.cut(records)
    header_env, recs = decode_batch(wire)
    assert check_batch(wire) == reference(check_header(header_env), recs)


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def other_intent(position: int, **changes: object) -> bytes:
    """A new intent by ``RECORDS[position]``'s device (so its receipt no longer matches)."""
    key = DEVICES[position % 3]
    fields: dict[str, object] = dict(
        device=public_key(key),
        fog_id="fog-a",
        seq=position + 1,
        payee_id="payee",
        amount_micros=100 + position,
        currency="EUR",
        time_ms=T0,
    )
    fields.update(changes)
    return seal_signed(Intent(**fields), key).raw  # type: ignore[arg-type]


def bin16_record(intent_env: bytes, receipt_env: bytes) -> bytes:
    """[bin 16, bin 16]: a valid record the fast path does not read."""
    return (
        b"\x92\xc5"
        + len(intent_env).to_bytes(2, "big")
        + intent_env
        + b"\xc5"
        + len(receipt_env).to_bytes(2, "big")
        + receipt_env
    )


CASES = {
    "bad_record": (lambda p: b"\x93" + RECORDS[p][1:], Fault.BAD_RECORD),
    "bad_intent_sig": (
        lambda p: encode_record(flip(intent_of(p), len(intent_of(p)) - 1), receipt(p)),
        Fault.BAD_INTENT,
    ),
    "intent_signer_not_d": (
        lambda p: encode_record(
            other_intent(p, device=public_key(DEVICES[(p + 1) % 3])), receipt(p)
        ),
        Fault.BAD_INTENT,
    ),
    "bad_receipt_sig": (
        lambda p: encode_record(intent_of(p), flip(receipt(p), len(receipt(p)) - 1)),
        Fault.BAD_RECEIPT,
    ),
    "receipt_signer": (
        lambda p: encode_record(intent_of(p), receipt(p, key=new_key())),
        Fault.RECEIPT_SIGNER,
    ),
    "receipt_mismatch": (
        lambda p: encode_record(other_intent(p, amount_micros=5), receipt(p)),
        Fault.RECEIPT_MISMATCH,
    ),
    "receipt_not_ok": (
        lambda p: encode_record(
            intent_of(p),
            receipt(p, status="declined", reason="expired", log_index=None, lease_id=None),
        ),
        Fault.RECEIPT_NOT_OK,
    ),
    "log_index": (
        lambda p: encode_record(intent_of(p), receipt(p, log_index=HEADER.first_index + p + 1)),
        Fault.LOG_INDEX,
    ),
    "bin16_encoding": (lambda p: bin16_record(*decode_record(RECORDS[p])), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("position", [0, 3])
def test_each_fault_as_check_record_judges_it(case: str, position: int) -> None:
    make, fault = CASES[case]
    records = list(RECORDS)
    records[position] = make(position)
    got = same_as_reference(records)
    verdict = got.records()[position]
    assert verdict.fault is fault
    assert len(got.draws) == len(RECORDS) - (fault is not None)


def test_wrong_fog_in_the_intent() -> None:
    # an intent naming another fog, with a receipt that matches it
    intent = seal_signed(
        Intent(
            device=public_key(DEVICES[1]),
            fog_id="fog-b",
            seq=2,
            payee_id="payee",
            amount_micros=101,
            currency="EUR",
            time_ms=T0,
        ),
        DEVICES[1],
    )
    records = list(RECORDS)
    records[1] = encode_record(intent.raw, receipt(1, intent_id=intent.id))
    got = same_as_reference(records)
    assert got.records()[1].fault is Fault.WRONG_FOG


def test_every_record_faulty() -> None:
    records = [b"\x93" + r[1:] for r in RECORDS]
    got = same_as_reference(records)
    assert len(got.draws) == 0 and len(got.faults) == len(RECORDS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_corruption_of_a_record_is_judged_as_check_record_does(data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(RECORDS) - 1))
    record = RECORDS[position]
    at = data.draw(st.integers(0, len(record) - 1))
    value = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([None, None, None, -1, 1]))
    changed = record[:at] + bytes([value]) + record[at + 1 :]
    if cut == -1:
        changed = changed[:-1]
    elif cut == 1:
        changed = changed + b"\x00"
    records = list(RECORDS)
    records[position] = changed
    same_as_reference(records)


# ---- the bodies' fast path ------------------------------------------------------------

INTENT_BODY = {
    "d": bytes(32 * [9]),
    "f": "fog-a",
    "q": 7,
    "p": "payee",
    "a": 1_000,
    "c": "EUR",
    "t": T0,
}
RECEIPT_BODY = {
    "i": bytes(32 * [5]),
    "d": bytes(32 * [9]),
    "q": 7,
    "s": "ok",
    "n": 12,
    "l": LEASE,
    "t": T0,
}
VALUE_LIST: list[object] = [
    bytes(31),
    bytes(32),
    bytes(33),
    bytes(16),
    bytes(64),
    "fog-a",
    "trust",
    "Fog-A",
    "",
    "a" * 64,
    "EUR",
    "eur",
    "EURO",
    "ok",
    "declined",
    "expired",
    "malformed",
    0,
    1,
    -1,
    2**53,
    2**53 + 1,
    2**64 - 1,
    True,
    False,
    None,
    1.5,
    [1],
    ["a"],
    {"x": 1},
]
VALUES = st.sampled_from(VALUE_LIST)
KEY_LIST = ["d", "f", "q", "p", "a", "c", "t", "m", "sm", "sr", "i", "s", "n", "l", "r", "x"]
KEYS = st.sampled_from(KEY_LIST)


# the references: decode_body, the thorough way (what the fast readers fall back to)
intent_reference = intent_decoded
receipt_reference = receipt_decoded


def test_the_fast_path_is_on_for_the_schemas_as_they_are() -> None:
    assert FAST_BODIES
    assert _intent_fields(msgpack.packb(INTENT_BODY)) == intent_reference(
        msgpack.packb(INTENT_BODY)
    )
    assert _receipt_fields(msgpack.packb(RECEIPT_BODY)) is not None


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_bodies_read_as_decode_body_reads_them(data: st.DataObject) -> None:
    for base, fast, ref in (
        (INTENT_BODY, _intent_fields, intent_reference),
        (RECEIPT_BODY, _receipt_fields, receipt_reference),
    ):
        m = dict(base)
        for _ in range(data.draw(st.integers(0, 2))):
            op = data.draw(st.sampled_from(["set", "drop"]))
            key = data.draw(KEYS)
            if op == "set":
                m[key] = data.draw(VALUES)
            else:
                m.pop(key, None)
        body = msgpack.packb(m)
        if data.draw(st.booleans()):  # a byte changed, one cut or one added
            at = data.draw(st.integers(0, len(body) - 1))
            body = body[:at] + bytes([data.draw(st.integers(0, 255))]) + body[at + 1 :]
            body = body[: data.draw(st.sampled_from([len(body), len(body) - 1]))]
            body += data.draw(st.sampled_from([b"", b"\x00"]))
        assert fast(body) == ref(body)


def test_a_duplicate_key_is_not_read_past() -> None:
    # fixmap of 7 whose last key repeats the first: msgpack keeps one, decode_body refuses
    body = msgpack.packb(INTENT_BODY)
    dup = b"\x87" + body[1:].replace(b"\xa1t", b"\xa1d", 1)
    assert intent_reference(dup) is None and _intent_fields(dup) is None


@pytest.mark.parametrize("key", KEY_LIST)
def test_each_field_set_to_each_value_or_dropped(key: str) -> None:
    for base, fast, ref in (
        (INTENT_BODY, _intent_fields, intent_reference),
        (RECEIPT_BODY, _receipt_fields, receipt_reference),
    ):
        dropped = {k: v for k, v in base.items() if k != key}
        assert fast(msgpack.packb(dropped)) == ref(msgpack.packb(dropped))
        for value in VALUE_LIST:
            body = msgpack.packb({**base, key: value})
            assert fast(body) == ref(body), (key, value)


def envelopes_cut(intent_env: bytes, receipt_env: bytes) -> bytes:
    """[bin 8, bin 8] of any two byte strings (each under 256 bytes)."""
    return (
        b"\x92\xc4"
        + bytes([len(intent_env)])
        + intent_env
        + b"\xc4"
        + bytes([len(receipt_env)])
        + receipt_env
    )


def test_envelopes_cut_short_anywhere_are_judged_not_read_past() -> None:
    intent_env, receipt_env = decode_record(RECORDS[0])
    long_intent = other_intent(0, payee_id="p" * 63)
    for j in range(len(receipt_env) + 1):
        for first in (intent_env, long_intent):
            same_as_reference([envelopes_cut(first, receipt_env[:j]), *RECORDS[1:]])
    for j in range(len(intent_env) + 1):
        same_as_reference([envelopes_cut(intent_env[:j], receipt_env), *RECORDS[1:]])


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 255), st.integers(0, 255))
def test_any_bytes_behind_the_usual_head_are_judged(tail: bytes, l1: int, l2: int) -> None:
    # the fast path's head (record, intent envelope, type, bin 8) then anything: lengths
    # that point past the end must send the record to check_record, never raise
    head = b"\x92\xc4" + bytes([l1]) + b"\x94\xa6intent\xc4" + bytes([l2])
    same_as_reference([head + tail, *RECORDS[1:]])
