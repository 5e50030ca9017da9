"""The sealing extension, version 1 (docs/protocol.md section 16): memos and receipts sealed
with libsodium sealed boxes, so a broker that carries them learns nothing from them.

Sans-IO. A sealed box (``crypto_box_seal``) is an X25519 ephemeral public key, then the
XSalsa20-Poly1305 box of the plaintext under the shared key of that ephemeral key and the
recipient's key, with the nonce ``BLAKE2b-192(ephemeral_pk || recipient_pk)``: 48 bytes more
than the plaintext, anonymous (it says nothing about who sealed it), randomized. A
recipient's X25519 key is its Ed25519 key converted (``crypto_sign_ed25519_pk_to_curve25519``
for a public key, ``crypto_sign_ed25519_sk_to_curve25519`` for its secret), so a device needs
no second key.

- **Sealed receipt** (fog -> device): the payload on the device's receipt topic is one msgpack
  ``bin`` holding ``crypto_box_seal(receipt envelope || zero padding, X25519(d))``. Inside is
  the ordinary fog-signed receipt envelope, the same bytes the fog keeps in its log record and
  sends to the cloud (sign, then seal), padded with 0..63 zero bytes to a multiple of 64 so
  that ok and declined receipts (217..242 bytes) all seal to the same size. A plain envelope
  starts with ``0x94`` (array of 4); a sealed payload with ``0xc4``/``0xc5``/``0xc6`` (bin
  8/16/32): the first byte tells them apart.
- **Sealed memo** (device -> memo's recipient): the intent's ``sm`` holds
  ``crypto_box_seal(memo, R)`` for an X25519 key ``R`` the device chose (the payee's, agreed
  out of band, or the device's own). The device signs the sealed bytes: the fog and the cloud
  verify and record the intent without reading the memo.

Every failure raises ``Declined(MALFORMED)`` with a detail; nothing here logs or keeps state.
"""

from typing import Final

import msgpack
import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

from protocol import limits
from protocol.errors import Declined
from protocol.reasons import Reason

SCHEME: Final = 1  # the intent's ``sr`` value asking for sealed receipts (the only one in v1)
SEAL_OVERHEAD_BYTES: Final = 48  # crypto_box_SEALBYTES: ephemeral key 32 + MAC 16
SEALED_MEMO_BYTES_MIN: Final = SEAL_OVERHEAD_BYTES  # an empty memo, sealed
SEALED_MEMO_BYTES_MAX: Final = limits.MEMO_BYTES_MAX + SEAL_OVERHEAD_BYTES  # 112
SEALED_RECEIPT_BOX_BYTES_MAX: Final = limits.INTENT_ENVELOPE_BYTES_MAX + SEAL_OVERHEAD_BYTES
# the payload on a receipt topic: bin 16 header (3 bytes) + the box (560) = 563
SEALED_RECEIPT_BYTES_MAX: Final = SEALED_RECEIPT_BOX_BYTES_MAX + 3
PAD_BLOCK_BYTES: Final = 64  # a sealed receipt's plaintext is a multiple of this
_BIN_HEADERS: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # msgpack bin 8/16/32: bytes of length


def _fail(detail: str) -> Declined:
    return Declined(Reason.MALFORMED, f"sealed: {detail}")


def x25519_public(ed25519_public: bytes) -> bytes:
    """The X25519 public key of an Ed25519 public key (libsodium's conversion); raises
    Declined(MALFORMED) for a key that is not a valid Ed25519 point."""
    if type(ed25519_public) is not bytes or len(ed25519_public) != limits.KEY_BYTES:
        raise _fail("key is not 32 bytes")
    try:
        return bytes(nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(ed25519_public))
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError, ValueError) as exc:
        raise _fail("key has no X25519 form") from exc


def x25519_private(key: nacl.signing.SigningKey) -> nacl.public.PrivateKey:
    """The X25519 secret of an Ed25519 signing key (``crypto_sign_ed25519_sk_to_curve25519``)."""
    return key.to_curve25519_private_key()


def seal(plaintext: bytes, recipient_x25519: bytes) -> bytes:
    """``crypto_box_seal``: randomized, 48 bytes longer than ``plaintext``."""
    if len(recipient_x25519) != limits.KEY_BYTES:
        raise _fail("recipient key is not 32 bytes")
    return bytes(nacl.public.SealedBox(nacl.public.PublicKey(recipient_x25519)).encrypt(plaintext))


def open_box(box: bytes, secret: nacl.public.PrivateKey) -> bytes:
    """``crypto_box_seal_open``; raises Declined(MALFORMED) if the box is short, tampered
    with or sealed to another key."""
    if len(box) < SEAL_OVERHEAD_BYTES:
        raise _fail(f"box shorter than {SEAL_OVERHEAD_BYTES} bytes")
    try:
        return bytes(nacl.public.SealedBox(secret).decrypt(box))
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError) as exc:
        raise _fail("box does not open with this key") from exc


