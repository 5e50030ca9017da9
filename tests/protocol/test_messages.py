"""Messages and envelopes: round trips for every type, every truncated prefix refused, random
and mutated bytes never raising anything but the protocol's own error, and each type's field
rules (missing, unknown, wrong-typed and out-of-range values) refused as malformed."""

import json
from functools import cache
from typing import Any

import msgpack
import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import limits
from protocol.codec import pack
from protocol.errors import Declined, FogpayError
from protocol.messages import (
    MESSAGE_TYPES,
    ZERO_KEY,
    Binding,
    Intent,
    Message,
    Receipt,
    decode_body,
    encode_body,
)
from protocol.reasons import Reason
from protocol.signing import message_id, open_envelope, seal, seal_signed
from protocol.vectors import raw_map
from tests.protocol import strategies as sts
from tests.protocol.common import FEW, PROPERTY, VECTORS

TYPES = sorted(MESSAGE_TYPES)
KEY = nacl.signing.SigningKey(bytes(range(32)))


@cache
def golden_envelopes() -> dict[str, bytes]:
    data = json.loads(VECTORS.read_text())
    return {e["name"]: bytes.fromhex(e["envelope"]) for e in data["envelopes"]}


def golden_body(msg_type: str) -> dict[str, Any]:
    """The decoded body map of the first golden envelope of ``msg_type``."""
    for raw in golden_envelopes().values():
        t, body, _, _ = msgpack.unpackb(raw)
        if t == msg_type:
            out: dict[str, Any] = msgpack.unpackb(body)
            return out
    raise AssertionError(msg_type)


def malformed(body: bytes, cls: type[Message]) -> Declined:
    with pytest.raises(Declined) as e:
        decode_body(cls, body)
    assert e.value.reason is Reason.MALFORMED
    return e.value


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("msg_type", TYPES)
@PROPERTY
@given(data=st.data())
def test_envelope_round_trip(msg_type: str, data: st.DataObject) -> None:
    key = data.draw(sts.signing_keys())
    if msg_type == "intent":
        msg: Message = data.draw(sts.intents(device=bytes(key.verify_key)))
    else:
        msg = data.draw(sts.SEALABLE[msg_type])
    signed = seal_signed(msg, key)
    opened = open_envelope(signed.raw, type(msg), signer=bytes(key.verify_key))
    assert opened.msg == msg
    assert opened.body == signed.body == encode_body(msg)
    assert opened.id == signed.id == message_id(msg_type, signed.body)
    assert len(signed.raw) <= msg.ENVELOPE_BYTES_MAX


@pytest.mark.parametrize("msg_type", TYPES)
@PROPERTY
@given(data=st.data())
def test_body_round_trip_full_ranges(msg_type: str, data: st.DataObject) -> None:
    msg = data.draw(sts.BODIES[msg_type])
    assert decode_body(type(msg), encode_body(msg)) == msg


@FEW
@given(msg=sts.bindings())
def test_binding_too_large_for_its_envelope_is_never_sealed(msg: Binding) -> None:
    """seal refuses what a receiver would refuse (the 1,024-byte limit)."""
    body = encode_body(msg)
    if len(body) + 2 + 4 + 2 + 34 + 66 > limits.IDENTITY_ENVELOPE_BYTES_MAX + 8:
        with pytest.raises(Declined):
            seal(msg, KEY)
    else:
        raw = seal(msg, KEY)
        assert len(raw) <= limits.IDENTITY_ENVELOPE_BYTES_MAX
        assert open_envelope(raw, Binding).msg == msg


# ---------------------------------------------------------------- hostile bytes


@pytest.mark.parametrize("name", sorted(golden_envelopes()))
def test_every_truncated_prefix_is_refused(name: str) -> None:
    raw = golden_envelopes()[name]
    cls = MESSAGE_TYPES[msgpack.unpackb(raw)[0]]
    for n in range(len(raw)):
        with pytest.raises(Declined) as e:
            open_envelope(raw[:n], cls)
        assert e.value.reason is Reason.MALFORMED, n


@pytest.mark.parametrize("msg_type", TYPES)
@PROPERTY
@given(data=st.binary(max_size=1100))
def test_random_bytes_raise_only_declined(msg_type: str, data: bytes) -> None:
    try:
        open_envelope(data, MESSAGE_TYPES[msg_type])
    except Declined as e:
        assert e.reason in (Reason.MALFORMED, Reason.BAD_SIGNATURE)


