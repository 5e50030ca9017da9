"""Peer transfers: the project's messages ``xreq`` and ``xfer`` (docs/protocol.md 18.2).

While a fog is cut off from its cloud, a fog short of an owner's budget asks a peer (``xreq``,
signed by the asking fog); the peer carves a sub-lease out of its own lease of that owner,
debits it durably, and answers with a signed ``xfer``. The sub-lease is identified by its own
16-byte id ``x``, derived from the request's message id (``transfer_id``), so a request
answered twice is answered with the same transfer, and the receiver and the cloud credit it
once. Sans-IO: types, tables, topics and the id; what fogs and the cloud do is section 18.2.
"""

import hashlib
from dataclasses import dataclass
from typing import ClassVar, Final

from protocol import limits
from protocol.errors import Declined
from protocol.messages import (
    AMOUNT,
    LEASE_ID,
    UINT,
    UINT_POS,
    Field,
    Message,
    is_currency,
    is_fog_id,
    is_id,
)
from protocol.reasons import Reason
from protocol.topics import ROOT, gossip_topic, lease_topic

TRANSFER_REQUEST_TOPIC_LEVEL: Final = "xreq"
TRANSFER_TOPIC_LEVEL: Final = "xfer"
TRANSFER_ID_CONTEXT: Final = b"fogpay/1/xid\x00"
TRANSFER_ID_BYTES: Final = limits.LEASE_ID_BYTES  # a sub-lease's id is a lease id


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferRequest(Message):
    TYPE: ClassVar[str] = "xreq"
    SCHEMA: ClassVar[tuple[Field, ...]]
    fog_id: str  # the asking fog (the receiver): the signer
    giver_id: str  # the fog asked
    owner_id: str
    currency: str
    amount_micros: int
    time_ms: int

    def validate(self) -> None:
        if self.fog_id == self.giver_id:
            raise Declined(Reason.MALFORMED, "xreq: a fog does not ask itself")


@dataclass(frozen=True, slots=True, kw_only=True)
class Transfer(Message):
    TYPE: ClassVar[str] = "xfer"
    SCHEMA: ClassVar[tuple[Field, ...]]
    transfer_id: bytes  # x: the sub-lease's id
    lease_id: bytes  # l: the giver's lease it is carved from
    fog_id: str  # the giver: the signer
    receiver_id: str
    owner_id: str
    currency: str
    amount_micros: int
    not_after_ms: int  # at most the parent lease's na
    time_ms: int

    def validate(self) -> None:
        if self.fog_id == self.receiver_id:
            raise Declined(Reason.MALFORMED, "xfer: a fog does not give to itself")


TransferRequest.SCHEMA = (
    Field("f", "fog_id", is_fog_id),
    Field("g", "giver_id", is_fog_id),
    Field("o", "owner_id", is_id),
    Field("c", "currency", is_currency),
    Field("a", "amount_micros", AMOUNT),
    Field("t", "time_ms", UINT_POS),
)
Transfer.SCHEMA = (
    Field("x", "transfer_id", LEASE_ID),
    Field("l", "lease_id", LEASE_ID),
    Field("f", "fog_id", is_fog_id),
    Field("r", "receiver_id", is_fog_id),
    Field("o", "owner_id", is_id),
    Field("c", "currency", is_currency),
    Field("a", "amount_micros", AMOUNT),
    Field("na", "not_after_ms", UINT),
    Field("t", "time_ms", UINT_POS),
)


def transfer_id(request_id: bytes) -> bytes:
    """The transfer id answering the ``xreq`` whose message id is ``request_id``: the first
    16 bytes of SHA-256("fogpay/1/xid" || 0x00 || request_id)."""
    assert len(request_id) == 32
    return hashlib.sha256(TRANSFER_ID_CONTEXT + request_id).digest()[:TRANSFER_ID_BYTES]


def request_topic(giver_id: str) -> str:
    """Receiver -> giver: ``fogpay/1/gossip/{giver}/xreq``."""
    return gossip_topic(giver_id, TRANSFER_REQUEST_TOPIC_LEVEL)


def transfer_topic(receiver_id: str) -> str:
    """Giver -> receiver: ``fogpay/1/gossip/{receiver}/xfer``."""
    return gossip_topic(receiver_id, TRANSFER_TOPIC_LEVEL)


def transfer_up_topic(fog_id: str) -> str:
    """Giver or receiver -> cloud: ``fogpay/1/up/{fog}/xfer`` (the ``xfer`` byte for byte)."""
    if not is_fog_id(fog_id):
        raise ValueError(f"invalid fog_id {fog_id!r}")
    return f"{ROOT}/up/{fog_id}/{TRANSFER_TOPIC_LEVEL}"


def sub_lease_topic(receiver_id: str, xid: bytes) -> str:
    """Cloud -> receiver, retained: the ``xfer`` as the cloud learnt it, on the receiver's
    lease topic of the sub-lease (cleared when the sub-lease closes)."""
    return lease_topic(receiver_id, xid)
