"""Limits of the wire protocol (spec section 9) and of our implementation. Unit last."""

from typing import Final

PROTOCOL_PREFIX: Final = b"fogpay/1/"

INTENT_ENVELOPE_BYTES_MAX: Final = 512  # intent and receipt envelopes
IDENTITY_ENVELOPE_BYTES_MAX: Final = 1024  # owner, fog, bind, revoke, lease, ack, batch header
BATCH_WIRE_BYTES_MAX: Final = 1024 * 1024
BATCH_RECORDS_MAX: Final = 4096
MEMO_BYTES_MAX: Final = 64
PAY_LIST_MAX: Final = 32
REVOKE_REASON_BYTES_MAX: Final = 64
ID_CHARS_MAX: Final = 63

AMOUNT_MICROS_MIN: Final = 1
AMOUNT_MICROS_MAX: Final = 2**53
UINT64_MAX: Final = 2**64 - 1

KEY_BYTES: Final = 32
SIG_BYTES: Final = 64
HASH_BYTES: Final = 32
LEASE_ID_BYTES: Final = 16
SEED_BYTES: Final = 32

CLOCK_SKEW_MS_MAX: Final = 300_000  # default fog clock window, +-5 minutes
