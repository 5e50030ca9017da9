"""The decoders as they were before the fast paths (commit f48db37): ``decode_body``
(``unpack_strict`` with its duplicate-key hook at every depth, then every rule in turn),
``split_envelope``, ``open_envelope`` and ``decode_record``. Kept only as the reference the
fast ones in ``protocol`` must agree with (tests/protocol/test_fast_decode.py)."""

from typing import TypeVar

from protocol import limits
from protocol.codec import unpack_strict
from protocol.errors import Declined
from protocol.messages import Intent, Message, Receipt
from protocol.reasons import Reason
from protocol.signing import (
    ENVELOPE_TYPE_CHARS_MAX,
    RawEnvelope,
    Signed,
    message_id,
    signing_input,
    verify,
)

M = TypeVar("M", bound=Message)


def _fail(detail: str) -> Declined:
    return Declined(Reason.MALFORMED, detail)


def decode_body(cls: type[M], body: bytes) -> M:
    """Decode and validate a body; raises Declined(MALFORMED)."""
    obj = unpack_strict(body, bytes_max=cls.ENVELOPE_BYTES_MAX, what=f"{cls.TYPE} body")
    if type(obj) is not dict:
        raise _fail(f"{cls.TYPE}: body is not a map")
    known = {f.key for f in cls.SCHEMA}
    unknown = [k for k in obj if k not in known]
    if unknown:
        raise _fail(f"{cls.TYPE}: unknown keys {sorted(map(str, unknown))}")
    kwargs: dict[str, object] = {}
    for f in cls.SCHEMA:
        if f.key not in obj:
            if not f.optional:
                raise _fail(f"{cls.TYPE}: missing key {f.key!r}")
            continue
        value = obj[f.key]
        if not f.check(value):
            raise _fail(f"{cls.TYPE}.{f.key}: invalid value")
        if type(value) is list:
            value = tuple(value)
        elif f.attr == "reason" and cls is Receipt:
            value = Reason(value)
        kwargs[f.attr] = value
    msg = cls(**kwargs)
    msg.validate()
    return msg


def open_envelope(data: bytes, cls: type[M], *, signer: bytes | None = None) -> Signed[M]:
    env = split_envelope(data, bytes_max=cls.ENVELOPE_BYTES_MAX)
    if env.type != cls.TYPE:
        raise Declined(Reason.MALFORMED, f"envelope: type {env.type!r}, expected {cls.TYPE!r}")
    if not verify(env.signer, signing_input(env.type, env.body), env.sig):
        decode_body(cls, env.body)  # raises MALFORMED first if the body is also bad
        raise Declined(Reason.BAD_SIGNATURE, f"{cls.TYPE}: signature does not verify")
    msg = decode_body(cls, env.body)
    if isinstance(msg, Intent) and msg.device != env.signer:
        raise Declined(Reason.BAD_SIGNATURE, "intent: signer is not d")
    if signer is not None and env.signer != signer:
        raise Declined(Reason.BAD_SIGNATURE, f"{cls.TYPE}: signer is not the required key")
    return Signed(msg, env.body, env.signer, env.sig, message_id(env.type, env.body), bytes(data))


def split_envelope(data: bytes, *, bytes_max: int) -> RawEnvelope:
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
    return RawEnvelope(msg_type, body, signer, sig)


def decode_record(record: bytes) -> tuple[bytes, bytes]:
    obj = unpack_strict(
        record, bytes_max=2 * limits.INTENT_ENVELOPE_BYTES_MAX + 16, items_max=2, what="record"
    )
    if type(obj) is not list or len(obj) != 2 or not all(type(x) is bytes for x in obj):
        raise Declined(Reason.MALFORMED, "record: not [bin, bin]")
    if any(len(x) > limits.INTENT_ENVELOPE_BYTES_MAX for x in obj):
        raise Declined(Reason.MALFORMED, "record: an envelope exceeds 512 bytes")
    return obj[0], obj[1]