# ---- memos -----------------------------------------------------------------------------------


def seal_memo(memo: bytes, recipient_x25519: bytes) -> bytes:
    """The ``sm`` of an intent: ``memo`` (at most 64 bytes) sealed to ``recipient_x25519``."""
    if len(memo) > limits.MEMO_BYTES_MAX:
        raise _fail(f"memo longer than {limits.MEMO_BYTES_MAX} bytes")
    return seal(memo, recipient_x25519)


def open_memo(sealed_memo: bytes, secret: nacl.public.PrivateKey) -> bytes:
    """The memo inside an intent's ``sm``; raises Declined(MALFORMED)."""
    if not SEALED_MEMO_BYTES_MIN <= len(sealed_memo) <= SEALED_MEMO_BYTES_MAX:
        raise _fail("sealed memo size out of range")
    return open_box(sealed_memo, secret)


# ---- receipts --------------------------------------------------------------------------------


def is_sealed_payload(payload: bytes) -> bool:
    """True if a receipt-topic payload is in the sealed form (by its first byte)."""
    return len(payload) > 0 and payload[0] in _BIN_HEADERS


def seal_receipt(envelope: bytes, device: bytes) -> bytes:
    """The sealed payload for a receipt envelope addressed to device key ``device`` (Ed25519):
    one msgpack bin holding the sealed box (canonical header: bin 8 or bin 16)."""
    if len(envelope) > limits.INTENT_ENVELOPE_BYTES_MAX:
        raise _fail("receipt envelope over 512 bytes")
    box = seal(pad(envelope), x25519_public(device))
    n = len(box)
    header = bytes([0xC4, n]) if n < 256 else bytes([0xC5]) + n.to_bytes(2, "big")
    return header + box


def unwrap_receipt(payload: bytes) -> bytes:
    """The box inside a sealed receipt payload, checked strictly: at most 563 bytes, exactly
    one msgpack bin (any of bin 8/16/32), no trailing bytes, a box of 49..560 bytes."""
    if len(payload) > SEALED_RECEIPT_BYTES_MAX:
        raise _fail(f"payload over {SEALED_RECEIPT_BYTES_MAX} bytes")
    if not is_sealed_payload(payload):
        raise _fail("payload is not a msgpack bin")
    width = _BIN_HEADERS[payload[0]]
    if len(payload) < 1 + width:
        raise _fail("truncated bin header")
    n = int.from_bytes(payload[1 : 1 + width], "big")
    if len(payload) != 1 + width + n:
        raise _fail("bin length does not match the payload (truncated or trailing bytes)")
    if not SEAL_OVERHEAD_BYTES < n <= SEALED_RECEIPT_BOX_BYTES_MAX:
        raise _fail("box size out of range")
    return payload[1 + width :]


def pad(envelope: bytes) -> bytes:
    """``envelope`` followed by the fewest zero bytes that make it a multiple of 64 long."""
    return envelope + bytes(-len(envelope) % PAD_BLOCK_BYTES)


def unpad(plaintext: bytes) -> bytes:
    """The envelope at the start of a sealed receipt's plaintext: one msgpack object, then
    0..63 zero bytes, the whole a multiple of 64 long; raises Declined(MALFORMED). (The
    envelope itself is checked strictly afterwards, section 6.)"""
    if not 0 < len(plaintext) <= limits.INTENT_ENVELOPE_BYTES_MAX:
        raise _fail("padded receipt size out of range")
    if len(plaintext) % PAD_BLOCK_BYTES:
        raise _fail("padded receipt not a multiple of 64 bytes")
    unpacker = msgpack.Unpacker(
        max_buffer_size=len(plaintext),
        max_bin_len=limits.INTENT_ENVELOPE_BYTES_MAX,
        max_str_len=limits.INTENT_ENVELOPE_BYTES_MAX,
        max_array_len=8,
        max_map_len=0,
        max_ext_len=0,
    )
    unpacker.feed(plaintext)
    try:
        unpacker.skip()
    except Exception as exc:  # msgpack's OutOfData, ValueError, FormatError...: all malformed
        raise _fail("no envelope before the padding") from exc
    end = unpacker.tell()
    if plaintext[end:] != bytes(len(plaintext) - end) or len(plaintext) - end >= PAD_BLOCK_BYTES:
        raise _fail("padding is not 0..63 zero bytes")
    return plaintext[:end]


def open_receipt(payload: bytes, secret: nacl.public.PrivateKey) -> bytes:
    """The receipt envelope inside a sealed payload (still to be verified as any receipt:
    the fog's signature, then ``i``, ``d``, ``q``); raises Declined(MALFORMED)."""
    return unpad(open_box(unwrap_receipt(payload), secret))
