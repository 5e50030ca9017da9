"""Envelopes and signatures: signing input, message ids, signer rules, reason precedence,
and the possession proof."""

import hashlib

import nacl.bindings as b
import nacl.signing
import pytest

from protocol.codec import pack
from protocol.errors import Declined
from protocol.messages import Intent, Lease, Receipt
from protocol.reasons import Reason
from protocol.signing import (
    POSSESSION_TYPE,
    is_valid_public_key,
    message_id,
    open_envelope,
    possession_proof,
    seal,
    seal_signed,
    signing_input,
    signing_key_from_seed,
    verify,
    verify_possession,
)
from protocol.vectors import Raw, intent_pairs, key, pub, raw_map, signed_envelope

DEVICE = key("device")
OTHER = key("stranger")


def intent(**over: object) -> Intent:
    fields: dict[str, object] = {
        "device": pub("device"),
        "fog_id": "fog-1",
        "seq": 7,
        "payee_id": "shop",
        "amount_micros": 10,
        "currency": "USD",
        "time_ms": 1,
    }
    return Intent(**(fields | over))  # type: ignore[arg-type]


def reason_of(data: bytes, cls: type = Intent, **kw: bytes) -> Reason:
    with pytest.raises(Declined) as e:
        open_envelope(data, cls, **kw)
    return e.value.reason


def test_signing_input_and_id() -> None:
    body = b"\x80"
    assert signing_input("intent", body) == b"fogpay/1/intent\x00\x80"
    assert message_id("intent", body) == hashlib.sha256(b"fogpay/1/intent\x00\x80").digest()
    # the type is part of what is signed: the same body under another type is another id
    assert message_id("receipt", body) != message_id("intent", body)


def test_signature_is_over_the_signing_input() -> None:
    signed = seal_signed(intent(), DEVICE)
    assert verify(signed.signer, signing_input("intent", signed.body), signed.sig)
    assert not verify(signed.signer, signed.body, signed.sig)  # never over the bare body
    assert signed.signer == pub("device")
    assert signed.raw == pack(["intent", signed.body, signed.signer, signed.sig])


def test_intent_signed_by_another_key_is_bad_signature() -> None:
    assert reason_of(seal(intent(), OTHER)) is Reason.BAD_SIGNATURE


def test_required_signer() -> None:
    lease = Lease(
        lease_id=bytes(16),
        owner_id="o",
        fog_id="f",
        amount_micros=5,
        currency="EUR",
        not_after_ms=9,
    )
    raw = seal(lease, OTHER)
    assert open_envelope(raw, Lease, signer=pub("stranger")).msg == lease
    assert reason_of(raw, Lease, signer=pub("issuer")) is Reason.BAD_SIGNATURE


def test_bad_signature_with_bad_body_is_malformed() -> None:
    """Section 6 order: malformed comes before bad_signature, so a payload that is both gets
    malformed. The signature is checked first, then the body is still decoded."""
    good_body = pack(dict(intent_pairs()))
    bad_body = raw_map(intent_pairs(a=0))
    sig = bytes(64)
    assert reason_of(pack(["intent", good_body, pub("device"), sig])) is Reason.BAD_SIGNATURE
    assert reason_of(pack(["intent", bad_body, pub("device"), sig])) is Reason.MALFORMED
    # a valid signature over the bad body is malformed too
    assert reason_of(signed_envelope("intent", bad_body)) is Reason.MALFORMED


def test_signature_of_one_type_does_not_open_as_another() -> None:
    """Domain separation: a receipt signature does not verify as an intent's."""
    signed = seal_signed(intent(), DEVICE)
    forged = pack(["receipt", signed.body, signed.signer, signed.sig])
    assert reason_of(forged, Receipt) is Reason.MALFORMED  # intent body is not a receipt
    swapped = pack(["intent", signed.body, signed.signer, DEVICE.sign(b"x").signature])
    assert reason_of(swapped) is Reason.BAD_SIGNATURE