@PROPERTY
@given(data=st.data())
def test_mutated_envelopes_raise_only_declined(data: st.DataObject) -> None:
    """Flip, insert or delete bytes of a valid envelope: refused with a reason, never a crash
    (or, rarely, a mutation that leaves an equivalent valid envelope is accepted)."""
    name = data.draw(st.sampled_from(sorted(golden_envelopes())))
    raw = bytearray(golden_envelopes()[name])
    cls = MESSAGE_TYPES[msgpack.unpackb(bytes(raw))[0]]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            raw.insert(i, data.draw(st.integers(0, 255)))
        else:
            del raw[i]
    try:
        opened = open_envelope(bytes(raw), cls)
    except Declined as e:
        assert e.reason in (Reason.MALFORMED, Reason.BAD_SIGNATURE)
    else:
        assert opened.raw == bytes(raw)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=70),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner, max_size=9)
    ),
    max_leaves=20,
)


@pytest.mark.parametrize("msg_type", TYPES)
@PROPERTY
@given(value=msgpack_values)
def test_random_bodies_raise_only_malformed(msg_type: str, value: object) -> None:
    cls = MESSAGE_TYPES[msg_type]
    try:
        decode_body(cls, pack(value))
    except Declined as e:
        assert e.reason is Reason.MALFORMED
    # a random map can only be accepted if it really is a valid body
    else:
        assert isinstance(value, dict) and set(value) <= {f.key for f in cls.SCHEMA}


# ---------------------------------------------------------------- field rules, every type


@pytest.mark.parametrize("msg_type", TYPES)
def test_golden_body_decodes(msg_type: str) -> None:
    assert isinstance(decode_body(MESSAGE_TYPES[msg_type], pack(golden_body(msg_type))), Message)


@pytest.mark.parametrize("msg_type", TYPES)
def test_each_missing_required_key_is_refused(msg_type: str) -> None:
    cls = MESSAGE_TYPES[msg_type]
    body = golden_body(msg_type)
    for f in cls.SCHEMA:
        if f.key in body and not f.optional:
            e = malformed(pack({k: v for k, v in body.items() if k != f.key}), cls)
            assert "missing" in e.detail


@pytest.mark.parametrize("msg_type", TYPES)
def test_unknown_and_duplicate_keys_are_refused(msg_type: str) -> None:
    cls = MESSAGE_TYPES[msg_type]
    body = golden_body(msg_type)
    malformed(pack(body | {"zz": 1}), cls)
    for key in body:
        malformed(raw_map([*body.items(), (key, body[key])]), cls)


WRONG_VALUES: list[object] = [
    None,
    True,
    1.5,
    -1,
    "x" * 70,
    b"\x00" * 70,
    b"\x00" * 113,
    [],
    {},
    [1],
]
SEALED_MEMO_IN_RANGE: bytes = b"\x00" * 70  # a sealed memo (sm) is 48..112 bytes


@pytest.mark.parametrize("msg_type", TYPES)
def test_wrong_types_and_ranges_are_refused(msg_type: str) -> None:
    """Each field, set to a value of another msgpack type or out of its range, is refused."""
    cls = MESSAGE_TYPES[msg_type]
    body = golden_body(msg_type)
    for f in cls.SCHEMA:
        for bad in WRONG_VALUES:
            if not (f.key == "sm" and bad == SEALED_MEMO_IN_RANGE):
                malformed(pack(body | {f.key: bad}), cls)


def test_uint64_max_is_a_valid_time() -> None:
    body = golden_body("intent")
    assert decode_body(Intent, pack(body | {"t": limits.UINT64_MAX})).time_ms == limits.UINT64_MAX


def test_amount_bounds() -> None:
    body = golden_body("intent")
    for a in (1, 2**53):
        assert decode_body(Intent, pack(body | {"a": a})).amount_micros == a
    for a in (0, 2**53 + 1, -5):
        malformed(pack(body | {"a": a}), Intent)


def test_id_pattern_and_reserved_fog_ids() -> None:
    body = golden_body("intent")
    for good in ("a", "0", "a" * 63, "fog-1.b_c", "9z"):
        assert decode_body(Intent, pack(body | {"f": good, "p": good})).fog_id == good
    for bad in ("", "a" * 64, "-a", ".a", "_a", "A", "a/b", "a+", "a#", "é", "a b", "a\x00"):
        malformed(pack(body | {"p": bad}), Intent)
        malformed(pack(body | {"f": bad}), Intent)
    for reserved in ("trust", "up", "gossip", "held"):
        malformed(pack(body | {"f": reserved}), Intent)
        assert decode_body(Intent, pack(body | {"p": reserved})).payee_id == reserved


