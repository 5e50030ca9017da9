"""fogpay wire protocol v1, sans-IO: messages, envelopes, signatures, Merkle, topics, money.

Imports only the standard library, msgpack and PyNaCl; no asyncio, no I/O.
"""

from protocol.errors import Declined, FogpayError, TopicError
from protocol.messages import (
    Ack,
    BatchHeader,
    Binding,
    FogCredential,
    Intent,
    Lease,
    Message,
    OwnerCredential,
    Receipt,
    Revocation,
)
from protocol.reasons import Reason
from protocol.signing import Signed, message_id, open_envelope, seal, seal_signed

__all__ = [
    "Ack",
    "BatchHeader",
    "Binding",
    "Declined",
    "FogCredential",
    "FogpayError",
    "Intent",
    "Lease",
    "Message",
    "OwnerCredential",
    "Reason",
    "Receipt",
    "Revocation",
    "Signed",
    "TopicError",
    "message_id",
    "open_envelope",
    "seal",
    "seal_signed",
]
