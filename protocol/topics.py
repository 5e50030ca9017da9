"""MQTT topics of spec section 8 (and the project's sections 14, 17 and 18): build and parse,
rejecting malformed levels."""

import enum
import re
from dataclasses import dataclass
from typing import Final

from protocol import limits
from protocol.errors import TopicError
from protocol.messages import is_fog_id, is_id

ROOT: Final = "fogpay/1"
KEY_HEX_PATTERN: Final = re.compile(r"[0-9a-f]{64}")
LEASE_HEX_PATTERN: Final = re.compile(r"[0-9a-f]{32}")


class Kind(enum.StrEnum):
    INTENT = "intent"
    RECEIPT = "receipt"
    TRUST_OWNER = "trust_owner"
    TRUST_FOG = "trust_fog"
    TRUST_BIND = "trust_bind"
    TRUST_REVOKE = "trust_revoke"
    LEASE = "lease"
    BATCH = "batch"
    ACK = "ack"
    LEASE_REQUEST = "lreq"  # fog -> cloud, protocol.leasing.LeaseRequest
    LEASE_REPORT = "lrep"  # fog -> cloud, protocol.leasing.LeaseReport
    # federation (docs/protocol.md section 17): fog -> peer fog, under fogpay/1/gossip/{to}/
    GOSSIP_BATCH = "gossip_batch"  # a batch of any origin fog, to a replica holder
    GOSSIP_RACC = "gossip_racc"  # a replica holder's signed ack, to the origin
    GOSSIP_FETCH = "gossip_fetch"  # a restoring fog asks a holder for its own batches
    GOSSIP_SEEN = "gossip_seen"  # (device, q, intent id) a fog authorized
    GOSSIP_REVOKE = "gossip_revoke"  # a revocation passed on from fog to fog
    GOSSIP_XREQ = "gossip_xreq"  # a fog short of budget asks a peer (section 18.2)
    GOSSIP_XFER = "gossip_xfer"  # the peer's transfer: a sub-lease carved from its lease
    TRANSFER = "xfer"  # fog -> cloud: a transfer the giver made or the receiver got (18.2)
    RELAY = "relay"  # fog -> cloud: another fog's batch, forwarded by a replica holder
    HELD_RECORDS = "held_records"  # device -> cloud: records (intent, receipt) it holds
    HELD_ACK = "held_ack"  # cloud -> device: what the cloud made of them


@dataclass(frozen=True, slots=True)
class Topic:
    kind: Kind
    fog_id: str | None = None
    key: bytes | None = None  # device (intent, receipt, bind, held) or revoked key
    owner_id: str | None = None
    lease_id: bytes | None = None


def key_hex(key: bytes) -> str:
    assert len(key) == limits.KEY_BYTES
    return key.hex()


def _fog(fog_id: str) -> str:
    if not is_fog_id(fog_id):
        raise TopicError(f"invalid fog_id {fog_id!r}")
    return fog_id


def intent_topic(fog_id: str, device: bytes) -> str:
    return f"{ROOT}/{_fog(fog_id)}/intent/{key_hex(device)}"


def receipt_topic(fog_id: str, device: bytes) -> str:
    return f"{ROOT}/{_fog(fog_id)}/receipt/{key_hex(device)}"


def owner_topic(owner_id: str) -> str:
    if not is_id(owner_id):
        raise TopicError(f"invalid owner_id {owner_id!r}")
    return f"{ROOT}/trust/owner/{owner_id}"


def fog_topic(fog_id: str) -> str:
    return f"{ROOT}/trust/fog/{_fog(fog_id)}"


def bind_topic(device: bytes) -> str:
    return f"{ROOT}/trust/bind/{key_hex(device)}"


def revoke_topic(key: bytes) -> str:
    return f"{ROOT}/trust/revoke/{key_hex(key)}"


def lease_topic(fog_id: str, lease_id: bytes) -> str:
    assert len(lease_id) == limits.LEASE_ID_BYTES
    return f"{ROOT}/{_fog(fog_id)}/lease/{lease_id.hex()}"


def batch_topic(fog_id: str) -> str:
    return f"{ROOT}/up/{_fog(fog_id)}/batch"


def ack_topic(fog_id: str) -> str:
    return f"{ROOT}/up/{_fog(fog_id)}/ack"


def relay_topic(fog_id: str) -> str:
    """Where fog ``fog_id`` forwards another fog's batch to the cloud (section 17)."""
    return f"{ROOT}/up/{_fog(fog_id)}/relay"


def gossip_topic(to_fog_id: str, kind: str) -> str:
    """``fogpay/1/gossip/{to_fog_id}/{kind}``, kind one of GOSSIP_LEVELS (section 17)."""
    if kind not in _GOSSIP_KINDS:
        raise TopicError(f"unknown gossip topic {kind!r}")
    return f"{ROOT}/gossip/{_fog(to_fog_id)}/{kind}"


def held_topic(device: bytes) -> str:
    """Device -> cloud: the records a device holds (section 17)."""
    return f"{ROOT}/held/{key_hex(device)}/records"


def held_ack_topic(device: bytes) -> str:
    """Cloud -> device: the answer to its held records (section 17)."""
    return f"{ROOT}/held/{key_hex(device)}/ack"