def test_opened_envelope_keeps_received_bytes() -> None:
    raw = seal(intent(memo=b"m"), DEVICE)
    opened = open_envelope(raw, Intent)
    assert opened.raw == raw
    assert opened.msg.memo == b"m"


def test_non_minimal_integer_encoding_is_accepted_and_signed_as_sent() -> None:
    """The signature covers the body bytes as sent; we never re-encode, so a device may use
    any msgpack integer width (here q as uint64) and the id is over its own bytes."""
    pairs = intent_pairs()
    body = raw_map(intent_pairs(q=Raw(b"\xcf" + (1).to_bytes(8, "big"))))
    raw = signed_envelope("intent", body)
    opened = open_envelope(raw, Intent)
    assert opened.msg.seq == 1
    assert opened.body == body
    assert opened.id == message_id("intent", body) != message_id("intent", pack(dict(pairs)))


def test_possession_proof() -> None:
    binding_body = b"\x81\xa1d\xc4\x20" + pub("device")
    proof = possession_proof(DEVICE, binding_body)
    assert verify_possession(pub("device"), binding_body, proof)
    assert proof == DEVICE.sign(b"fogpay/1/pop\x00" + binding_body).signature
    assert not verify_possession(pub("device"), binding_body + b"\x00", proof)
    assert not verify_possession(pub("stranger"), binding_body, proof)
    assert not verify_possession(pub("device"), binding_body, possession_proof(OTHER, binding_body))
    # not interchangeable with an envelope signature over the same body
    assert not verify(pub("device"), signing_input("bind", binding_body), proof)


def test_signing_key_from_seed() -> None:
    seed = bytes(range(32))
    assert bytes(signing_key_from_seed(seed).verify_key) == bytes(
        nacl.signing.SigningKey(seed).verify_key
    )
    for bad in (b"", bytes(31), bytes(33)):
        with pytest.raises(ValueError):
            signing_key_from_seed(bad)


def test_verify_refuses_wrong_lengths() -> None:
    signed = seal_signed(intent(), DEVICE)
    msg = signing_input("intent", signed.body)
    assert verify(signed.signer, msg, signed.sig)
    assert not verify(signed.signer[:31], msg, signed.sig)
    assert not verify(signed.signer, msg, signed.sig[:63])
    assert not verify(signed.signer, msg, signed.sig + b"\x00")


def mixed_order_signature(message: bytes) -> tuple[bytes, bytes]:
    """A key A' = aB + T (T of order 8) and a signature by it over ``message`` that
    libsodium's cofactorless verify accepts: R = rB with r chosen so that k = H(R, A', M)
    is a multiple of 8, making [k]T vanish. Bounded: each try succeeds with p = 1/8."""
    t = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
    a = b.crypto_core_ed25519_scalar_reduce(hashlib.sha512(b"a").digest())
    key = b.crypto_core_ed25519_add(b.crypto_scalarmult_ed25519_base_noclamp(a), t)
    for i in range(256):
        r = b.crypto_core_ed25519_scalar_reduce(hashlib.sha512(b"r%d" % i).digest())
        big_r = b.crypto_scalarmult_ed25519_base_noclamp(r)
        k = b.crypto_core_ed25519_scalar_reduce(hashlib.sha512(big_r + key + message).digest())
        if int.from_bytes(k, "little") % 8 == 0:
            s = b.crypto_core_ed25519_scalar_add(r, b.crypto_core_ed25519_scalar_mul(k, a))
            return key, big_r + s
    raise AssertionError("no r found in 256 tries")


def test_possession_proof_by_a_mixed_order_key_is_refused() -> None:
    """libsodium's verify accepts a mixed-order key; the possession check must not."""
    body = b"\x80"
    key, sig = mixed_order_signature(signing_input(POSSESSION_TYPE, body))
    assert verify(key, signing_input(POSSESSION_TYPE, body), sig)  # libsodium accepts it
    assert not is_valid_public_key(key)
    assert not verify_possession(key, body, sig)
