"""The sealing extension (docs/protocol.md section 16): key conversion, sealed memos and
receipts, strict unwrapping, and protocol/vectors/sealed-v1.json current and true."""

import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import nacl.bindings
import nacl.public
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import limits, sealed, sealed_vectors
from protocol.codec import pack
from protocol.errors import Declined
from protocol.messages import Intent, Receipt, decode_body, encode_body
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal_signed
from protocol.vectors import T0_MS, dumps, key, pub

ROLES = sealed_vectors.KEY_ROLES


@cache
def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(sealed_vectors.DEFAULT_PATH.read_text())
    return data


def secret(role: str) -> nacl.public.PrivateKey:
    entry = next(k for k in golden()["keys"] if k["role"] == role)
    return nacl.public.PrivateKey(bytes.fromhex(entry["x25519_secret"]))


def refused(call: Any, *args: Any) -> Declined:
    with pytest.raises(Declined) as e:
        call(*args)
    assert e.value.reason is Reason.MALFORMED
    return e.value


def test_file_is_current_and_reproducible(tmp_path: Path) -> None:
    text = sealed_vectors.DEFAULT_PATH.read_text()
    assert text == dumps(sealed_vectors.build())
    out = tmp_path / "sealed.json"
    subprocess.run([sys.executable, "-m", "protocol.sealed_vectors", str(out)], check=True)
    assert out.read_text() == text


def test_key_conversion_vectors() -> None:
    for k in golden()["keys"]:
        signing = nacl.signing.SigningKey(bytes.fromhex(k["seed"]))
        assert public_key(signing).hex() == k["ed25519_public"]
        assert sealed.x25519_public(public_key(signing)).hex() == k["x25519_public"]
        assert bytes(sealed.x25519_private(signing)).hex() == k["x25519_secret"]
        # the converted secret's public key is the converted public key
        base = nacl.bindings.crypto_scalarmult_base(bytes.fromhex(k["x25519_secret"]))
        assert base.hex() == k["x25519_public"]


def test_every_box_opens_for_its_recipient_only() -> None:
    for box in golden()["boxes"]:
        data = bytes.fromhex(box["box"])
        assert len(data) == len(bytes.fromhex(box["plaintext"])) + sealed.SEAL_OVERHEAD_BYTES
        assert sealed.open_box(data, secret(box["recipient"])).hex() == box["plaintext"]
        for other in ROLES:
            if other != box["recipient"]:
                refused(sealed.open_box, data, secret(other))  # wrong key


def test_the_fixed_construction_is_libsodiums_sealed_box() -> None:
    """A box made our way with a fixed ephemeral key opens with crypto_box_seal_open."""
    box = sealed_vectors.seal_fixed("any", b"hello", sealed.x25519_public(pub("device")))
    opened = nacl.bindings.crypto_box_seal_open(
        box, sealed.x25519_public(pub("device")), bytes(secret("device"))
    )
    assert opened == b"hello"


def test_golden_intent_and_sealed_receipt() -> None:
    intent_v, receipt_v = golden()["envelopes"]
    intent = open_envelope(bytes.fromhex(intent_v["envelope"]), Intent, signer=pub("device"))
    assert intent.id.hex() == intent_v["id"]
    assert intent.msg.memo is None and intent.msg.seal_receipts == sealed.SCHEME
    assert intent.msg.sealed_memo is not None
    assert sealed.open_memo(intent.msg.sealed_memo, secret("device")) == sealed_vectors.MEMO
    refused(sealed.open_memo, intent.msg.sealed_memo, secret("fog"))
    payload = bytes.fromhex(receipt_v["receipt_payload"])
    assert sealed.is_sealed_payload(payload)
    envelope = sealed.open_receipt(payload, secret("device"))
    assert envelope.hex() == receipt_v["envelope"]
    receipt = open_envelope(envelope, Receipt, signer=pub("fog"))
    assert receipt.msg.intent_id == intent.id and receipt.msg.ok
    assert not sealed.is_sealed_payload(envelope)  # a plain envelope: array of 4


def device_opens(payload: bytes, opener: str) -> Receipt:
    """What a device does with a payload on its receipt topic (16.5): open, then verify."""
    envelope = sealed.open_receipt(payload, secret(opener))
    return open_envelope(envelope, Receipt, signer=pub("fog")).msg


def test_every_refused_vector_is_refused() -> None:
    reasons = {case["reason"] for case in golden()["refused"]}
    assert reasons == {"malformed", "bad_signature"}
    for case in golden()["refused"]:
        payload = bytes.fromhex(case["payload"])
        with pytest.raises(Declined) as e:
            if case["topic_type"] == "receipt_payload":
                device_opens(payload, case["opener"])
            else:
                open_envelope(payload, Intent)
        assert str(e.value.reason) == case["reason"], case["name"]


def test_sealed_receipts_are_padded_to_one_size() -> None:
    """ok and every decline of a realistic size seal to the same length (16.4)."""
    sizes = set()
    base: dict[str, Any] = {"intent_id": bytes(32), "device": pub("device"), "seq": 1}
    receipts = [
        Receipt(**base, status="ok", log_index=n, lease_id=bytes(16), time_ms=T0_MS)
        for n in (1, 2**40)
    ]
    receipts += [
        Receipt(**base, status="declined", reason=r, time_ms=T0_MS)
        for r in Reason
        if r is not Reason.MALFORMED
    ]
    for r in receipts:
        envelope = seal_signed(r, key("fog")).raw
        payload = sealed.seal_receipt(envelope, pub("device"))
        assert sealed.open_receipt(payload, secret("device")) == envelope
        sizes.add(len(payload))
    assert sizes == {3 + 256 + sealed.SEAL_OVERHEAD_BYTES}


