"""Trust material on MQTT: which retained topics carry what, and where a stored envelope goes.

The issuer publishes owner credentials, fog credentials, bindings, revocations (all fogs) and
leases (one fog) retained (spec section 8). ``FogCore`` classifies each message on the fog's
subscriptions (``classify``) and hands the payload to ``FogStore.put_trust`` under the message
type its topic carries; the store verifies and keeps a copy, so a fog starts and authorizes
with the broker's retained state gone. At start, on the embedded broker, the daemon
republishes what the core holds (``Republish``, ``republish_topic``) so that amqtt's missing
persistence costs nothing.

Pure functions: no I/O here.
"""

from dataclasses import dataclass
from typing import Final

from protocol import limits, topics
from protocol.errors import Declined
from protocol.messages import (
    Binding,
    FogCredential,
    Lease,
    Message,
    OwnerCredential,
    Revocation,
    decode_body,
)
from protocol.signing import split_envelope
from protocol.topics import Kind

TRUST_KINDS: Final[dict[Kind, str]] = {
    Kind.TRUST_OWNER: OwnerCredential.TYPE,
    Kind.TRUST_FOG: FogCredential.TYPE,
    Kind.TRUST_BIND: Binding.TYPE,
    Kind.TRUST_REVOKE: Revocation.TYPE,
    Kind.LEASE: Lease.TYPE,
}
TRUST_PAYLOAD_BYTES_MAX: Final = limits.IDENTITY_ENVELOPE_BYTES_MAX


@dataclass(frozen=True, slots=True)
class TrustArrival:
    msg_type: str  # "owner" | "fog" | "bind" | "revoke" | "lease" | "ack"
    payload: bytes


def classify(topic: topics.Topic, payload: bytes, *, fog_id: str) -> TrustArrival | None:
    """The trust arrival a message on ``topic`` is, or None when it is not ours to load.

    An empty retained payload (a cleared topic) and a lease or ack addressed to another fog
    are not ours. Size and signatures are the store's to judge; it declines what is wrong.
    """
    if not payload:
        return None
    if topic.kind is Kind.ACK:
        return TrustArrival("ack", payload) if topic.fog_id == fog_id else None
    if topic.kind is Kind.GOSSIP_REVOKE:  # a peer passes a revocation on (section 17.5)
        return TrustArrival("revoke", payload) if topic.fog_id == fog_id else None
    msg_type = TRUST_KINDS.get(topic.kind)
    if msg_type is None:
        return None
    if topic.kind is Kind.LEASE and topic.fog_id != fog_id:
        return None
    return TrustArrival(msg_type, payload)


def republish_topic(msg_type: str, envelope: bytes) -> str | None:
    """The retained topic a stored trust envelope belongs on, or None for types we don't
    republish. Stored envelopes were verified when loaded: the body is decoded, not verified
    again. A stored one that no longer decodes is a bug in the store, hence the assertion."""
    cls: type[Message] | None = {
        OwnerCredential.TYPE: OwnerCredential,
        FogCredential.TYPE: FogCredential,
        Binding.TYPE: Binding,
        Revocation.TYPE: Revocation,
        Lease.TYPE: Lease,
    }.get(msg_type)
    if cls is None:
        return None
    try:
        env = split_envelope(envelope, bytes_max=cls.ENVELOPE_BYTES_MAX)
        msg: Message = decode_body(cls, env.body)
    except Declined as exc:
        raise AssertionError(f"stored {msg_type} envelope does not open: {exc}") from exc
    if isinstance(msg, OwnerCredential):
        return topics.owner_topic(msg.owner_id)
    if isinstance(msg, FogCredential):
        return topics.fog_topic(msg.fog_id)
    if isinstance(msg, Binding):
        return topics.bind_topic(msg.device)
    if isinstance(msg, Revocation):
        return topics.revoke_topic(msg.key)
    assert isinstance(msg, Lease)
    return topics.lease_topic(msg.fog_id, msg.lease_id)
