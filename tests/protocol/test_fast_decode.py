"""The fast body decoder and envelope opener give exactly the verdicts of the reference
(tests/protocol/reference.py, the code before the fast paths): same message, or the same
reason with the same detail. Over the golden and refused-payload vectors, the hypothesis
strategies of every type, random msgpack values, mutated bodies, and hand-built maps with
duplicate keys at the top level and nested, in fixmap, map 16 and map 32 headers."""

import json
from functools import cache
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import signing
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
