"""Golden vectors of the sealing extension (docs/protocol.md section 16):
``python -m protocol.sealed_vectors [out.json]``.

Writes ``protocol/vectors/sealed-v1.json`` (or the given path) from the fixed seeds of
``protocol.vectors``; byte for byte reproducible. Sealed boxes are randomized (a fresh
ephemeral key each time), so the file pins *openings*: each box here was made with a fixed
ephemeral secret, exactly as ``crypto_box_seal`` builds one (ephemeral public key, then
``crypto_box`` under the nonce ``BLAKE2b-192(ephemeral_pk || recipient_pk)``), and a
conforming opener must get the stated plaintext from it. The file holds

- ``keys``: for the roles device, fog and stranger, the Ed25519 seed and public key and their
  X25519 forms (``crypto_sign_ed25519_pk_to_curve25519`` / ``..._sk_to_curve25519``);
- ``boxes``: sealed boxes with their recipient, ephemeral secret and plaintext;
- ``envelopes``: an intent carrying a sealed memo (``sm``) and asking for sealed receipts
  (``sr``), signed by the device; the fog's ok receipt to it; and ``receipt_payload``, the
  sealed form of that receipt as published on the device's receipt topic;
- ``refused``: receipt-topic payloads a device must refuse (truncated, trailing bytes,
  tampered, sealed to another key, short), and intent bodies breaking the extension's rules,
  each ``malformed``.

``build()`` is pure; only ``main()`` touches the file system.
"""

import hashlib
import sys
from pathlib import Path
from typing import Any, Final

import nacl.bindings
import nacl.public

from protocol import sealed
from protocol.codec import pack
from protocol.messages import Intent, Receipt
from protocol.reasons import Reason
from protocol.signing import seal_signed
from protocol.vectors import (
    T0_MS,
    VERSION,
    dumps,
    entry,
    intent_pairs,
    key,
    pub,
    raw_map,
    seed,
    signed_envelope,
)

DEFAULT_PATH: Final = Path(__file__).parent / "vectors" / "sealed-v1.json"
KEY_ROLES: Final = ("device", "fog", "stranger")
MEMO: Final = b"kwh-000042"
NONCE_BYTES: Final = 24


def x25519_secret(role: str) -> bytes:
    return bytes(sealed.x25519_private(key(role)))


def x25519_pub(role: str) -> bytes:
    return sealed.x25519_public(pub(role))


def ephemeral_secret(name: str) -> bytes:
    """The fixed ephemeral X25519 secret of box ``name``: SHA-256("fogpay/1/vectors/sealed/"
    + name)."""
    return hashlib.sha256(b"fogpay/1/vectors/sealed/" + name.encode()).digest()


def seal_fixed(name: str, plaintext: bytes, recipient: bytes) -> bytes:
    """``crypto_box_seal`` with the ephemeral secret of ``name`` instead of a random one."""
    esk = ephemeral_secret(name)
    epk = nacl.bindings.crypto_scalarmult_base(esk)
    nonce = nacl.bindings.crypto_generichash_blake2b_salt_personal(
        epk + recipient, digest_size=NONCE_BYTES
    )
    return epk + nacl.bindings.crypto_box(plaintext, nonce, recipient, esk)


def _bin(box: bytes) -> bytes:
    return pack(box)


def keys() -> list[dict[str, str]]:
    return [
        {
            "role": role,
            "seed": seed(role).hex(),
            "ed25519_public": pub(role).hex(),
            "x25519_public": x25519_pub(role).hex(),
            "x25519_secret": x25519_secret(role).hex(),
        }
        for role in KEY_ROLES
    ]


def _box(name: str, plaintext: bytes, role: str) -> dict[str, str]:
    return {
        "name": name,
        "recipient": role,
        "ephemeral_secret": ephemeral_secret(name).hex(),
        "plaintext": plaintext.hex(),
        "box": seal_fixed(name, plaintext, x25519_pub(role)).hex(),
    }


def _intent() -> Intent:
    return Intent(
        device=pub("device"),
        fog_id="fog-1",
        seq=1,
        payee_id="charger-7",
        amount_micros=1_250_000,
        currency="EUR",
        time_ms=T0_MS + 1_000,
        sealed_memo=seal_fixed("memo", MEMO, x25519_pub("device")),
        seal_receipts=sealed.SCHEME,
    )


def _receipt(intent_id: bytes) -> Receipt:
    return Receipt(
        intent_id=intent_id,
        device=pub("device"),
        seq=1,
        status="ok",
        log_index=1,
        lease_id=bytes(range(16)),
        time_ms=T0_MS + 1_005,
    )


