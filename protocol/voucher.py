"""Device-to-device payments against fog-signed vouchers (docs/protocol.md section 18.3).

A device obtains an offline allowance by paying an ordinary intent to the reserved payee
``voucher``; the fog authorizes it like any intent (drawn from a lease, logged, batched) and
also answers, on the device's receipt topic, with a ``vch`` it signs: the **voucher**, whose id
is that intent's id. The device then pays other devices with no fog in reach: it signs a
``d2d`` payment against the voucher and hands the payee a **bundle** (the fog's credential, the
voucher and the payment). The payee checks the bundle with the issuer's key alone
(``check_bundle``), keeps it, and hands it in later inside a ``held`` payload (section 17.7):
the record ``[vch envelope, d2d envelope]``. The cloud books each payment once, never more than
the voucher's amount in all, and attributes a voucher spent twice to its device.

Everything here is pure: ``voucher_for`` (the fog's side: the voucher an authorized voucher
intent earns, deterministic, so a replayed receipt brings the same voucher bytes),
``check_bundle`` (the payee's side) and the codecs.
"""

from dataclasses import dataclass
from typing import ClassVar, Final

import nacl.signing

from protocol import limits
from protocol.codec import pack, unpack_strict
from protocol.errors import Declined, FogpayError
from protocol.messages import (
    AMOUNT,
    HASH,
    KEY,
    UINT,
    Field,
    FogCredential,
    Intent,
    Message,
    Receipt,
    _uint,
    decode_body,
    is_currency,
    is_fog_id,
    is_id,
)
from protocol.reasons import Reason
from protocol.signing import Signed, message_id, open_envelope, seal_signed, split_envelope

VOUCHER_PAYEE: Final = "voucher"  # the reserved payee id of a voucher intent
VOUCHER_TYPE: Final = "vch"
PAYMENT_TYPE: Final = "d2d"
VOUCHER_LIFE_MS: Final = 86_400_000  # a voucher's na = the receipt's t + this [choice]
VOUCHER_GRACE_MS: Final = 7 * 86_400_000  # hand-in after na is accepted this long [choice]
VOUCHER_PAYEES_MAX: Final = 8  # payee ids in a voucher's pay list
VOUCHER_SEQ_MAX: Final = 2**32 - 1
ENVELOPE_BYTES_MAX: Final = limits.INTENT_ENVELOPE_BYTES_MAX  # 512: fits a held record
BUNDLE_BYTES_MAX: Final = 2_048  # [fog credential, vch, d2d]
PAYEE_CLOCK_SKEW_MS: Final = limits.CLOCK_SKEW_MS_MAX  # the payee's tolerance of the payer's t

# what a payee or the cloud says of a payment (stable strings of the id pattern)
FAULT_BAD_VOUCHER: Final = "bad_voucher"  # not a vch of a registered fog, or of a voucher
FAULT_BAD_PAYMENT: Final = "bad_payment"  # d2d malformed, badly signed, or of another voucher
FAULT_PAYEE: Final = "payee_not_allowed"  # payee not in the voucher's pay list (or reserved)
FAULT_EXPIRED: Final = "voucher_expired"  # t after na, or handed in after na + grace
FAULT_OVERSPENT: Final = "voucher_overspent"  # more than the voucher's amount in all
FAULT_SEQ: Final = "voucher_seq_conflict"  # another payment at that s (payee side)


