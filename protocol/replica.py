"""Replication between fogs: the project's messages ``racc`` and ``fetch`` (docs/protocol.md
sections 17.2 and 17.3).

Both are envelopes of section 3 signed by a fog and sent fog -> fog under
``fogpay/1/gossip/{to}/...``:

- ``racc`` (replica ack): the holder ``p`` has verified batch ``b`` of origin ``f`` (header
  id ``h``) and stored it durably. Signed by the fog credential of ``p``.
- ``fetch``: fog ``f``, restoring after it lost its disk, asks a holder for its own batches
  from ``b`` on. Signed by the fog credential of ``f``.

Sans-IO: encoding and decoding only (``protocol.signing`` seals and opens them).
"""

from dataclasses import dataclass
from typing import ClassVar, Final

from protocol.errors import Declined
from protocol.messages import HASH, UINT, UINT_POS, Field, Message, is_fog_id
from protocol.reasons import Reason

REPLICA_ENVELOPE_BYTES_MAX: Final = 1_024
FETCH_BATCHES_MAX: Final = 64  # batches a holder sends back for one fetch


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaAck(Message):
    TYPE: ClassVar[str] = "racc"
    SCHEMA: ClassVar[tuple[Field, ...]]
    ENVELOPE_BYTES_MAX: ClassVar[int] = REPLICA_ENVELOPE_BYTES_MAX
    origin: str  # f: the batch header's fog_id
    number: int  # b
    header_id: bytes  # h: the header's message id
    holder: str  # p: the fog that holds the replica (the signer)
    time_ms: int  # t: holder time

    def validate(self) -> None:
        if self.origin == self.holder:
            raise Declined(Reason.MALFORMED, "racc: p must differ from f")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetch(Message):
    TYPE: ClassVar[str] = "fetch"
    SCHEMA: ClassVar[tuple[Field, ...]]
    ENVELOPE_BYTES_MAX: ClassVar[int] = REPLICA_ENVELOPE_BYTES_MAX
    fog_id: str  # f: the restoring fog, asking for its own batches (the signer)
    from_number: int  # b: from this batch number on
    time_ms: int  # t: fog time


ReplicaAck.SCHEMA = (
    Field("f", "origin", is_fog_id),
    Field("b", "number", UINT_POS),
    Field("h", "header_id", HASH),
    Field("p", "holder", is_fog_id),
    Field("t", "time_ms", UINT),
)
Fetch.SCHEMA = (
    Field("f", "fog_id", is_fog_id),
    Field("b", "from_number", UINT_POS),
    Field("t", "time_ms", UINT),
)
