"""The fast body decoder, envelope splitter and opener and record decoder give exactly the
verdicts of the reference (tests/protocol/reference.py, the code before the fast paths):
same result, or the same reason with the same detail. Over the golden and refused-payload
vectors, the hypothesis strategies of every type, random msgpack values, mutated bodies,
envelopes and records, and hand-built maps with duplicate keys at the top level and nested,
in fixmap, map 16 and map 32 headers."""

import json
from functools import cache
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import limits, signing
from protocol.batch import decode_record, encode_record
from protocol.codec import pack
from protocol.errors import Declined
from protocol.leasing import LeaseReport, LeaseRequest
from protocol.messages import MESSAGE_TYPES, Message, decode_body, encode_body
from protocol.vectors import raw_map
from tests.protocol import reference
from tests.protocol import strategies as sts
from tests.protocol.common import PROPERTY, VECTORS
from tests.protocol.test_messages import golden_body, msgpack_values

CLASSES: list[type[Message]] = [*MESSAGE_TYPES.values(), LeaseRequest, LeaseReport]


def verdict(fn: Any, *args: Any, **kwargs: Any) -> tuple[object, ...]:
    try:
        out = fn(*args, **kwargs)
    except Declined as e:
        return ("declined", e.reason, e.detail)
    return ("ok", out)


def same_body_verdicts(body: bytes, classes: list[type[Message]] = CLASSES) -> None:
    for cls in classes:
        want = verdict(reference.decode_body, cls, body)
        assert verdict(decode_body, cls, body) == want, (cls.TYPE, body.hex())


def same_envelope_verdicts(raw: bytes, signer: bytes | None = None) -> None:
    for bytes_max in (limits.INTENT_ENVELOPE_BYTES_MAX, limits.IDENTITY_ENVELOPE_BYTES_MAX, 64):
        want = verdict(reference.split_envelope, raw, bytes_max=bytes_max)
        assert verdict(signing.split_envelope, raw, bytes_max=bytes_max) == want
    for cls in CLASSES:
        want = verdict(reference.open_envelope, raw, cls, signer=signer)
        assert verdict(signing.open_envelope, raw, cls, signer=signer) == want, cls.TYPE
        if want[0] == "ok":
            s = want[1]
            got = signing.open_message(raw, cls, signer=signer)
            assert got == (s.msg, s.id, s.signer)  # type: ignore[attr-defined]
        else:
            assert verdict(signing.open_message, raw, cls, signer=signer) == want


@cache
def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    return data


def golden_payloads() -> list[Any]:
    g = golden()
    out = [pytest.param(bytes.fromhex(e["envelope"]), id=e["name"]) for e in g["envelopes"]]
    out += [pytest.param(bytes.fromhex(m["payload"]), id=m["name"]) for m in g["malformed"]]
    return out


@pytest.mark.parametrize("raw", golden_payloads())
def test_vectors_same_verdicts(raw: bytes) -> None:
    same_envelope_verdicts(raw)
    try:
        obj = msgpack.unpackb(raw, strict_map_key=False)
    except Exception:
        return
    if type(obj) is list:
        for item in obj:
            if type(item) is bytes:
                same_body_verdicts(item)


def test_refused_vectors_are_all_covered() -> None:
    """Every refused payload of the vectors is refused by both paths, with its reason."""
    for m in golden()["malformed"]:
        cls = MESSAGE_TYPES[m["topic_type"]]
        raw = bytes.fromhex(m["payload"])
        for fn in (reference.open_envelope, signing.open_envelope):
            v = verdict(fn, raw, cls)
            assert v[0] == "declined" and v[1] == m["reason"], m["name"]


@pytest.mark.parametrize("msg_type", sorted(sts.BODIES))
@PROPERTY
@given(data=st.data())
def test_valid_bodies_same_message(msg_type: str, data: st.DataObject) -> None:
    msg = data.draw(sts.BODIES[msg_type])
    body = encode_body(msg)
    assert verdict(decode_body, type(msg), body) == ("ok", msg)
    same_body_verdicts(body)


@pytest.mark.parametrize("msg_type", sorted(sts.SEALABLE))
@PROPERTY
@given(data=st.data())
def test_sealed_envelopes_same_verdicts(msg_type: str, data: st.DataObject) -> None:
    key = data.draw(sts.signing_keys())
    if msg_type == "intent":
        msg: Message = data.draw(sts.intents(device=bytes(key.verify_key)))
    else:
        msg = data.draw(sts.SEALABLE[msg_type])
    raw = signing.seal(msg, key)
    same_envelope_verdicts(raw)
    same_envelope_verdicts(raw, signer=bytes(key.verify_key))
    same_envelope_verdicts(raw, signer=bytes(32))


@PROPERTY
@given(value=msgpack_values)
def test_random_values_same_verdicts(value: object) -> None:
    same_body_verdicts(pack(value))


@PROPERTY
@given(data=st.data())
def test_golden_bodies_with_random_values_same_verdicts(data: st.DataObject) -> None:
    """A valid body with one key set to a random value (nested maps and arrays included)."""
    msg_type = data.draw(st.sampled_from(sorted(MESSAGE_TYPES)))
    body = golden_body(msg_type)
    key = data.draw(st.sampled_from([*body, "zz", "m", "pay", "r", "n", "l"]))
    same_body_verdicts(pack(body | {key: data.draw(msgpack_values)}))


