"""Lease requests and lease reports: the project's messages of spec section 5.

Both are signed by the fog and travel fog -> cloud (topics below). They extend the spec in
its own form; docs/protocol.md section 14 has the tables and the semantics:

- ``lreq`` asks the issuer for budget of one owner. Without ``a`` it asks for the policy's
  initial lease (the fog has just seen a device of an owner it holds no lease for, ``d``).
- ``lrep`` closes a lease: the fog promises it will never draw on ``l`` again and states
  what it drew (``u``) and the last batch (``b``) that holds a draw on it. Once the cloud
  holds the fog's batches up to ``b`` and their draws on ``l`` add up to ``u``, the unused
  part returns to the owner's credit.
- ``rbal`` (docs/protocol.md 18.5) travels the other way, signed by the issuer: the cloud
  asks fog ``f`` to give lease ``l`` of owner ``o`` back early because fog ``r`` needs the
  owner's credit. The fog gives back the owner's leases if the owner has been idle there
  (18.1), else keeps them.
"""

from dataclasses import dataclass
from typing import ClassVar, Final

from protocol.errors import TopicError
from protocol.messages import (
    AMOUNT,
    LEASE_ID,
    LIMIT,
    UINT,
    UINT_POS,
    Field,
    Message,
    is_currency,
    is_fog_id,
    is_id,
)
from protocol.messages import KEY as KEY_CHECK
from protocol.topics import ROOT

LEASE_REQUEST_TOPIC_LEVEL: Final = "lreq"
RECALL_TYPE: Final = "rbal"
LEASE_REPORT_TOPIC_LEVEL: Final = "lrep"


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRequest(Message):
    TYPE: ClassVar[str] = "lreq"
    SCHEMA: ClassVar[tuple[Field, ...]]
    fog_id: str
    owner_id: str
    currency: str
    amount_micros: int | None = None  # absent: the policy's initial lease
    device: bytes | None = None  # the device whose first intent prompted the request
    time_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseReport(Message):
    TYPE: ClassVar[str] = "lrep"
    SCHEMA: ClassVar[tuple[Field, ...]]
    lease_id: bytes
    fog_id: str
    drawn_micros: int
    last_batch: int  # 0: no batch holds a draw on this lease
    time_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRecall(Message):
    """The cloud asks a fog to give a lease back early (docs/protocol.md 18.5); published,
    not retained, on the lease's own topic (``protocol.topics.lease_topic``)."""

    TYPE: ClassVar[str] = RECALL_TYPE
    SCHEMA: ClassVar[tuple[Field, ...]]
    lease_id: bytes
    fog_id: str  # the fog holding the lease
    owner_id: str
    requester: str  # the fog whose lease request found no credit
    time_ms: int


LeaseRequest.SCHEMA = (
    Field("f", "fog_id", is_fog_id),
    Field("o", "owner_id", is_id),
    Field("c", "currency", is_currency),
    Field("a", "amount_micros", AMOUNT, optional=True),
    Field("d", "device", KEY_CHECK, optional=True),
    Field("t", "time_ms", UINT_POS),
)
LeaseRecall.SCHEMA = (
    Field("l", "lease_id", LEASE_ID),
    Field("f", "fog_id", is_fog_id),
    Field("o", "owner_id", is_id),
    Field("r", "requester", is_fog_id),
    Field("t", "time_ms", UINT_POS),
)
LeaseReport.SCHEMA = (
    Field("l", "lease_id", LEASE_ID),
    Field("f", "fog_id", is_fog_id),
    Field("u", "drawn_micros", LIMIT),
    Field("b", "last_batch", UINT),
    Field("t", "time_ms", UINT_POS),
)


def _fog(fog_id: str) -> str:
    if not is_fog_id(fog_id):
        raise TopicError(f"invalid fog_id {fog_id!r}")
    return fog_id


def lease_request_topic(fog_id: str) -> str:
    return f"{ROOT}/up/{_fog(fog_id)}/{LEASE_REQUEST_TOPIC_LEVEL}"


def lease_report_topic(fog_id: str) -> str:
    return f"{ROOT}/up/{_fog(fog_id)}/{LEASE_REPORT_TOPIC_LEVEL}"
