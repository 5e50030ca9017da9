"""Envelopes: sealing, opening, signatures and message ids (spec section 2).

An envelope is the msgpack array ``[type: str, body: bin, signer: bin(32), sig: bin(64)]``.
The signature covers ``b"fogpay/1/" + type + b"\\x00" + body`` with the body bytes exactly as
transmitted; we verify those bytes and never re-encode a body to verify it. Verification is
libsodium's ``crypto_sign_verify_detached`` (through PyNaCl), whose rules (canonical S, no
small-order or non-canonical A or R) the spec adopts for every tier.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

import nacl.bindings
import nacl.exceptions
import nacl.signing
from nacl import _sodium

from protocol import limits
from protocol.codec import pack, unpack_strict
from protocol.errors import Declined
from protocol.messages import Intent, Message, decode_body, encode_body
from protocol.reasons import Reason

M = TypeVar("M", bound=Message)
ENVELOPE_TYPE_CHARS_MAX: Final = 16


def signing_input(msg_type: str, body: bytes) -> bytes:
    return limits.PROTOCOL_PREFIX + msg_type.encode("ascii") + b"\x00" + body


def message_id(msg_type: str, body: bytes) -> bytes:
    """SHA-256 of the signing input; an intent's id is its intent id."""
    return hashlib.sha256(signing_input(msg_type, body)).digest()


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """libsodium's crypto_sign_verify_detached, as a boolean."""
    if len(public_key) != limits.KEY_BYTES or len(signature) != limits.SIG_BYTES:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + message, public_key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


def verify_signed(public_keys: Sequence[bytes], signed: Sequence[bytes]) -> list[bool]:
    """``verify(key, message, signature)`` for each pair of ``public_keys[k]`` and
    ``signed[k] = signature + message`` (libsodium's "signed message" form), in one tight
    loop: the same libsodium call, ``crypto_sign_open``, that ``verify`` makes through
    PyNaCl's binding, called directly without its two buffers, copy and exception per call
    (1 us of a verify's 60; and a batch's verifies back to back keep libsodium's tables in
    the cache, which interleaved Python work would evict)."""
    open_signed, null = _sodium.lib.crypto_sign_open, _sodium.ffi.NULL
    return [
        type(k) is bytes
        and len(k) == limits.KEY_BYTES
        and type(s) is bytes
        and len(s) >= limits.SIG_BYTES
        and open_signed(null, null, s, len(s), k) == 0
        for k, s in zip(public_keys, signed, strict=True)
    ]


def is_valid_public_key(key: bytes) -> bool:
    """True for a canonical encoding of a point of prime order (libsodium's
    crypto_core_ed25519_is_valid_point). Refuses small-order, mixed-order and non-canonical
    keys: a binding or credential naming such a key is refused when registered or loaded."""
    if type(key) is not bytes or len(key) != limits.KEY_BYTES:
        return False
    return bool(nacl.bindings.crypto_core_ed25519_is_valid_point(key))


def signing_key_from_seed(seed: bytes) -> nacl.signing.SigningKey:
    if len(seed) != limits.SEED_BYTES:
        raise ValueError(f"seed must be {limits.SEED_BYTES} bytes")
    return nacl.signing.SigningKey(seed)


def public_key(key: nacl.signing.SigningKey) -> bytes:
    return bytes(key.verify_key)


@dataclass(frozen=True, slots=True)
class Signed(Generic[M]):
    """A verified message with the exact bytes it arrived in."""

    msg: M
    body: bytes
    signer: bytes
    sig: bytes
    id: bytes
    raw: bytes  # the whole envelope, as received or sealed


def seal(msg: Message, key: nacl.signing.SigningKey) -> bytes:
    """Encode, sign and wrap ``msg``; returns the envelope bytes."""
    return seal_signed(msg, key).raw


def seal_signed(msg: M, key: nacl.signing.SigningKey) -> Signed[M]:
    body = encode_body(msg)
    sig = key.sign(signing_input(msg.TYPE, body)).signature
    signer = public_key(key)
    raw = pack([msg.TYPE, body, signer, sig])
    if len(raw) > msg.ENVELOPE_BYTES_MAX:
        raise Declined(Reason.MALFORMED, f"{msg.TYPE}: envelope {len(raw)} bytes too large")
    return Signed(msg, body, signer, bytes(sig), message_id(msg.TYPE, body), raw)


@dataclass(frozen=True, slots=True)
class RawEnvelope:
    """The four fields of an envelope, before verification."""

    type: str
    body: bytes
    signer: bytes
    sig: bytes


def split_envelope(data: bytes, *, bytes_max: int) -> RawEnvelope:
    """Parse the outer array; raises Declined(MALFORMED)."""
    return RawEnvelope(*_split(data, bytes_max))