def test_pay_list_rules() -> None:
    body = golden_body("bind")
    ok = [f"p{i}" for i in range(32)]
    assert decode_body(Binding, pack(body | {"pay": ok})).payees == tuple(ok)
    for bad in ([], [*ok, "p32"], ["a", "a"], ["A"], "a", [1]):
        malformed(pack(body | {"pay": bad}), Binding)


def test_validity_window() -> None:
    body = golden_body("owner")
    cls = MESSAGE_TYPES["owner"]
    malformed(pack(body | {"na": body["nb"]}), cls)
    malformed(pack(body | {"na": body["nb"] - 1}), cls)
    assert decode_body(cls, pack(body | {"na": body["nb"] + 1}))


def test_revoke_reason_is_at_most_64_bytes() -> None:
    body = golden_body("revoke")
    cls = MESSAGE_TYPES["revoke"]
    assert decode_body(cls, pack(body | {"r": "é" * 32}))
    malformed(pack(body | {"r": "é" * 32 + "x"}), cls)


def test_batch_header_rules() -> None:
    body = golden_body("batch")
    cls = MESSAGE_TYPES["batch"]
    assert decode_body(cls, pack(body | {"n": limits.BATCH_RECORDS_MAX}))
    malformed(pack(body | {"n": limits.BATCH_RECORDS_MAX + 1}), cls)
    malformed(pack(body | {"n": 0}), cls)
    malformed(pack(body | {"b": 0}), cls)
    malformed(pack(body | {"h": b"\x01" * 32}), cls)  # batch 1 needs h = zeros
    assert decode_body(cls, pack(body | {"b": 2, "h": b"\x01" * 32}))


RECEIPT_BASE: dict[str, object] = {"i": b"\x07" * 32, "d": b"\x05" * 32, "q": 3, "t": 9}


@pytest.mark.parametrize(
    "fields",
    [
        {"s": "ok", "n": 1, "l": b"\x00" * 16},
        {"s": "declined", "r": "insufficient_budget"},
        {"s": "declined", "r": "bad_signature"},
        {"s": "declined", "r": "malformed", "d": ZERO_KEY, "q": 0},
    ],
)
def test_receipt_consistent_fields_decode(fields: dict[str, object]) -> None:
    r = decode_body(Receipt, pack(RECEIPT_BASE | fields))
    assert r.ok == (fields["s"] == "ok")


@pytest.mark.parametrize(
    "fields",
    [
        {"s": "ok", "n": 1},  # no l
        {"s": "ok", "l": b"\x00" * 16},  # no n
        {"s": "ok", "n": 0, "l": b"\x00" * 16},  # n from 1
        {"s": "ok", "n": 1, "l": b"\x00" * 16, "r": "stale"},  # ok with r
        {"s": "declined"},  # no r
        {"s": "declined", "r": "stale", "n": 1},  # declined with n
        {"s": "declined", "r": "stale", "l": b"\x00" * 16},  # declined with l
        {"s": "declined", "r": "malformed"},  # malformed with a d and q
        {"s": "declined", "r": "malformed", "d": ZERO_KEY},  # malformed with q
        {"s": "declined", "r": "stale", "q": 0},  # q = 0 only for malformed
        {"s": "ok", "n": 1, "l": b"\x00" * 16, "q": 0},
        {"s": "maybe", "r": "stale"},
        {"s": "declined", "r": "Stale"},
    ],
)
def test_receipt_inconsistent_fields_are_refused(fields: dict[str, object]) -> None:
    malformed(pack(RECEIPT_BASE | fields), Receipt)


def test_encode_refuses_what_decode_would_refuse() -> None:
    """We never sign what we would refuse: invalid values fail before signing."""
    good = open_envelope(golden_envelopes()["intent"], Intent).msg
    for bad in (
        {"amount_micros": 0},
        {"currency": "eur"},
        {"fog_id": "up"},
        {"memo": b"x" * 65},
        {"seq": 0},
        {"device": b"\x01" * 31},
    ):
        fields = {f.attr: getattr(good, f.attr) for f in Intent.SCHEMA} | bad
        with pytest.raises(Declined) as e:
            seal(Intent(**fields), KEY)
        assert e.value.reason is Reason.MALFORMED
    with pytest.raises(Declined):
        seal(Receipt(intent_id=bytes(32), device=bytes(32), seq=1, status="ok", time_ms=1), KEY)


def test_every_error_is_a_fogpay_error() -> None:
    assert issubclass(Declined, FogpayError)
    e = Declined(Reason.STALE, "q 3 <= 5")
    assert e.reason is Reason.STALE and str(e) == "stale q 3 <= 5"