def boxes() -> list[dict[str, str]]:
    intent = seal_signed(_intent(), key("device"))
    receipt = seal_signed(_receipt(intent.id), key("fog")).raw
    return [
        _box("memo", MEMO, "device"),
        _box("memo_empty", b"", "device"),
        _box("memo_to_payee", MEMO, "stranger"),  # sealed to someone else's key (the payee's)
        _box("receipt", sealed.pad(receipt), "device"),
    ]


def envelopes() -> list[dict[str, str]]:
    intent = entry("intent_sealed", "device", _intent())
    receipt = entry("receipt_ok", "fog", _receipt(bytes.fromhex(intent["id"])))
    box = bytes.fromhex(next(b["box"] for b in boxes() if b["name"] == "receipt"))
    receipt["receipt_payload"] = _bin(box).hex()
    return [intent, receipt]


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


def refused() -> list[dict[str, str]]:
    sealed_receipt = next(b for b in boxes() if b["name"] == "receipt")
    box, plain = bytes.fromhex(sealed_receipt["box"]), bytes.fromhex(sealed_receipt["plaintext"])
    good = _bin(box)
    stranger = _bin(seal_fixed("receipt_to_stranger", plain, x25519_pub("stranger")))
    envelope, device = sealed.unpad(plain), x25519_pub("device")

    def padded(name: str, plaintext: bytes) -> bytes:
        return _bin(seal_fixed(name, plaintext, device))

    over = len(plain) + sealed.PAD_BLOCK_BYTES - len(envelope)  # 64 zero bytes or more
    cases: list[tuple[str, str, bytes]] = [
        ("truncated", "receipt_payload", good[:-1]),
        ("trailing_byte", "receipt_payload", good + b"\x00"),
        ("header_only", "receipt_payload", good[:3]),
        ("tampered_ciphertext", "receipt_payload", _flip(good, len(good) - 1)),
        ("tampered_mac", "receipt_payload", _flip(good, 3 + 32)),
        ("tampered_ephemeral_key", "receipt_payload", _flip(good, 3)),
        ("sealed_to_stranger", "receipt_payload", stranger),
        ("box_too_short", "receipt_payload", _bin(bytes(48))),
        ("box_too_long", "receipt_payload", _bin(bytes(sealed.SEALED_RECEIPT_BOX_BYTES_MAX + 1))),
        ("not_a_bin", "receipt_payload", pack("sealed")),
        ("not_padded", "receipt_payload", padded("not_padded", envelope)),
        ("padding_not_zero", "receipt_payload", padded("padding_not_zero", plain[:-1] + b"\x01")),
        ("padding_64_bytes", "receipt_payload", padded("padding_64_bytes", envelope + bytes(over))),
        ("only_padding", "receipt_payload", padded("only_padding", bytes(256))),
        ("envelope_cut_short", "receipt_payload", padded("cut", sealed.pad(envelope[:-1]))),
    ]  # fmt: skip
    memo_box = seal_fixed("memo", MEMO, x25519_pub("device"))
    bodies: list[tuple[str, bytes]] = [
        ("intent_m_and_sm", raw_map(intent_pairs(m=MEMO, sm=memo_box))),
        ("intent_sm_47_bytes", raw_map(intent_pairs(sm=bytes(47)))),
        ("intent_sm_113_bytes", raw_map(intent_pairs(sm=bytes(113)))),
        ("intent_sm_str", raw_map(intent_pairs(sm="x" * 60))),
        ("intent_sr_0", raw_map(intent_pairs(sr=0))),
        ("intent_sr_2", raw_map(intent_pairs(sr=2))),
        ("intent_sr_true", raw_map(intent_pairs(sr=True))),
    ]
    out = [
        {"name": n, "topic_type": t, "opener": "device", "payload": p.hex()} for n, t, p in cases
    ]
    out += [
        {
            "name": n,
            "topic_type": "intent",
            "opener": "fog",
            "payload": signed_envelope("intent", body).hex(),
        }
        for n, body in bodies
    ]
    for o in out:  # the envelope cut short opens, but its signature lost its last byte
        cut = o["name"] == "envelope_cut_short"
        o["reason"] = str(Reason.BAD_SIGNATURE if cut else Reason.MALFORMED)
    return out


def build() -> dict[str, Any]:
    return {
        "version": VERSION,
        "scheme": sealed.SCHEME,
        "keys": keys(),
        "boxes": boxes(),
        "envelopes": envelopes(),
        "refused": refused(),
    }


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else DEFAULT_PATH
    out.write_text(dumps(build()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