# Subscription filters
def intent_filter(fog_id: str) -> str:
    return f"{ROOT}/{_fog(fog_id)}/intent/+"


def receipt_filter(fog_id: str) -> str:
    return f"{ROOT}/{_fog(fog_id)}/receipt/+"


def lease_filter(fog_id: str) -> str:
    return f"{ROOT}/{_fog(fog_id)}/lease/+"


TRUST_FILTER: Final = f"{ROOT}/trust/#"
BATCH_FILTER: Final = f"{ROOT}/up/+/batch"
LEASE_REQUEST_FILTER: Final = f"{ROOT}/up/+/lreq"
LEASE_REPORT_FILTER: Final = f"{ROOT}/up/+/lrep"
RELAY_FILTER: Final = f"{ROOT}/up/+/relay"
ACK_FILTER: Final = f"{ROOT}/up/+/ack"  # a replica holder learns what the cloud has
HELD_FILTER: Final = f"{ROOT}/held/+/records"
TRANSFER_FILTER: Final = f"{ROOT}/up/+/xfer"  # the cloud learns peer transfers (18.2)


def gossip_filter(fog_id: str) -> str:
    """Everything peers send to fog ``fog_id``."""
    return f"{ROOT}/gossip/{_fog(fog_id)}/+"


def _key(level: str) -> bytes:
    if KEY_HEX_PATTERN.fullmatch(level) is None:
        raise TopicError("key level is not 64 lowercase hex characters")
    return bytes.fromhex(level)


_TRUST_KINDS: Final = {
    "owner": Kind.TRUST_OWNER,
    "fog": Kind.TRUST_FOG,
    "bind": Kind.TRUST_BIND,
    "revoke": Kind.TRUST_REVOKE,
}
_FOG_KINDS: Final = {"intent": Kind.INTENT, "receipt": Kind.RECEIPT, "lease": Kind.LEASE}
# fog -> cloud, under fogpay/1/up/{fog_id}/ (lreq and lrep: the project's lease messages)
_UP_KINDS: Final = {
    "batch": Kind.BATCH,
    "ack": Kind.ACK,
    "lreq": Kind.LEASE_REQUEST,
    "lrep": Kind.LEASE_REPORT,
    "relay": Kind.RELAY,
    "xfer": Kind.TRANSFER,
}
# fog -> fog, under fogpay/1/gossip/{to_fog_id}/ (section 17)
_GOSSIP_KINDS: Final = {
    "batch": Kind.GOSSIP_BATCH,
    "racc": Kind.GOSSIP_RACC,
    "fetch": Kind.GOSSIP_FETCH,
    "seen": Kind.GOSSIP_SEEN,
    "revoke": Kind.GOSSIP_REVOKE,
    "xreq": Kind.GOSSIP_XREQ,
    "xfer": Kind.GOSSIP_XFER,
}
GOSSIP_LEVELS: Final = tuple(_GOSSIP_KINDS)
_HELD_KINDS: Final = {"records": Kind.HELD_RECORDS, "ack": Kind.HELD_ACK}


def parse(topic: str) -> Topic:
    """Parse a topic of spec section 8; raises TopicError for anything else."""
    levels = topic.split("/")
    if len(levels) != 5 or levels[0] != "fogpay" or levels[1] != "1":
        raise TopicError(f"not a fogpay/1 topic of 5 levels: {topic[:120]!r}")
    a, b, c = levels[2], levels[3], levels[4]
    if a == "trust":
        kind = _TRUST_KINDS.get(b)
        if kind is None:
            raise TopicError(f"unknown trust topic {b!r}")
        if kind is Kind.TRUST_OWNER:
            if not is_id(c):
                raise TopicError("invalid owner_id level")
            return Topic(kind, owner_id=c)
        if kind is Kind.TRUST_FOG:
            return Topic(kind, fog_id=_fog(c))
        return Topic(kind, key=_key(c))
    if a == "up":
        up_kind = _UP_KINDS.get(c)
        if up_kind is None:
            raise TopicError(f"unknown up topic {c!r}")
        return Topic(up_kind, fog_id=_fog(b))
    if a == "gossip":  # fog_id = the fog the message is for
        gossip_kind = _GOSSIP_KINDS.get(c)
        if gossip_kind is None:
            raise TopicError(f"unknown gossip topic {c!r}")
        return Topic(gossip_kind, fog_id=_fog(b))
    if a == "held":
        held_kind = _HELD_KINDS.get(c)
        if held_kind is None:
            raise TopicError(f"unknown held topic {c!r}")
        return Topic(held_kind, key=_key(b))
    kind = _FOG_KINDS.get(b)
    if kind is None:
        raise TopicError(f"unknown fog topic {b!r}")
    fog_id = _fog(a)
    if kind is Kind.LEASE:
        if LEASE_HEX_PATTERN.fullmatch(c) is None:
            raise TopicError("lease level is not 32 lowercase hex characters")
        return Topic(kind, fog_id=fog_id, lease_id=bytes.fromhex(c))
    return Topic(kind, fog_id=fog_id, key=_key(c))