def _is_payees(v: object) -> bool:
    return (
        type(v) is list
        and 1 <= len(v) <= VOUCHER_PAYEES_MAX
        and all(is_id(p) and p != VOUCHER_PAYEE for p in v)
        and len(set(v)) == len(v)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Voucher(Message):
    """``vch``: an offline allowance, signed by the fog of ``f`` that authorized intent ``i``."""

    TYPE: ClassVar[str] = VOUCHER_TYPE
    SCHEMA: ClassVar[tuple[Field, ...]]
    ENVELOPE_BYTES_MAX: ClassVar[int] = ENVELOPE_BYTES_MAX
    voucher_id: bytes  # the voucher intent's id
    device: bytes  # the payer
    fog_id: str
    amount_micros: int
    currency: str
    not_before_ms: int  # the receipt's t
    not_after_ms: int  # nb + VOUCHER_LIFE_MS
    payees: tuple[str, ...] | None = None  # absent: any payee

    def validate(self) -> None:
        if not self.not_before_ms < self.not_after_ms:
            raise Declined(Reason.MALFORMED, "vch: na must be > nb")


@dataclass(frozen=True, slots=True, kw_only=True)
class Payment(Message):
    """``d2d``: a payment against voucher ``v``, signed by the voucher's device."""

    TYPE: ClassVar[str] = PAYMENT_TYPE
    SCHEMA: ClassVar[tuple[Field, ...]]
    ENVELOPE_BYTES_MAX: ClassVar[int] = ENVELOPE_BYTES_MAX
    voucher_id: bytes
    seq: int  # 1, 2, ... within the voucher
    payee_id: str
    amount_micros: int
    spent_micros: int  # cumulative on the voucher, this payment included
    time_ms: int  # the payer's clock

    def validate(self) -> None:
        if self.amount_micros > self.spent_micros:
            raise Declined(Reason.MALFORMED, "d2d: a > u")
        if self.payee_id == VOUCHER_PAYEE:
            raise Declined(Reason.MALFORMED, "d2d: the payee is the reserved id")


Voucher.SCHEMA = (
    Field("i", "voucher_id", HASH),
    Field("d", "device", KEY),
    Field("f", "fog_id", is_fog_id),
    Field("a", "amount_micros", AMOUNT),
    Field("c", "currency", is_currency),
    Field("nb", "not_before_ms", UINT),
    Field("na", "not_after_ms", UINT),
    Field("pay", "payees", _is_payees, optional=True),
)
Payment.SCHEMA = (
    Field("v", "voucher_id", HASH),
    Field("s", "seq", _uint(1, VOUCHER_SEQ_MAX)),
    Field("p", "payee_id", is_id),
    Field("a", "amount_micros", AMOUNT),
    Field("u", "spent_micros", AMOUNT),
    Field("t", "time_ms", UINT),
)


class VoucherError(FogpayError):
    """A bundle or payment a payee must refuse; ``code`` is one of the FAULT_ strings (or
    ``malformed``, ``bad_signature``)."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code} {detail}".strip())
        self.code = code


# ---- the voucher intent's memo: the payee list -------------------------------------------


def encode_payees(payees: list[str] | tuple[str, ...]) -> bytes:
    """The memo of a voucher intent that limits the voucher to ``payees`` (1..8 distinct)."""
    if not _is_payees(list(payees)):
        raise Declined(Reason.MALFORMED, "voucher: 1..8 distinct payee ids, not 'voucher'")
    data = pack(list(payees))
    if len(data) > limits.MEMO_BYTES_MAX:
        raise Declined(Reason.MALFORMED, "voucher: the payee list does not fit a 64-byte memo")
    return data


def decode_payees(memo: bytes | None) -> tuple[str, ...] | None:
    """The payee list a voucher intent's memo carries; None (any payee) when there is no memo
    or it is not such a list."""
    if memo is None:
        return None
    try:
        obj = unpack_strict(memo, bytes_max=limits.MEMO_BYTES_MAX, items_max=16, what="memo")
    except Declined:
        return None
    return tuple(obj) if _is_payees(obj) else None


# ---- the fog's side ---------------------------------------------------------------------


def is_voucher_intent(intent: Intent) -> bool:
    return intent.payee_id == VOUCHER_PAYEE


def voucher_of(intent: Intent, intent_id: bytes, receipt: Receipt) -> Voucher:
    """The voucher an authorized voucher intent earns; a pure function of the record."""
    return Voucher(
        voucher_id=intent_id,
        device=intent.device,
        fog_id=intent.fog_id,
        amount_micros=intent.amount_micros,
        currency=intent.currency,
        not_before_ms=receipt.time_ms,
        not_after_ms=receipt.time_ms + VOUCHER_LIFE_MS,
        payees=decode_payees(intent.memo),
    )


def voucher_for(
    intent_env: bytes, receipt_env: bytes, fog_key: nacl.signing.SigningKey
) -> bytes | None:
    """The ``vch`` envelope for an ok receipt of a voucher intent, or None (another payee, a
    decline). Deterministic (Ed25519): the same record always gives the same bytes."""
    if VOUCHER_PAYEE.encode() not in intent_env:
        return None  # the usual case, without decoding
    try:
        raw = split_envelope(intent_env, bytes_max=limits.INTENT_ENVELOPE_BYTES_MAX)
        intent = decode_body(Intent, raw.body)
        receipt = open_envelope(receipt_env, Receipt).msg
    except Declined:
        return None
    intent_id = message_id(Intent.TYPE, raw.body)
    if not is_voucher_intent(intent) or not receipt.ok or receipt.intent_id != intent_id:
        return None
    return seal_signed(voucher_of(intent, intent_id, receipt), fog_key).raw


# ---- the payer's bundle and the payee's check ---------------------------------------------


def encode_bundle(fog_credential: bytes, voucher: bytes, payment: bytes) -> bytes:
    data = pack([fog_credential, voucher, payment])
    if len(data) > BUNDLE_BYTES_MAX:
        raise Declined(Reason.MALFORMED, "bundle: too large")
    return data


def decode_bundle(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(fog credential, vch, d2d) envelopes; raises VoucherError('malformed')."""
    try:
        obj = unpack_strict(data, bytes_max=BUNDLE_BYTES_MAX, items_max=3, what="bundle")
    except Declined as exc:
        raise VoucherError("malformed", str(exc)) from None
    if type(obj) is not list or len(obj) != 3 or not all(type(x) is bytes for x in obj):
        raise VoucherError("malformed", "bundle: not [bin, bin, bin]")
    return obj[0], obj[1], obj[2]


@dataclass(frozen=True, slots=True)
class Checked:
    """A bundle that passed ``check_bundle``."""

    fog: FogCredential
    voucher: Signed[Voucher]
    payment: Signed[Payment]

    @property
    def record(self) -> bytes:
        """What the payee hands in: the held record ``[vch, d2d]``."""
        return pack([self.voucher.raw, self.payment.raw])


def open_voucher(data: bytes, fog_key: bytes | None = None) -> Signed[Voucher]:
    try:
        return open_envelope(data, Voucher, signer=fog_key)
    except Declined as exc:
        raise VoucherError(FAULT_BAD_VOUCHER, str(exc)) from None


def open_payment(data: bytes, voucher: Voucher) -> Signed[Payment]:
    """A d2d envelope signed by the voucher's device, against that voucher."""
    try:
        payment = open_envelope(data, Payment, signer=voucher.device)
    except Declined as exc:
        raise VoucherError(FAULT_BAD_PAYMENT, str(exc)) from None
    return payment


def check_terms(voucher: Voucher, payment: Payment) -> None:
    """The rules of a payment against its voucher that need no state (raises VoucherError):
    the payment names the voucher, its payee is allowed, its time is within the voucher, its
    cumulative is within the amount."""
    if payment.voucher_id != voucher.voucher_id:
        raise VoucherError(FAULT_BAD_PAYMENT, "d2d: another voucher")
    if voucher.payees is not None and payment.payee_id not in voucher.payees:
        raise VoucherError(FAULT_PAYEE, payment.payee_id)
    if not voucher.not_before_ms - PAYEE_CLOCK_SKEW_MS <= payment.time_ms <= voucher.not_after_ms:
        raise VoucherError(FAULT_EXPIRED, f"t={payment.time_ms} na={voucher.not_after_ms}")
    if payment.spent_micros > voucher.amount_micros:
        raise VoucherError(FAULT_OVERSPENT, f"u={payment.spent_micros} > a")


def check_bundle(data: bytes, *, issuer_key: bytes, payee_id: str, now_ms: int) -> Checked:
    """The payee's check, with the issuer key alone (raises VoucherError): the fog credential
    is the issuer's, valid at the voucher's nb; the voucher is signed by that fog key; the
    payment by the voucher's device, to ``payee_id``, within the voucher's terms, and the
    voucher not expired at the payee's clock ``now_ms``."""
    cred_env, vch_env, d2d_env = decode_bundle(data)
    try:
        fog = open_envelope(cred_env, FogCredential, signer=issuer_key).msg
    except Declined as exc:
        raise VoucherError(FAULT_BAD_VOUCHER, f"fog credential: {exc}") from None
    voucher = open_voucher(vch_env, fog.key)
    v = voucher.msg
    if v.fog_id != fog.fog_id or not fog.not_before_ms <= v.not_before_ms <= fog.not_after_ms:
        raise VoucherError(FAULT_BAD_VOUCHER, "not this fog's, or outside its credential")
    payment = open_payment(d2d_env, v)
    check_terms(v, payment.msg)
    if payment.msg.payee_id != payee_id:
        raise VoucherError(FAULT_PAYEE, f"to {payment.msg.payee_id}, not {payee_id}")
    if now_ms > v.not_after_ms:
        raise VoucherError(FAULT_EXPIRED, f"now={now_ms} > na={v.not_after_ms}")
    return Checked(fog, voucher, payment)


def is_voucher_record(first_envelope: bytes) -> bool:
    """True if a held record's first envelope claims type ``vch`` (a d2d hand-in)."""
    try:
        raw = split_envelope(first_envelope, bytes_max=ENVELOPE_BYTES_MAX)
    except Declined:
        return False
    return raw.type == VOUCHER_TYPE
