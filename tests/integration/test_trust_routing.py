"""Which MQTT messages are trust material for this fog, and where stored envelopes go back."""

import pytest

from fog.trust import classify, republish_topic
from protocol import topics
from protocol.signing import public_key
from tests.integration.devices import Issuer, new_key


def test_classify_routes_trust_and_this_fogs_leases_and_acks_only() -> None:
    issuer = Issuer()
    device = public_key(new_key())
    owner_topic, owner = issuer.owner_credential()
    lease_topic, lease = issuer.lease("fog-a", 5)
    other_topic, other = issuer.lease("fog-b", 5)
    parse = topics.parse
    assert classify(parse(owner_topic), owner, fog_id="fog-a").msg_type == "owner"  # type: ignore[union-attr]
    assert classify(parse(lease_topic), lease, fog_id="fog-a").msg_type == "lease"  # type: ignore[union-attr]
    assert classify(parse(other_topic), other, fog_id="fog-a") is None
    assert classify(parse(owner_topic), b"", fog_id="fog-a") is None  # cleared retained topic
    assert classify(parse(topics.ack_topic("fog-a")), b"x", fog_id="fog-a").msg_type == "ack"  # type: ignore[union-attr]
    assert classify(parse(topics.ack_topic("fog-b")), b"x", fog_id="fog-a") is None
    assert classify(parse(topics.receipt_topic("fog-a", device)), b"x", fog_id="fog-a") is None


def test_republish_topic_is_the_topic_the_material_came_on() -> None:
    issuer = Issuer()
    device = public_key(new_key())
    for topic, envelope, kind in (
        (*issuer.owner_credential(), "owner"),
        (*issuer.binding(device), "bind"),
        (*issuer.lease("fog-a", 5), "lease"),
        (*issuer.revocation(device), "revoke"),
    ):
        assert republish_topic(kind, envelope) == topic
    assert republish_topic("ack", b"") is None
    with pytest.raises(AssertionError):
        republish_topic("owner", b"\x94junk")