@PROPERTY
@given(data=st.data())
def test_mutated_bodies_same_verdicts(data: st.DataObject) -> None:
    msg_type = data.draw(st.sampled_from(sorted(MESSAGE_TYPES)))
    raw = bytearray(pack(golden_body(msg_type)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            raw.insert(i, data.draw(st.integers(0, 255)))
        else:
            del raw[i]
    same_body_verdicts(bytes(raw))


def map32(pairs: list[tuple[object, object]]) -> bytes:
    return b"\xdf" + len(pairs).to_bytes(4, "big") + raw_map(pairs)[1:]


def map16(pairs: list[tuple[object, object]]) -> bytes:
    return b"\xde" + len(pairs).to_bytes(2, "big") + raw_map(pairs)[1:]


@pytest.mark.parametrize("msg_type", sorted(MESSAGE_TYPES))
def test_duplicate_keys_same_verdicts(msg_type: str) -> None:
    """Duplicates at the top level (any header width, same or other value) and inside a
    nested map (which the fast path does not look into: refused all the same)."""
    pairs = list(golden_body(msg_type).items())
    nested_dup = raw_map([("a", 1), ("a", 2)])
    for encode in (raw_map, map16, map32):
        assert (
            encode is raw_map
            or verdict(decode_body, MESSAGE_TYPES[msg_type], encode(pairs))[0] == "ok"
        )
        same_body_verdicts(encode(pairs))
        for key, value in pairs:
            for extra in ((key, value), (key, 0), ("zz", 1)):
                same_body_verdicts(encode([*pairs, extra]))
                same_body_verdicts(encode([extra, *pairs]))
            dup_inside = raw_map([(k, v) for k, v in pairs if k != key])[1:]
            head = bytes([0x80 | len(pairs)])
            body = head + pack(key) + nested_dup + dup_inside
            same_body_verdicts(body)
            assert verdict(decode_body, MESSAGE_TYPES[msg_type], body)[0] == "declined"
        # a nested map with a duplicate inside an array, under a known key and an unknown one
        for key in (pairs[0][0], "zz"):
            rest = raw_map([(k, v) for k, v in pairs if k != key])[1:]
            n = len(pairs) if key != "zz" else len(pairs) + 1
            body = bytes([0x80 | n]) + pack(key) + b"\x91" + nested_dup + rest
            same_body_verdicts(body)


def mutate(data: st.DataObject, raw: bytes) -> bytes:
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, max(0, len(out) - 1)))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip" and out:
            out[i] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            out.insert(i, data.draw(st.integers(0, 255)))
        elif out:
            del out[i]
    return bytes(out)


@PROPERTY
@given(data=st.data())
def test_mutated_envelopes_same_verdicts(data: st.DataObject) -> None:
    g = golden()
    raw = bytes.fromhex(data.draw(st.sampled_from([e["envelope"] for e in g["envelopes"]])))
    same_envelope_verdicts(mutate(data, raw))


@PROPERTY
@given(
    data=st.data(),
    intent=st.binary(max_size=600),
    receipt=st.binary(max_size=600),
)
def test_records_same_verdicts(data: st.DataObject, intent: bytes, receipt: bytes) -> None:
    """Records of any envelope sizes (bin 8 and bin 16, over the 512-byte limit), mutated,
    in other encodings (array 16, bin 16 for short envelopes), and random bytes."""
    records = [
        encode_record(intent, receipt),
        mutate(data, encode_record(intent, receipt)),
        b"\xdc\x00\x02" + encode_record(intent, receipt)[1:],
        b"\x92" + b"".join(b"\xc5" + len(x).to_bytes(2, "big") + x for x in (intent, receipt)),
        encode_record(intent, receipt) + b"\x00",
        intent,
    ]
    for record in records:
        assert verdict(decode_record, record) == verdict(reference.decode_record, record)


def test_envelope_encodings_same_verdicts() -> None:
    """A golden envelope rewritten with other widths: str 8 type, bin 16 body and keys,
    array 16; a type of 17 bytes; invalid UTF-8 in the type."""
    raw = bytes.fromhex(golden()["envelopes"][0]["envelope"])
    t, body, signer, sig = msgpack.unpackb(raw)

    def env(head: bytes, tstr: bytes, *bins: bytes) -> bytes:
        return head + tstr + b"".join(bins)

    def b8(x: bytes) -> bytes:
        return b"\xc4" + bytes([len(x)]) + x

    def b16(x: bytes) -> bytes:
        return b"\xc5" + len(x).to_bytes(2, "big") + x

    fix = bytes([0xA0 | len(t)]) + t.encode()
    for raw2 in (
        env(b"\x94", fix, b8(body), b8(signer), b8(sig)),
        env(b"\x94", b"\xd9" + bytes([len(t)]) + t.encode(), b8(body), b8(signer), b8(sig)),
        env(b"\x94", fix, b16(body), b8(signer), b8(sig)),
        env(b"\x94", fix, b8(body), b16(signer), b16(sig)),
        env(b"\xdc\x00\x04", fix, b8(body), b8(signer), b8(sig)),
        env(b"\x94", b"\xb1" + b"a" * 17, b8(body), b8(signer), b8(sig)),
        env(b"\x94", b"\xa2\xc3\x28", b8(body), b8(signer), b8(sig)),
        env(b"\x94", b"\xa0", b8(body), b8(signer), b8(sig)),
        env(b"\x94", fix, b8(body), b8(signer), b8(sig[:63])),
        env(b"\x94", fix, b8(body), b8(signer), b8(sig)) + b"\xc0",
    ):
        same_envelope_verdicts(raw2)