def _split(data: bytes, bytes_max: int) -> tuple[str, bytes, bytes, bytes]:
    # The usual encoding read directly (half the time): array of 4, fixstr of 1-16 bytes,
    # bin 8 body, bin 8 of 32, bin 8 of 64, nothing after; exactly what the strict path
    # returns for these bytes. Anything else (other widths, bad UTF-8) goes the strict way.
    if type(data) is bytes and 2 < len(data) <= bytes_max and data[0] == 0x94:
        end = 2 + data[1] - 0xA0  # fixstr 0xa1..0xb0: 1..16 bytes
        if 2 < end <= 18 and len(data) > end + 1 and data[end] == 0xC4:
            body_end = end + 2 + data[end + 1]
            if (
                len(data) == body_end + 100
                and data[body_end : body_end + 2] == b"\xc4\x20"
                and data[body_end + 34 : body_end + 36] == b"\xc4\x40"
            ):
                try:
                    msg_type = data[2:end].decode()
                except UnicodeDecodeError:
                    pass  # the strict path refuses it, and says so
                else:
                    return (
                        msg_type,
                        data[end + 2 : body_end],
                        data[body_end + 2 : body_end + 34],
                        data[body_end + 36 :],
                    )
    obj = unpack_strict(data, bytes_max=bytes_max, items_max=4, what="envelope")
    if type(obj) is not list or len(obj) != 4:
        raise Declined(Reason.MALFORMED, "envelope: not a 4-element array")
    msg_type, body, signer, sig = obj
    if type(msg_type) is not str or not 0 < len(msg_type) <= ENVELOPE_TYPE_CHARS_MAX:
        raise Declined(Reason.MALFORMED, "envelope: type is not a short str")
    if type(body) is not bytes:
        raise Declined(Reason.MALFORMED, "envelope: body is not bin")
    if type(signer) is not bytes or len(signer) != limits.KEY_BYTES:
        raise Declined(Reason.MALFORMED, "envelope: signer is not bin 32")
    if type(sig) is not bytes or len(sig) != limits.SIG_BYTES:
        raise Declined(Reason.MALFORMED, "envelope: sig is not bin 64")
    return msg_type, body, signer, sig


def open_envelope(
    data: bytes, cls: type[M], *, signer: bytes | None = None, verified: bool = False
) -> Signed[M]:
    """Verify and decode an envelope of type ``cls``.

    Raises Declined(MALFORMED) for any rule of spec section 2 and Declined(BAD_SIGNATURE) when
    a well-formed envelope's signature does not verify, when ``signer`` is given and the
    envelope's signer differs, or (intents) when the signer is not ``d``. The signature is
    checked over the received body bytes before the body is decoded; if it fails, the body is
    still checked for well-formedness so that ``malformed`` wins, as section 6 orders.

    ``verified``: the caller has already seen ``signatures_verify([data])`` be True for these
    very bytes (a verify worker of the fog's own, docs/fog.md "Verify workers"); the Ed25519
    check is then skipped, every other rule still applies.
    """
    msg, body, env_signer, sig, msg_id = _open(data, cls, signer, verified)
    return Signed(msg, body, env_signer, sig, msg_id, bytes(data))


def open_message(
    data: bytes, cls: type[M], *, signer: bytes | None = None
) -> tuple[M, bytes, bytes]:
    """``open_envelope`` (the same checks, in the same order) for a caller that needs only
    ``(msg, id, signer)``: no ``Signed`` is built (batch ingest opens two per record)."""
    msg, _, env_signer, _, msg_id = _open(data, cls, signer)
    return msg, msg_id, env_signer


def _open(
    data: bytes, cls: type[M], signer: bytes | None, verified: bool = False
) -> tuple[M, bytes, bytes, bytes, bytes]:
    msg_type, body, env_signer, sig = _split(data, cls.ENVELOPE_BYTES_MAX)
    if msg_type != cls.TYPE:
        raise Declined(Reason.MALFORMED, f"envelope: type {msg_type!r}, expected {cls.TYPE!r}")
    signed_input = signing_input(msg_type, body)
    if not verified and not verify(env_signer, signed_input, sig):
        decode_body(cls, body)  # raises MALFORMED first if the body is also bad
        raise Declined(Reason.BAD_SIGNATURE, f"{cls.TYPE}: signature does not verify")
    msg = decode_body(cls, body)
    if isinstance(msg, Intent) and msg.device != env_signer:
        raise Declined(Reason.BAD_SIGNATURE, "intent: signer is not d")
    if signer is not None and env_signer != signer:
        raise Declined(Reason.BAD_SIGNATURE, f"{cls.TYPE}: signer is not the required key")
    return msg, body, env_signer, sig, hashlib.sha256(signed_input).digest()


def signatures_verify(envelopes: Sequence[object], cls: type[Message]) -> list[bool]:
    """For each item: True if it is bytes that split as an envelope of type ``cls`` whose
    signature verifies by its own signer over its body (nothing else is checked:
    ``open_envelope`` does the rest). What a verify worker computes so that
    ``open_envelope(..., verified=True)`` may skip the check; the signatures are verified back
    to back (``verify_signed``)."""
    keys: list[bytes] = []
    signed: list[bytes] = []
    for data in envelopes:
        key, message = b"", b""  # no key: verify_signed says False
        if type(data) is bytes:
            try:
                msg_type, body, env_signer, sig = _split(data, cls.ENVELOPE_BYTES_MAX)
            except Declined:
                pass
            else:
                if msg_type == cls.TYPE:
                    key, message = env_signer, sig + signing_input(msg_type, body)
        keys.append(key)
        signed.append(message)
    return verify_signed(keys, signed)


POSSESSION_TYPE: Final = "pop"


def possession_proof(device_key: nacl.signing.SigningKey, binding_body: bytes) -> bytes:
    """The device's proof that it holds its key, for the issuer to check before it registers a
    binding: the device's signature over ``b"fogpay/1/pop\\x00" + binding body`` (the body
    bytes of the owner-signed ``bind`` envelope). Never sent to fogs."""
    return bytes(device_key.sign(signing_input(POSSESSION_TYPE, binding_body)).signature)


def verify_possession(device: bytes, binding_body: bytes, proof: bytes) -> bool:
    """True if ``proof`` is ``device``'s possession proof over ``binding_body`` and ``device``
    is a valid key (``is_valid_public_key``): a mixed-order key, which libsodium's verify
    alone would accept, never gets a binding."""
    if not is_valid_public_key(device):
        return False
    return verify(device, signing_input(POSSESSION_TYPE, binding_body), proof)