def test_every_truncated_prefix_and_bit_flip_of_a_sealed_receipt_is_refused() -> None:
    payload = bytes.fromhex(golden()["envelopes"][1]["receipt_payload"])
    device = secret("device")
    for n in range(len(payload)):
        refused(sealed.open_receipt, payload[:n], device)
    for i in range(len(payload)):
        for bit in range(8):
            flipped = payload[:i] + bytes([payload[i] ^ (1 << bit)]) + payload[i + 1 :]
            refused(sealed.open_receipt, flipped, device)


def test_wrapping_accepts_any_bin_width_and_nothing_else() -> None:
    box = sealed.seal(b"x" * 100, sealed.x25519_public(pub("device")))
    for header in (b"\xc4" + bytes([len(box)]), b"\xc5" + len(box).to_bytes(2, "big")):
        assert sealed.unwrap_receipt(header + box) == box
    assert sealed.unwrap_receipt(b"\xc6" + len(box).to_bytes(4, "big") + box) == box
    refused(sealed.unwrap_receipt, b"")
    refused(sealed.unwrap_receipt, b"\xc4")
    refused(sealed.unwrap_receipt, b"\xc5\x00")
    refused(sealed.unwrap_receipt, b"\xa3abc")
    big = b"\xc5" + (sealed.SEALED_RECEIPT_BYTES_MAX).to_bytes(2, "big")
    refused(sealed.unwrap_receipt, big + bytes(sealed.SEALED_RECEIPT_BYTES_MAX))


def test_keys_without_an_x25519_form_are_refused() -> None:
    refused(sealed.x25519_public, bytes(32))  # small order
    refused(sealed.x25519_public, b"\x01" + bytes(31))  # the identity
    refused(sealed.x25519_public, bytes(31))
    refused(sealed.seal, b"m", bytes(31))


@settings(max_examples=100, deadline=None)
@given(memo=st.binary(max_size=limits.MEMO_BYTES_MAX))
def test_memo_round_trip_through_an_intent(memo: bytes) -> None:
    device = key("device")
    sm = sealed.seal_memo(memo, sealed.x25519_public(pub("device")))
    assert sealed.SEALED_MEMO_BYTES_MIN <= len(sm) <= sealed.SEALED_MEMO_BYTES_MAX
    intent = Intent(
        device=pub("device"),
        fog_id="fog-1",
        seq=7,
        payee_id="p",
        amount_micros=1,
        currency="EUR",
        time_ms=0,
        sealed_memo=sm,
        seal_receipts=sealed.SCHEME,
    )
    signed = seal_signed(intent, device)
    assert len(signed.raw) <= limits.INTENT_ENVELOPE_BYTES_MAX
    back = decode_body(Intent, signed.body)
    assert back == intent
    assert back.sealed_memo is not None
    assert sealed.open_memo(back.sealed_memo, sealed.x25519_private(device)) == memo


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=limits.INTENT_ENVELOPE_BYTES_MAX - 3))
def test_receipt_round_trip_and_randomized(blob: bytes) -> None:
    envelope = pack(blob)  # any one msgpack object up to 512 bytes survives the padding
    a = sealed.seal_receipt(envelope, pub("device"))
    b = sealed.seal_receipt(envelope, pub("device"))
    assert a != b  # a fresh ephemeral key each time
    assert len(a) <= sealed.SEALED_RECEIPT_BYTES_MAX
    for payload in (a, b):
        assert sealed.open_receipt(payload, secret("device")) == envelope
        refused(sealed.open_receipt, payload, secret("stranger"))


def test_limits_and_field_rules() -> None:
    refused(sealed.seal_memo, bytes(limits.MEMO_BYTES_MAX + 1), bytes(secret("device").public_key))
    refused(sealed.seal_receipt, bytes(limits.INTENT_ENVELOPE_BYTES_MAX + 1), pub("device"))
    base: dict[str, Any] = {
        "device": pub("device"),
        "fog_id": "fog-1",
        "seq": 1,
        "payee_id": "p",
        "amount_micros": 1,
        "currency": "EUR",
        "time_ms": 0,
    }
    for size in (sealed.SEALED_MEMO_BYTES_MIN, sealed.SEALED_MEMO_BYTES_MAX):
        encode_body(Intent(**base, sealed_memo=bytes(size)))
    for size in (sealed.SEALED_MEMO_BYTES_MIN - 1, sealed.SEALED_MEMO_BYTES_MAX + 1):
        refused(encode_body, Intent(**base, sealed_memo=bytes(size)))
    refused(encode_body, Intent(**base, memo=b"m", sealed_memo=bytes(48)))
    for bad in (0, 2):
        refused(encode_body, Intent(**base, seal_receipts=bad))
    # the largest intent with a sealed memo still fits its envelope
    big = Intent(
        **(base | {"fog_id": "f" * 63, "payee_id": "p" * 63, "seq": limits.UINT64_MAX}),
        sealed_memo=bytes(sealed.SEALED_MEMO_BYTES_MAX),
        seal_receipts=sealed.SCHEME,
    )
    assert len(seal_signed(big, key("device")).raw) <= limits.INTENT_ENVELOPE_BYTES_MAX
